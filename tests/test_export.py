"""python -m npo_min.export: an exported LoRA loaded by diffusers (load_lora_weights + fuse_lora) gives our fused
UNet; kohya names round-trip through our reader; truncation error as the SVD says."""

import json

import pytest
import torch
import transformers

import diffusers
from conftest import maxerr
from npo_min import export
from npo_min.checkpoint import CheckpointError, read_metadata
from npo_min.guidance import compose_negative
from npo_min.offsets import load_offset, save_delta
from npo_min.pipelines import load_pipeline
from test_sd15 import ckpt  # noqa: F401  (the tiny SD1.5 checkpoint fixture)

LAYERS = [  # Linear attention projections, a feed-forward Linear and a 3x3 conv
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.resnets.1.conv1",
]


def exact_rank_delta(base, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in LAYERS:
        w = base[layer + ".weight"]
        a, b = torch.randn(rank, w[0].numel(), generator=g), torch.randn(w.shape[0], rank, generator=g)
        out[layer + ".weight"] = (0.02 * b @ a).reshape(w.shape)  # (out, r) @ (r, in * kh * kw) -> the weight's shape
    return out


@pytest.fixture(scope="module")
def pipe(ckpt):  # noqa: F811
    return load_pipeline("sd15", str(ckpt["folder"]))


def test_exported_lora_in_diffusers_equals_our_fused_delta(ckpt, pipe, tmp_path):  # noqa: F811
    base = pipe.denoiser.state_dict()
    delta = exact_rank_delta(base, rank=3)
    save_delta({k: base[k] + delta.get(k, 0) for k in base}, base, tmp_path / "run" / "delta.safetensors", {"base": "tiny"})
    export.main([str(tmp_path / "run"), "--model", "sd15", "--weights", str(ckpt["folder"]), "--rank", "3",
                 "--out", str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")])
    meta = json.loads(read_metadata(tmp_path / "lora" / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    assert meta["unet.r"] == meta["unet.lora_alpha"] == 3
    ours = compose_negative(base, delta=delta)
    sd = diffusers.StableDiffusionPipeline(
        vae=ckpt["vae"], text_encoder=ckpt["text"], unet=ckpt["unet"], scheduler=diffusers.DDIMScheduler(),
        tokenizer=transformers.CLIPTokenizer(str(ckpt["tokenizer"] / "vocab.json"), str(ckpt["tokenizer"] / "merges.txt")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors", adapter_name="npo")
    sd.fuse_lora(lora_scale=1.0)
    fused = {k: v for k, v in sd.unet.state_dict().items() if "lora" not in k and "base_layer" not in k}
    fused |= {k.replace(".base_layer", ""): v for k, v in sd.unet.state_dict().items() if ".base_layer." in k}
    err = max(maxerr(fused[k], ours[k]) for k in ours)
    print(f"diffusers load_lora_weights + fuse_lora vs our fused delta: max abs err {err:.3g}")
    assert err <= 1e-5
    assert max(maxerr(fused[k], base[k]) for k in delta) > 1e-3  # the LoRA did change the UNet
    sd.unfuse_lora()


def test_kohya_round_trips_and_truncation_error(ckpt, pipe, tmp_path):  # noqa: F811
    base = pipe.denoiser.state_dict()
    delta = exact_rank_delta(base, rank=2, seed=1)
    report = export.export(delta, base, tmp_path / "k.safetensors", rank=2, fmt="kohya")
    assert report["overall"] < 1e-6 and not report["dropped"]
    back = load_offset(tmp_path / "k.safetensors", base)
    assert sorted(back) == sorted(delta) and max(maxerr(back[k], delta[k]) for k in delta) <= 1e-6
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_offset(tmp_path / "k.safetensors", {k: v + 1 for k, v in base.items()})
    # a full-rank offset (every weight and bias): the error falls with the rank as the SVD's tail says
    g = torch.Generator().manual_seed(2)
    full = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    errs = [export.to_lora(full, r)[1]["overall"] for r in (1, 4, 16)]
    assert 0 < errs[2] < errs[1] < errs[0] < 1
    layer = LAYERS[0] + ".weight"
    s = torch.linalg.svdvals(full[layer].double())
    up, down, err = export.low_rank(full[layer], 4)
    assert abs(err - (s[4:].square().sum() / s.square().sum()).sqrt().item()) < 1e-6  # Eckart-Young
    tensors, rep = export.to_lora(full, 4)
    assert rep["dropped"] and all(not k.endswith(".weight") or full[k].ndim not in (2, 4) for k in rep["dropped"])


def test_export_errors(pipe, tmp_path):
    base = pipe.denoiser.state_dict()
    with pytest.raises(ValueError, match="rank"):
        export.to_lora(exact_rank_delta(base, 1), 0)
    with pytest.raises(ValueError, match="no matrix-shaped"):
        export.to_lora({"conv_in.bias": torch.ones(base["conv_in.bias"].shape)}, 4)
