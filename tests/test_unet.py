"""npo_min.unet against diffusers' UNet2DConditionModel (test-only oracle); the single-file key map;
strict loading. Measured max abs error vs diffusers in float32 on this CPU: 0.0 for the SD1.5 and digits
layouts; below 1e-5 for the SDXL layout (its added embedding sums in another order)."""

import json

import pytest
import torch
from safetensors.torch import save_file

import diffusers
from conftest import diffusers_unet_to_ldm, maxerr, randomize_, unet_kwargs
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from npo_min.checkpoint import CheckpointError, load_into
from npo_min.unet import PRESETS, UNet2DConditionModel, UNetConfig, load_unet, unet_config_from_diffusers
from npo_min.unet_ldm import ldm_unet_to_diffusers

TOL = 1e-4  # max abs error vs diffusers in float32 (measured: 0.0)
CONFIGS = {
    # The SD1.5 block structure: 4 levels, cross-attention on the first three, 2 resnets per level.
    "sd15_layout": UNetConfig(block_out_channels=(32, 32, 64, 64), num_heads=2, cross_attention_dim=24, norm_num_groups=8),
    # The digits layout: 2 levels, attention only on the second, 1 resnet per level, 1 channel, 4 heads.
    "digits_layout": UNetConfig(in_channels=1, out_channels=1, block_out_channels=(16, 32), cross_attn=(False, True),
                                layers_per_block=1, num_heads=4, cross_attention_dim=16, norm_num_groups=8),
    # The shipped fashion preset itself (0.99M parameters): 3 levels 28 -> 14 -> 7, attention only on the last.
    "fashion": PRESETS["fashion"],
    # The SDXL block structure: 3 levels, no attention at the first, heads and transformer depth per level,
    # linear proj_in / proj_out, the text_time added embedding (pooled 16 + 6 time ids x 8 = 64 inputs).
    "sdxl_layout": UNetConfig(block_out_channels=(16, 32, 64), cross_attn=(False, True, True), num_heads=(1, 2, 4),
                              cross_attention_dim=24, norm_num_groups=8, transformer_depth=(1, 2, 3),
                              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                              projection_input_dim=16 + 6 * 8),
}


def sdxl_context(batch: int, g: torch.Generator, length: int = 7) -> dict:
    """A random SDXL-style context for the sdxl_layout: text states, pooled text, 6 time ids in pixels."""
    return dict(encoder_hidden_states=torch.randn(batch, length, 24, generator=g), text_embeds=torch.randn(batch, 16, generator=g),
                time_ids=torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 64.0, 0.0, 896.0, 1152.0],
                                       [256.0, 1024.0, 3.0, 5.0, 256.0, 1024.0]][:batch]))


def pair(name: str, seed: int = 0):
    """(diffusers model, ours) with identical random weights."""
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    ref = randomize_(diffusers.UNet2DConditionModel(**unet_kwargs(cfg)), seed).eval()
    ours = UNet2DConditionModel(cfg).eval()
    load_into(ours, ref.state_dict(), name)
    return ref, ours


@pytest.mark.parametrize("name,shape", [
    ("sd15_layout", (3, 4, 9, 13)),  # odd sizes: 9x13 -> 5x7 -> 3x4 -> 2x2, the up path must restore them
    ("sd15_layout", (2, 4, 16, 16)),
    ("digits_layout", (2, 1, 7, 8)),
    ("fashion", (2, 1, 28, 28)),
])
def test_forward_matches_diffusers(name, shape):
    ref, ours = pair(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    t = torch.tensor([0, 999, 431][: shape[0]])
    context = torch.randn(shape[0], 7, CONFIGS[name].cross_attention_dim, generator=g)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    assert got.shape == expected.shape == shape
    err = maxerr(got, expected)
    print(f"{name} {shape}: max abs err {err:.3g} (output scale {expected.abs().max():.3g})")
    assert err <= TOL
    with torch.no_grad():  # a scalar timestep broadcasts over the batch
        assert maxerr(ours(x, torch.tensor(500), context), ref(x, 500, encoder_hidden_states=context).sample) <= TOL


def test_sd15_preset_matches_diffusers_layout_and_size():
    cfg = PRESETS["sd15"]
    with torch.device("meta"):
        ours, ref = UNet2DConditionModel(cfg), diffusers.UNet2DConditionModel(**unet_kwargs(cfg))
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    assert n_ours == n_ref == 859_520_964
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    # diffusers' full config.json of that model (every default written out) reads back as the preset
    assert unet_config_from_diffusers(json.loads(ref.to_json_string())) == cfg


def test_gradient_checkpointing_same_outputs_and_grads():
    _, ours = pair("sd15_layout")
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 24, generator=g)
    t = torch.tensor([10, 700])
    results = []
    for flag in (False, True):
        ours.train().zero_grad()
        ours.gradient_checkpointing = flag
        out = ours(x, t, context)
        (out**2).mean().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in ours.named_parameters()}))
    (out0, g0), (out1, g1) = results
    assert maxerr(out0, out1) <= 1e-6
    assert max(maxerr(g0[k], g1[k]) for k in g0) <= 1e-6


