"""npo_min.cogvideox_vae: the causal 3D VAE vs diffusers' AutoencoderKLCogVideoX (chunked encode/decode).

Oracle: diffusers 0.42.1 (test-only), tiny random config with 4 levels (spatial / 8, time / 4).
Frame counts exercise one chunk (9, 13) and several chunks with conv caches carried over (17 pixel
frames = chunks of 9 + 8; 4 latent frames = 2 + 2; 5 latent frames = 3 + 2).
"""

import json
from dataclasses import asdict, replace

import pytest
import torch
from conftest import maxerr, randomize_
from safetensors.torch import save_file

from npo_min.checkpoint import CheckpointError
from npo_min.cogvideox_vae import PRESETS, AutoencoderKLCogVideoX, config_from_json, frame_chunks, load_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLCogVideoX as RefVAE  # noqa: E402


def diffusers_kwargs(cfg) -> dict:
    return asdict(cfg)


@pytest.fixture(scope="module")
def pair():
    cfg = PRESETS["tiny"]
    ref = RefVAE(**diffusers_kwargs(cfg)).eval()
    randomize_(ref, seed=5, std=0.15)
    ours = AutoencoderKLCogVideoX(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("B,Fr,H,W", [(2, 9, 16, 24), (1, 13, 24, 16), (1, 17, 16, 24)])
def test_encode_parity(pair, B, Fr, H, W):
    ours, ref = pair
    x = torch.rand(B, 3, Fr, H, W, generator=torch.Generator().manual_seed(Fr)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
    assert mean.shape == (B, 4, (Fr - 1) // 4 + 1, H // 8, W // 8)
    assert maxerr(mean, dist.mean) < 1e-4 and maxerr(logvar, dist.logvar) < 1e-4, (maxerr(mean, dist.mean), maxerr(logvar, dist.logvar))


@pytest.mark.parametrize("B,Fl,h,w", [(2, 3, 2, 3), (1, 4, 3, 2), (1, 5, 2, 3), (1, 1, 2, 2)])
def test_decode_parity(pair, B, Fl, h, w):
    ours, ref = pair
    z = torch.randn(B, 4, Fl, h, w, generator=torch.Generator().manual_seed(Fl))
    with torch.no_grad():
        a, b = ours.decode(z), ref.decode(z).sample
    # an odd latent count n decodes to 4(n-1)+1 frames; an even one (all chunks even) to 4n (diffusers' behaviour)
    assert a.shape == b.shape == (B, 3, 4 * (Fl - 1) + 1 if Fl % 2 else 4 * Fl, 8 * h, 8 * w)
    assert maxerr(a, b) < 1e-4, maxerr(a, b)


def test_chunking_matters(pair):
    """GroupNorm statistics are per chunk: one pass over all frames gives a different result,
    so the parity above really tests the chunking."""
    ours, _ = pair
    z = torch.randn(1, 4, 5, 2, 3)
    one_pass = AutoencoderKLCogVideoX(ours.cfg).eval()
    one_pass.load_state_dict(ours.state_dict())
    one_pass.latent_frames_per_chunk = 100
    with torch.no_grad():
        assert maxerr(ours.decode(z), one_pass.decode(z)) > 1e-3


def test_frame_chunks():
    assert frame_chunks(49, 8) == [(0, 9)] + [(i, i + 8) for i in range(9, 49, 8)]
    assert frame_chunks(13, 2) == [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
    assert frame_chunks(1, 2) == [(0, 1)] and frame_chunks(4, 2) == [(0, 2), (2, 4)]


def test_bad_frames_and_sizes(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="frame count 10 is not 4k \\+ 1"):
        ours.encode(torch.zeros(1, 3, 10, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 9, 12, 16))


def test_param_count_vs_diffusers():
    with torch.device("meta"):
        ours, ref = AutoencoderKLCogVideoX("cogvideox-2b"), RefVAE(**diffusers_kwargs(PRESETS["cogvideox-2b"]))
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 215_583_907
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_config_and_load(pair, tmp_path):
    ours, ref = pair
    assert config_from_json(dict(ref.config)) == ours.cfg
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
    model = load_vae(tmp_path, "tiny")
    z = torch.randn(1, 4, 2, 2, 2)
    with torch.no_grad():
        assert maxerr(model.decode(z), ours.decode(z)) == 0.0
    with pytest.raises(CheckpointError, match=r"scaling_factor=1.15258426 \(preset 0.7\)"):
        load_vae(tmp_path, replace(PRESETS["tiny"], scaling_factor=0.7))
    with pytest.raises(CheckpointError, match="use_quant_conv"):
        config_from_json({"use_quant_conv": True})
    with pytest.raises(CheckpointError, match="'foo'"):
        config_from_json({"foo": 1})
