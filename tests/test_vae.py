"""npo_min.vae against diffusers' AutoencoderKL (test-only oracle) on a tiny random config."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import diffusers
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from npo_min.checkpoint import CheckpointError, load_into
from npo_min.vae import (
    PRESETS,
    AutoencoderKL,
    VAEConfig,
    decode_latents,
    encode_latents,
    ldm_vae_to_diffusers,
    load_vae,
)

TINY = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, scaling_factor=0.25)
TOL = 1e-4  # max abs error vs diffusers in float32


def diffusers_config(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
    )


@pytest.fixture(scope="module")
def models():
    """(diffusers model, ours) with identical random weights, GroupNorm affines included."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**diffusers_config(TINY)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:  # default GroupNorm weights are 1 / 0: perturb them so they count
                p.add_(0.2 * torch.randn_like(p))
    ours = AutoencoderKL(TINY).eval()
    load_into(ours, ref.state_dict(), "tiny vae")
    return ref, ours


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def maxerr(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def test_encode_decode_match_diffusers(models, pixels):
    ref, ours = models
    dist = ref.encode(pixels).latent_dist
    mean, logvar = ours.encode(pixels)
    assert mean.shape == logvar.shape == (2, 4, 16, 16)
    assert maxerr(mean, dist.mean) <= TOL
    assert maxerr(logvar, dist.logvar) <= TOL
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    out = ours.decode(z)
    assert out.shape == (2, 3, 32, 32)
    assert maxerr(out, ref.decode(z).sample) <= TOL


@torch.no_grad()
def test_latent_helpers_scale_and_sample_like_diffusers(models, pixels):
    ref, ours = models
    dist = ref.encode(pixels).latent_dist
    assert maxerr(encode_latents(ours, pixels), dist.mean * TINY.scaling_factor) <= TOL
    drawn = dist.sample(generator=torch.Generator().manual_seed(3)) * TINY.scaling_factor
    ours_drawn = encode_latents(ours, pixels, sample=True, generator=torch.Generator().manual_seed(3))
    assert maxerr(ours_drawn, drawn) <= TOL
    assert maxerr(ours_drawn, dist.mean * TINY.scaling_factor) > 1e-3  # the draw is not the mean
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    assert maxerr(decode_latents(ours, latents), ref.decode(latents / TINY.scaling_factor).sample) <= TOL


def test_bad_input_shapes_raise(models):
    _, ours = models
    with pytest.raises(ValueError, match="multiples of 2"):
        ours.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match="expected pixels"):
        ours.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="expected z"):
        ours.decode(torch.zeros(1, 3, 8, 8))


def random_ldm_vae(cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """A random VAE state dict in the original LDM layout (ldm/modules/diffusionmodules/model.py)."""
    g = torch.Generator().manual_seed(5)
    sd = {}

    def add(name, *shape):
        sd[name] = torch.randn(*shape, generator=g)

    def conv(name, cout, cin, k):
        add(f"{name}.weight", cout, cin, k, k)
        add(f"{name}.bias", cout)

    def norm(name, c):
        add(f"{name}.weight", c)
        add(f"{name}.bias", c)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(name, c):
        resnet(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{proj}", c, c, 1)  # 1x1 convs in LDM
        resnet(f"{name}.block_2", c, c)

    ch, z, n = cfg.block_out_channels, cfg.latent_channels, len(cfg.block_out_channels)
    conv("encoder.conv_in", ch[0], cfg.in_channels, 3)
    cin = ch[0]
    for i in range(n):
        for j in range(cfg.layers_per_block):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch[i])
            cin = ch[i]
        if i < n - 1:
            conv(f"encoder.down.{i}.downsample.conv", ch[i], ch[i], 3)
    mid("encoder.mid", ch[-1])
    norm("encoder.norm_out", ch[-1])
    conv("encoder.conv_out", 2 * z, ch[-1], 3)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    conv("decoder.conv_in", ch[-1], z, 3)
    mid("decoder.mid", ch[-1])
    cin = ch[-1]
    for i in reversed(range(n)):  # LDM: up.{i} is resolution level i, built lowest resolution first
        for j in range(cfg.layers_per_block + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch[i])
            cin = ch[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", ch[i], ch[i], 3)
    norm("decoder.norm_out", ch[0])
    conv("decoder.conv_out", cfg.out_channels, ch[0], 3)
    return sd


def test_ldm_key_map_matches_diffusers_converter():
    ldm = random_ldm_vae(TINY)
    ours = ldm_vae_to_diffusers(ldm)
    theirs = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm.items()}, diffusers_config(TINY))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    load_into(AutoencoderKL(TINY), ours, "tiny vae")  # and it fits our model strictly


def test_load_vae_single_file(tmp_path):
    ldm = random_ldm_vae(TINY)
    expected = ldm_vae_to_diffusers(ldm)
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.x"] = torch.zeros(3)  # the UNet etc. must be ignored
    full["cond_stage_model.y"] = torch.zeros(2)
    save_file(full, tmp_path / "sd.safetensors")
    save_file(ldm, tmp_path / "ldm_vae_only.safetensors")  # a standalone LDM-layout VAE file
    for name in ("sd.safetensors", "ldm_vae_only.safetensors"):
        vae = load_vae(tmp_path / name, preset=TINY)
        assert not vae.training
        got = vae.state_dict()
        assert sorted(got) == sorted(expected)
        for k in expected:
            assert torch.equal(got[k], expected[k]), k


def test_load_vae_diffusers_folder(tmp_path, models, pixels):
    ref, _ = models
    ref.save_pretrained(tmp_path / "vae")
    want = ref.state_dict()
    for path in (tmp_path, tmp_path / "vae", tmp_path / "vae" / "diffusion_pytorch_model.safetensors"):
        got = load_vae(path, preset=TINY).state_dict()
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    vae = load_vae(tmp_path / "vae", preset=TINY, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    with pytest.raises(CheckpointError, match="scaling_factor"):
        load_vae(tmp_path / "vae", preset=dataclasses.replace(TINY, scaling_factor=0.5))


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_load_vae_reports_bad_keys(tmp_path, models, fault):
    ref, _ = models
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    key = "decoder.up_blocks.0.resnets.1.conv1.weight"
    if fault == "missing":
        del sd[key]
    elif fault == "unexpected":
        key = "decoder.up_blocks.0.resnets.9.conv1.weight"
        sd[key] = torch.zeros(1)
    else:
        sd[key] = torch.zeros(3, 3)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match={"missing": "missing keys", "unexpected": "unexpected keys",
                                               "shape": "shape mismatches"}[fault]) as err:
        load_vae(tmp_path / "bad.safetensors", preset=TINY)
    assert key in str(err.value)


def test_load_vae_missing_path_and_preset(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="unknown VAE preset"):
        load_vae(tmp_path / "nope.safetensors", preset="sd3")


def test_sd15_preset_parameter_count_matches_diffusers():
    # stable-diffusion-v1-5 vae/config.json
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**diffusers_config(PRESETS["sd15"]))
        ours = AutoencoderKL(PRESETS["sd15"])
    n_ref = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert PRESETS["sdxl"].scaling_factor == 0.13025
    assert dataclasses.replace(PRESETS["sdxl"], scaling_factor=0.18215) == PRESETS["sd15"]
