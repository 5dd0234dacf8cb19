"""LoRA training mode (npo_min/lora.py) and PEFT's per-layer alpha_pattern / rank_pattern in npo_min/offsets.py,
against diffusers + peft (test-only oracles) on a tiny random UNet."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import diffusers
import train
from conftest import maxerr, randomize_, unet_kwargs, write_random_digits_base
from npo_min.checkpoint import CheckpointError, load_into, read_metadata
from npo_min.guidance import compose_negative
from npo_min.lora import (DEFAULT_TARGETS, LORA_FILE, add_lora, base_state_dict, lora_disabled, lora_state_dict,
                          merged_offset, save_lora)
from npo_min.offsets import load_offset, lora_to_delta
from npo_min.unet import UNet2DConditionModel, UNetConfig

CFG = UNetConfig(block_out_channels=(16, 32), cross_attn=(True, True), layers_per_block=1, num_heads=2,
                 cross_attention_dim=16, norm_num_groups=8, in_channels=4, out_channels=4)
TOL = 1e-5


def models(seed=0):
    """(diffusers UNet, our UNet) with identical random weights."""
    torch.manual_seed(seed)
    ref = randomize_(diffusers.UNet2DConditionModel(**unet_kwargs(CFG)), seed).eval()
    ours = UNet2DConditionModel(CFG).eval()
    load_into(ours, ref.state_dict(), "tiny")
    return ref, ours


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 16, generator=g)


def randomize_lora_(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_add_lora_starts_at_base_trains_only_adapters_and_matches_merged_weights():
    _, ours = models()
    x, t, c = inputs()
    base = copy.deepcopy(ours.state_dict())
    with torch.no_grad():
        want = ours(x, t, c)
    layers = add_lora(ours, rank=3, alpha=6.0)
    attns = [n for n, _ in ours.named_modules() if n.endswith((".attn1", ".attn2"))]
    assert len(layers) == 4 * len(attns) and all(n.endswith(DEFAULT_TARGETS) for n in layers)
    assert base_state_dict(ours).keys() == base.keys()  # the base keeps its state-dict names
    with torch.no_grad():
        assert maxerr(ours(x, t, c), want) == 0.0  # B = 0 at init
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    randomize_lora_(ours)
    merged = UNet2DConditionModel(CFG).eval()
    merged.load_state_dict(compose_negative(base, delta=merged_offset(ours)))
    with torch.no_grad():
        got, expected = ours(x, t, c), merged(x, t, c)
        with lora_disabled(ours):
            assert maxerr(ours(x, t, c), want) == 0.0
    assert maxerr(got, expected) <= TOL and maxerr(got, want) > 1e-3


def test_lora_targets_errors():
    _, ours = models()
    with pytest.raises(ValueError, match="match no module"):
        add_lora(ours, 2, targets=("to_zz",))
    with pytest.raises(ValueError, match="not Linear"):
        add_lora(ours, 2, targets=("conv_in",))
    with pytest.raises(ValueError, match="rank"):
        add_lora(ours, 0)


def test_saved_lora_loads_in_diffusers_and_in_load_offset(tmp_path):
    """Our file (PEFT names + lora_adapter_metadata) in diffusers' load_lora_adapter + fuse_lora == our adapted model;
    load_offset gives the same delta and refuses another base."""
    ref, ours = models()
    base = copy.deepcopy(ours.state_dict())
    add_lora(ours, rank=4, alpha=2.0, targets=("to_q", "to_v", "to_out.0", "ff.net.2"))
    randomize_lora_(ours)
    path = save_lora(ours, base, tmp_path / LORA_FILE, {"base": "tiny"})
    meta = read_metadata(path)
    assert meta["format"] == "npo_min.lora.v1" and json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 2.0
    delta = load_offset(tmp_path, base)  # the folder: pytorch_lora_weights.safetensors is found
    want = merged_offset(ours)
    assert sorted(delta) == sorted(want) and max(maxerr(delta[k], want[k]) for k in want) <= 1e-7
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_offset(path, {k: v + 1 for k, v in base.items()})
    x, t, c = inputs()
    ref.load_lora_adapter(str(tmp_path), weight_name=LORA_FILE, prefix="unet", adapter_name="npo")
    with torch.no_grad():
        got = ours(x, t, c)
        active = ref(x, t, encoder_hidden_states=c).sample
        ref.fuse_lora(lora_scale=1.0)
        fused = ref(x, t, encoder_hidden_states=c).sample
    print(f"our LoRA vs diffusers: adapter {maxerr(got, active):.3g}, fused {maxerr(got, fused):.3g}")
    assert maxerr(got, active) <= TOL and maxerr(got, fused) <= TOL


def test_peft_alpha_pattern_and_rank_pattern_are_honoured(tmp_path):
    """A PEFT LoRA with per-layer alpha and rank: load_offset's theta + delta == peft's adapted diffusers UNet.
    Without the pattern (one lora_alpha for every layer) the result is measurably different."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    ref, ours = models()
    base = ours.state_dict()
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False,
                             alpha_pattern={"attn2.to_k": 16, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 1},
                             rank_pattern={"to_v": 2})
    ref.add_adapter(config, adapter_name="default")
    sd = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(ref).items()}
    raw = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    meta = {f"unet.{k}": v for k, v in raw.items() if isinstance(v, (int, float, str, list, dict, bool)) or v is None}
    save_file(sd, tmp_path / "lora.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    delta = load_offset(tmp_path / "lora.safetensors", base)
    assert delta["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight"].shape == (16, 16)
    x, t, c = inputs()
    merged = UNet2DConditionModel(CFG).eval()
    merged.load_state_dict(compose_negative(base, delta=delta))
    flat = UNet2DConditionModel(CFG).eval()  # the old behaviour: lora_alpha everywhere
    flat.load_state_dict(compose_negative(base, delta=lora_to_delta(sd, base, alpha=4)))
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=c).sample
        got, wrong = merged(x, t, c), flat(x, t, c)
    print(f"alpha_pattern: {maxerr(got, expected):.3g}; ignoring it: {maxerr(wrong, expected):.3g}")
    assert maxerr(got, expected) <= TOL and maxerr(wrong, expected) > 1e-3
    bad = json.dumps({**meta, "unet.rank_pattern": {"to_v": 3}})
    save_file(sd, tmp_path / "bad.safetensors", metadata={"lora_adapter_metadata": bad})
    with pytest.raises(CheckpointError, match="rank_pattern"):
        load_offset(tmp_path / "bad.safetensors", base)


