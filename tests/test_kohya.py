"""kohya-ss LoRA names on the tiny SDXL and SD1.5 UNets: the LDM (original) module paths kohya-ss uses for SDXL
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`) and the diffusers paths of its SD1.5 LoRAs give
the same offset as the PEFT file they were built from, and diffusers' own kohya reading
(`lora_state_dict` + `load_lora_into_unet` + `fuse_lora`) gives our fused UNet; `npo_min.export --format kohya`
writes LDM names for SDXL. diffusers is the oracle only."""

import copy
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import diffusers
from conftest import maxerr, randomize_, unet_kwargs
from npo_min import export
from npo_min.checkpoint import CheckpointError
from npo_min.offsets import load_offset, lora_to_delta
from npo_min.pipelines.sd15 import PRESETS as SD15
from npo_min.sdxl import PRESETS as SDXL
from npo_min.unet_ldm import ldm_layer_names

pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (requirements-test.txt)")

RANK = 2
# attention (in and out of the blocks), feed-forward, linear / conv proj_in, resnet convs and time projection,
# a 1x1 skip conv, down- and upsampler convs, the time embedding and SDXL's added embedding
SDXL_LAYERS = {  # diffusers module -> the LDM path, written out by hand (tiny: 3 levels, 2 layers per block)
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k": "input_blocks.8.1.transformer_blocks.1.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0": "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.0.proj_in": "output_blocks.3.1.proj_in",
    "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
    "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.4.0.emb_layers.1",
    "down_blocks.2.resnets.0.conv_shortcut": "input_blocks.7.0.skip_connection",
    "up_blocks.2.resnets.1.conv2": "output_blocks.7.0.out_layers.3",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "time_embedding.linear_1": "time_embed.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
SD15_LAYERS = {  # tiny: 4 levels, attention at the first three, 2 layers per block
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": "middle_block.1.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.5.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.resnets.1.conv1": "output_blocks.1.0.in_layers.2",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
}
FAMILIES = {"sdxl": (SDXL["tiny"].unet, SDXL_LAYERS, diffusers.StableDiffusionXLPipeline),
            "sd15": (SD15["tiny"].unet, SD15_LAYERS, diffusers.StableDiffusionPipeline)}


def random_lora(base, layers, seed=0):
    """layer -> (down A, up B), conv LoRAs with the layer's kernel in A and a 1x1 B."""
    g, out = torch.Generator().manual_seed(seed), {}
    for name in layers:
        w = base[name + ".weight"]
        a = 0.05 * torch.randn(RANK, *w.shape[1:], generator=g)  # (r, in) or (r, in, kh, kw)
        b = 0.05 * torch.randn(w.shape[0], RANK, *([1, 1] if w.ndim == 4 else []), generator=g)  # (out, r) or (out, r, 1, 1)
        out[name] = (a, b)
    return out


def fused_by_diffusers(ref, pipeline_cls, path):
    """diffusers' reading of a (kohya) LoRA file into a copy of `ref`, fused: its state dict in module names."""
    unet = copy.deepcopy(ref)
    sd, alphas = pipeline_cls.lora_state_dict(str(path), unet_config=unet.config)
    pipeline_cls.load_lora_into_unet(sd, alphas, unet)
    unet.fuse_lora(lora_scale=1.0)
    return {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kohya_ldm_names_give_the_peft_offset_and_diffusers_fused_unet(family, tmp_path):
    cfg, layers, pipeline_cls = FAMILIES[family]
    ref = randomize_(diffusers.UNet2DConditionModel(**unet_kwargs(cfg)), seed=1).eval()
    base = {k: v.clone() for k, v in ref.state_dict().items()}
    assert {k: v for k, v in ldm_layer_names(base).items() if k in layers} == layers  # the key map, checked by hand
    lora = random_lora(base, layers)
    peft = {f"unet.{n}.lora_{ab}.weight": t for n, (a, b) in lora.items() for ab, t in (("A", a), ("B", b))}
    want = lora_to_delta(peft, base)
    for names in (layers, {n: n for n in layers}):  # LDM paths (kohya SDXL), diffusers paths (kohya SD1.5)
        kohya = {}
        for n, (a, b) in lora.items():
            key = "lora_unet_" + names[n].replace(".", "_")
            kohya |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(float(RANK))}
        save_file(kohya, tmp_path / "kohya.safetensors")
        got = load_offset(tmp_path / "kohya.safetensors", base)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # diffusers' kohya reading of the LDM-named file. diffusers 0.42's _maybe_map_sgm_blocks_to_diffusers finds
    # a block's keys by prefix, so `input_blocks_1_` also collects `input_blocks_11_...` (a KeyError when it
    # reaches block 11): SD1.5's input blocks 10, 11 are left out of this comparison only
    kohya = {}
    for n, (a, b) in lora.items():
        if re.match(r"input_blocks\.1\d\.", layers[n]):
            continue
        key = "lora_unet_" + layers[n].replace(".", "_")
        kohya |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(1.0)}  # scale 1 / r
    save_file(kohya, tmp_path / "kohya_ldm.safetensors")
    ours = load_offset(tmp_path / "kohya_ldm.safetensors", base)
    assert ours and all(torch.allclose(ours[k], want[k] / RANK) for k in ours)
    fused = fused_by_diffusers(ref, pipeline_cls, tmp_path / "kohya_ldm.safetensors")
    err = max(maxerr(fused[k], base[k] + ours.get(k, 0)) for k in base)
    print(f"{family} kohya LDM-named LoRA, ours vs diffusers load_lora_weights + fuse_lora: max abs err {err:.3g}")
    assert err <= 1e-5 and max(maxerr(fused[k], base[k]) for k in ours) > 1e-3