@pytest.mark.parametrize("shape", [(3, 4, 9, 13), (2, 4, 16, 8)])
def test_sdxl_layout_matches_diffusers(shape):
    """Depth and heads per level, linear projections and the text_time embedding, non-square, batch > 1."""
    ref, ours = pair("sdxl_layout")
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(shape, generator=g), sdxl_context(shape[0], g)
    t = torch.tensor([0, 999, 431][: shape[0]])
    added = {k: ctx[k] for k in ("text_embeds", "time_ids")}
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx["encoder_hidden_states"], added_cond_kwargs=added).sample
        got = ours(x, t, ctx)
    err = maxerr(got, expected)
    print(f"sdxl_layout {shape}: max abs err {err:.3g} (output scale {expected.abs().max():.3g})")
    assert got.shape == expected.shape == shape and err <= TOL


def test_sdxl_added_conditioning_matters_and_is_checked():
    """Dropping or reordering the time ids or the pooled embedding changes the output; a bare tensor is refused."""
    _, ours = pair("sdxl_layout")
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), sdxl_context(2, g)
    t = torch.tensor([100, 600])
    with torch.no_grad():
        out = ours(x, t, ctx)
        for name, changed in [("time ids reordered", ctx["time_ids"][:, [1, 0, 3, 2, 5, 4]]), ("time ids zero", 0 * ctx["time_ids"]),
                              ("time ids swapped between samples", ctx["time_ids"].flip(0))]:
            assert maxerr(ours(x, t, {**ctx, "time_ids": changed}), out) > 1e-3, name
        for name, changed in [("pooled zero", 0 * ctx["text_embeds"]), ("pooled swapped", ctx["text_embeds"].flip(0))]:
            assert maxerr(ours(x, t, {**ctx, "text_embeds": changed}), out) > 1e-3, name
    with pytest.raises(ValueError, match="needs context = dict"):
        ours(x, t, ctx["encoder_hidden_states"])
    with pytest.raises(ValueError, match="needs context = dict"):
        ours(x, t, {k: v for k, v in ctx.items() if k != "time_ids"})
    _, sd15 = pair("sd15_layout")
    with pytest.raises(ValueError, match="not a dict"):
        sd15(torch.zeros(1, 4, 8, 8), torch.tensor([1]), ctx)


def test_sdxl_preset_matches_diffusers_layout_and_size():
    cfg = PRESETS["sdxl"]
    with torch.device("meta"):
        ours, ref = UNet2DConditionModel(cfg), diffusers.UNet2DConditionModel(**unet_kwargs(cfg))
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    assert n_ours == n_ref == 2_567_463_684
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert unet_config_from_diffusers(json.loads(ref.to_json_string())) == cfg


# ----------------------------------------------------------------------------- single-file (LDM) key map


@pytest.mark.parametrize("name", ["sd15_layout", "digits_layout", "sd15", "sdxl_layout", "sdxl"])
def test_ldm_key_map_matches_diffusers_converter(name):
    """Same keys and the very same tensors as diffusers' convert_ldm_unet_checkpoint."""
    cfg = PRESETS[name] if name in PRESETS else CONFIGS[name]
    with torch.device("meta"):
        names = list(UNet2DConditionModel(cfg).state_dict())
    ldm = diffusers_unet_to_ldm({k: torch.zeros(1) for k in names}, cfg)  # distinct tensor objects
    assert len(set(ldm)) == len(names) and not any(k.startswith(("down_blocks", "up_blocks", "mid_block")) for k in ldm)
    ours = ldm_unet_to_diffusers(ldm, cfg)
    theirs = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm.items()},
                                         {"layers_per_block": cfg.layers_per_block, "addition_embed_type": cfg.addition_embed_type})
    assert sorted(ours) == sorted(theirs) == sorted(names)
    assert all(ours[k] is theirs[k] for k in theirs)


