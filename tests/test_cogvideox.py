"""npo_min.cogvideox: the CogVideoX transformer vs diffusers' CogVideoXTransformer3DModel.

Oracle: diffusers 0.42.1 (test-only), with the 5B RoPE tables computed by CogVideoXPipeline's own
`_prepare_rotary_positional_embeddings` (crop region included).
"""

import json
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch
from conftest import maxerr, randomize_
from safetensors.torch import save_file

from npo_min.checkpoint import CheckpointError
from npo_min.cogvideox import (FIXED_FIELDS, PRESETS, CogVideoXConfig, CogVideoXTransformer3DModel, config_from_json,
                               load_transformer, resize_crop_region)

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel as RefModel  # noqa: E402
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid  # noqa: E402


def diffusers_config(cfg: CogVideoXConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items()}


def make_pair(preset: str):
    cfg = PRESETS[preset]
    ref = RefModel(**diffusers_config(cfg)).eval()
    randomize_(ref, seed=3, std=0.2)
    ours = CogVideoXTransformer3DModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.fixture(scope="module", params=["tiny-2b", "tiny-5b"])
def pair(request):
    return make_pair(request.param)


def ref_forward(ref, x, t, ctx):
    rope = None
    if ref.config.use_rotary_positional_embeddings:
        H, W = x.shape[-2:]
        fake_pipe = SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
        rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake_pipe, H * 8, W * 8, x.shape[1], x.device)
    return ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t, image_rotary_emb=rope, return_dict=False)[0]


# latent frames 3 (9 pixel frames, the tiny configs' sample size) and 4 (13 frames); the default
# 8 x 12 latent grid, non-square other sizes, a portrait one (exercises the other crop branch).
SHAPES = [(2, 3, 8, 12), (2, 4, 8, 12), (2, 3, 6, 10), (1, 4, 12, 6)]


@pytest.mark.parametrize("B,Fr,H,W", SHAPES)
def test_forward_parity(pair, B, Fr, H, W):
    ours, ref = pair
    cfg = ours.cfg
    g = torch.Generator().manual_seed(Fr * 100 + H)
    x = torch.randn(B, Fr, cfg.in_channels, H, W, generator=g)
    ctx = torch.randn(B, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    t = torch.tensor([999, 17][:B])
    with torch.no_grad():
        a, b = ours(x, t, ctx), ref_forward(ref, x, t, ctx)
    assert a.shape == b.shape == (B, Fr, cfg.out_channels, H, W)
    assert maxerr(a, b) < 1e-4, maxerr(a, b)


def test_position_scheme_matters():
    """The two tiny presets differ only in the position scheme; both must change the output."""
    ours, _ = make_pair("tiny-2b")
    other = CogVideoXTransformer3DModel(PRESETS["tiny-5b"]).eval()
    other.load_state_dict(ours.state_dict())
    x, ctx = torch.randn(1, 3, 4, 8, 12), torch.randn(1, 7, 40)
    with torch.no_grad():
        assert maxerr(ours(x, torch.tensor([500]), ctx), other(x, torch.tensor([500]), ctx)) > 1e-3


@pytest.mark.parametrize("src", [(30, 45), (60, 90), (32, 32), (20, 50), (45, 30), (13, 7)])
def test_crop_region_vs_pipeline(src):
    assert resize_crop_region(*src, 30, 45) == get_resize_crop_region_for_grid(src, 45, 30)


@pytest.mark.parametrize("preset,expected", [("cogvideox-2b", 1_693_783_872), ("cogvideox-5b", 5_570_283_072)])
def test_param_count_vs_diffusers(preset, expected):
    cfg = PRESETS[preset]
    with torch.device("meta"):
        ours, ref = CogVideoXTransformer3DModel(cfg), RefModel(**diffusers_config(cfg))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == expected
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_official_config_json():
    """diffusers' full config of the 2B / 5B presets reads back to the same preset."""
    for name in ("cogvideox-2b", "cogvideox-5b"):
        with torch.device("meta"):
            ref = RefModel(**diffusers_config(PRESETS[name]))
        assert config_from_json(dict(ref.config)) == PRESETS[name]
    with pytest.raises(CheckpointError, match="patch_size_t"):
        config_from_json({"patch_size_t": 2})
    with pytest.raises(CheckpointError, match="'some_new_field'"):
        config_from_json({"some_new_field": 1})
    assert FIXED_FIELDS["use_learned_positional_embeddings"] is False


def save_folder(folder, model, cfg):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel", **diffusers_config(cfg)}))


def test_load_transformer(tmp_path):
    ours, _ = make_pair("tiny-5b")
    save_folder(tmp_path / "t5b", ours, ours.cfg)
    model = load_transformer(tmp_path / "t5b", "tiny-5b")
    x, ctx = torch.randn(2, 3, 4, 6, 10), torch.randn(2, 7, 40)
    with torch.no_grad():
        assert maxerr(model(x, torch.tensor([3, 900]), ctx), ours(x, torch.tensor([3, 900]), ctx)) == 0.0
    assert load_transformer(tmp_path / "t5b").cfg == ours.cfg  # preset from config.json
    bf = load_transformer(tmp_path / "t5b", "tiny-5b", dtype=torch.bfloat16)
    assert bf.proj_out.weight.dtype == torch.bfloat16


def test_wrong_preset_errors(tmp_path):
    """A 2B checkpoint with the 5B preset (and the reverse): one line naming the mismatch."""
    small = CogVideoXTransformer3DModel(PRESETS["tiny-2b"])
    big_cfg = replace(PRESETS["tiny-5b"], num_attention_heads=3, num_layers=3)
    big = CogVideoXTransformer3DModel(big_cfg)
    save_folder(tmp_path / "small", small, small.cfg)
    save_folder(tmp_path / "big", big, big_cfg)
    with pytest.raises(CheckpointError, match=r"num_attention_heads=2 \(preset 3\)") as e:
        load_transformer(tmp_path / "small", big_cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="use_rotary_positional_embeddings=True"):
        load_transformer(tmp_path / "big", "tiny-2b")
    (tmp_path / "big" / "config.json").unlink()  # no config.json: the weights' shapes decide
    with pytest.raises(CheckpointError, match="D=48, 3 layers but the preset tiny-2b has D=32, 2 layers") as e:
        load_transformer(tmp_path / "big", "tiny-2b")
    assert "\n" not in str(e.value)


def test_bad_input():
    m = CogVideoXTransformer3DModel(PRESETS["tiny-2b"])
    with pytest.raises(ValueError, match="multiples of 2"):
        m(torch.randn(1, 3, 4, 7, 12), torch.tensor([1]), torch.randn(1, 7, 40))
    with pytest.raises(ValueError, match=r"\(B, F, 4, H, W\)"):
        m(torch.randn(1, 4, 3, 8, 12), torch.tensor([1]), torch.randn(1, 7, 40))


def test_gradient_checkpointing_same_grads():
    ours, _ = make_pair("tiny-5b")
    x, ctx, t = torch.randn(2, 3, 4, 6, 10), torch.randn(2, 7, 40), torch.tensor([5, 600])
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = ckpt
        ours(x, t, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    ours.gradient_checkpointing = False
    assert maxerr(grads[0], grads[1]) < 1e-6


def test_bf16_forward_close_to_fp32():
    ours, _ = make_pair("tiny-5b")
    x, ctx, t = torch.randn(1, 3, 4, 8, 12), torch.randn(1, 7, 40), torch.tensor([300])
    with torch.no_grad():
        ref = ours(x, t, ctx)
        out = ours.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16())
    ours.float()
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