def test_text_encoder_lora_keys_are_refused_in_one_line():
    base = {"conv_in.weight": torch.zeros(4, 4, 3, 3)}
    lora = {"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3), "lora_unet_conv_in.lora_up.weight": torch.zeros(4, 1, 1, 1),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(1, 8),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(1, 8)}
    with pytest.raises(CheckpointError, match="2 of 4 LoRA keys are for a text encoder.*text-encoder LoRAs are not applied") as err:
        lora_to_delta(lora, base)
    assert "\n" not in str(err.value)
    loha = {"lora_unet_conv_in.hada_w1_a": torch.zeros(1, 4), "lora_unet_conv_in.hada_w1_b": torch.zeros(4, 1)}
    with pytest.raises(CheckpointError, match="LyCORIS adapter"):
        lora_to_delta(loha, base)


def test_export_kohya_writes_ldm_names_for_sdxl_that_diffusers_reads(tmp_path):
    for family in ("sdxl", "sd15"):
        cfg, layers, pipeline_cls = FAMILIES[family]
        ref = randomize_(diffusers.UNet2DConditionModel(**unet_kwargs(cfg)), seed=1).eval()
        base = {k: v.clone() for k, v in ref.state_dict().items()}
        lora = random_lora(base, layers, seed=3)
        delta = lora_to_delta({f"{n}.lora_A.weight": a for n, (a, _) in lora.items()} |
                              {f"{n}.lora_B.weight": b for n, (_, b) in lora.items()}, base)  # rank 2: exported exactly
        path = tmp_path / f"{family}.safetensors"
        report = export.export(delta, base, path, rank=RANK, fmt="kohya")
        assert report["overall"] < 1e-6
        with safe_open(path, "pt") as f:
            modules = {k.rsplit(".", 2)[0] for k in f.keys() if k.endswith(".lora_down.weight")}
        names = layers if family == "sdxl" else {n: n for n in layers}  # kohya SD1.5 LoRAs use diffusers paths
        assert modules == {"lora_unet_" + names[n].replace(".", "_") for n in layers}
        back = load_offset(path, base)
        assert sorted(back) == sorted(delta) and max(maxerr(back[k], delta[k]) for k in delta) <= 1e-6
        if family == "sdxl":
            fused = fused_by_diffusers(ref, pipeline_cls, path)
            err = max(maxerr(fused[k], base[k] + delta.get(k, 0)) for k in base)
            print(f"export --format kohya (sdxl, LDM names) read by diffusers vs our delta: max abs err {err:.3g}")
            assert err <= 1e-5