def test_ldm_key_map_known_sd15_names():
    """A few names as they appear in v1-5-pruned-emaonly.safetensors and its diffusers unet/."""
    known = {
        "time_embed.2.bias": "time_embedding.linear_2.bias",
        "input_blocks.0.0.weight": "conv_in.weight",
        "input_blocks.1.1.proj_in.weight": "down_blocks.0.attentions.0.proj_in.weight",
        "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
        "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight": "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.11.0.emb_layers.1.weight": "down_blocks.3.resnets.1.time_emb_proj.weight",
        "middle_block.2.out_layers.3.weight": "mid_block.resnets.1.conv2.weight",
        "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.3.0.in_layers.0.bias": "up_blocks.1.resnets.0.norm1.bias",
        "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
        "output_blocks.11.1.transformer_blocks.0.ff.net.2.bias": "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.bias",
        "out.0.weight": "conv_norm_out.weight",
        "out.2.bias": "conv_out.bias",
    }
    got = ldm_unet_to_diffusers({k: torch.zeros(1) for k in known}, PRESETS["sd15"])
    assert sorted(got) == sorted(known.values())


def test_ldm_key_map_known_sdxl_names():
    """A few names as they appear in sd_xl_base_1.0.safetensors and its diffusers unet/."""
    known = {
        "label_emb.0.0.weight": "add_embedding.linear_1.weight",
        "label_emb.0.2.bias": "add_embedding.linear_2.bias",
        "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "input_blocks.4.1.proj_in.weight": "down_blocks.1.attentions.0.proj_in.weight",
        "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight": "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k.weight",
        "input_blocks.8.1.transformer_blocks.9.ff.net.2.bias": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2.bias",
        "middle_block.1.transformer_blocks.9.norm3.weight": "mid_block.attentions.0.transformer_blocks.9.norm3.weight",
        "output_blocks.2.2.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
        "output_blocks.8.0.skip_connection.weight": "up_blocks.2.resnets.2.conv_shortcut.weight",
    }
    got = ldm_unet_to_diffusers({k: torch.zeros(1) for k in known}, PRESETS["sdxl"])
    assert got.keys() == {v: 0 for v in known.values()}.keys() and sorted(got) == sorted(known.values())


# ----------------------------------------------------------------------------- loading


def test_load_unet_layouts_and_dtype(tmp_path):
    ref, _ = pair("digits_layout")
    cfg, want = CONFIGS["digits_layout"], ref.state_dict()
    ref.save_pretrained(tmp_path / "pipe" / "unet", max_shard_size="100KB")  # sharded diffusers folder
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ldm = diffusers_unet_to_ldm({k: v.contiguous() for k, v in want.items()}, cfg)
    save_file({f"model.diffusion_model.{k}": v for k, v in ldm.items()} | {"first_stage_model.x": torch.zeros(1)},
              tmp_path / "single.safetensors")
    torch.save({"state_dict": {f"model.diffusion_model.{k}": v for k, v in ldm.items()}}, tmp_path / "single.ckpt")
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "unet", tmp_path / "single.safetensors", tmp_path / "single.ckpt"):
        unet = load_unet(path, cfg)
        assert not unet.training
        got = unet.state_dict()
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), path
    assert all(p.dtype == torch.float16 for p in load_unet(tmp_path / "pipe", cfg, torch.float16).parameters())


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_load_unet_reports_bad_keys(tmp_path, fault):
    ref, _ = pair("digits_layout")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    key = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v.weight"
    expected = {"missing": "missing keys (1)", "unexpected": "unexpected keys (1)", "shape": "shape mismatches (1)"}[fault]
    if fault == "missing":
        del sd[key]
    elif fault == "unexpected":
        key = "up_blocks.0.attentions.7.proj_in.weight"
        sd[key] = torch.zeros(1)
    else:
        sd[key] = torch.zeros(3, 3)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_unet(tmp_path / "bad.safetensors", CONFIGS["digits_layout"])
    assert expected in str(err.value) and key in str(err.value)


def test_load_unet_config_errors(tmp_path):
    ref, _ = pair("digits_layout")
    ref.save_pretrained(tmp_path / "unet")
    heads = UNetConfig(**{**CONFIGS["digits_layout"].__dict__, "num_heads": 2})  # same shapes, other heads
    with pytest.raises(CheckpointError, match="num_heads: config.json 4 vs preset 2"):
        load_unet(tmp_path / "unet", heads)
    raw = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**raw, "class_embed_type": "timestep", "freq_shift": 1,
                                                                "addition_embed_type": "text_image"}))
    with pytest.raises(CheckpointError, match="does not implement") as err:
        load_unet(tmp_path / "unet", CONFIGS["digits_layout"])
    assert all(s in str(err.value) for s in ("class_embed_type='timestep'", "freq_shift=1", "addition_embed_type='text_image'"))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**raw, "use_linear_projection": True}))
    with pytest.raises(CheckpointError, match="use_linear_projection: config.json True vs preset False"):
        load_unet(tmp_path / "unet", CONFIGS["digits_layout"])
    with pytest.raises(ValueError, match="unknown UNet preset"):
        load_unet(tmp_path / "unet", "sd21")
    with pytest.raises(CheckpointError, match="not found"):
        load_unet(tmp_path / "nope.safetensors")