def test_peft_save_pretrained_folder(tmp_path):
    """PEFT's own folder layout (adapter_model.safetensors + adapter_config.json with alpha_pattern) reads the same."""
    peft = pytest.importorskip("peft")
    _, ours = models()
    base = ours.state_dict()
    wrapped = peft.get_peft_model(copy.deepcopy(ours), peft.LoraConfig(
        r=2, lora_alpha=2, target_modules=["to_q", "to_k"], alpha_pattern={"to_k": 8}, init_lora_weights=False))
    wrapped.save_pretrained(tmp_path / "adapter")
    delta = load_offset(tmp_path / "adapter", base)
    merged = wrapped.merge_and_unload().state_dict()
    assert sorted(delta) == sorted(k for k in base if k.endswith(("to_q.weight", "to_k.weight")))
    assert max(maxerr(base[k] + delta[k], merged[k]) for k in delta) <= 1e-6


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory):
    return write_random_digits_base(tmp_path_factory.mktemp("base"))


def test_train_self_npo_lora_writes_a_small_lora_that_loads_back(digits_base, tmp_path):
    out = tmp_path / "run"
    train.main(["--weights", str(digits_base), "--out", str(out), "--steps", "2", "--batch-size", "4", "--no-progress",
                "--lora-rank", "2", "--lora-alpha", "4"])
    assert not (out / "delta.safetensors").exists() and (out / LORA_FILE).exists()
    meta = read_metadata(out / LORA_FILE)
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 2 and meta["k"] == "5"
    from npo_min.pipelines import load_pipeline
    pipe = load_pipeline("digits", str(digits_base))
    delta = load_offset(out, pipe.denoiser.state_dict(), pipe.read_weights)
    assert delta and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for k in delta)
    assert all(torch.isfinite(v).all() for v in delta.values()) and max(v.abs().max() for v in delta.values()) > 0
    with pytest.raises(SystemExit):
        train.parse_args(["--lora-alpha", "2"])  # alpha without a rank
