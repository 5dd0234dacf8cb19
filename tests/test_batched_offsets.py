"""npo_min.batched_offsets: one-pass NPO guidance equals the two-model result (Diffusion-NPO Eq. 9, 10).

Tiny SD1.5-structured UNets (the sd15 "tiny" preset and the digits preset), fp32. The reference is always
the two-model path: theta + eta and theta + alpha eta + beta delta as full weights (guidance.negative_model).
"""

import pytest
import torch
from safetensors.torch import save_file

from npo_min.batched_offsets import BranchedDenoiser, LowRankOffset, load_offset_factors, npo_denoisers, truncated_svd
from npo_min.checkpoint import CheckpointError
from npo_min.guidance import compose_negative, guided_denoiser, negative_model
from npo_min.offsets import lora_to_delta
from npo_min.pipelines.sd15 import PRESETS as SD15
from npo_min.unet import PRESETS as UNET, UNet2DConditionModel

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_unet(config="tiny"):
    torch.manual_seed(0)
    cfg = SD15["tiny"].unet if config == "tiny" else UNET[config]
    unet = UNet2DConditionModel(cfg).eval()
    with torch.no_grad():  # norms away from their (1, 0) init, so norm offsets and base interact
        for i, p in enumerate(unet.parameters()):
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=_gen(i)))
    return unet


def lora_factors_for(unet, layers, rank, seed, scale=0.2):
    """Random LoRA factors {layer: (up (out, r), down (r, in * kh * kw))} on the named layers, the product's
    entries about `scale` times the layer weight's (a strong but realistic offset)."""
    mods, g, out = dict(unet.named_modules()), _gen(seed), {}
    for name in layers:
        w = mods[name].weight
        up = scale * w.detach().std() / rank**0.5 * torch.randn(w.shape[0], rank, generator=g)
        out[name] = (up, torch.randn(rank, w[0].numel(), generator=g))
    return out


def attention_layers(unet):
    return [n for n, _ in unet.named_modules() if n.endswith(ATTN) and ".attn" in n]


def conv_layers(unet):
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)][:6]


def inputs(unet, B=2, seed=3):
    g, cfg = _gen(seed), unet.cfg
    x = torch.randn(B, cfg.in_channels, 8, 8, generator=g)
    cond = torch.randn(B, 4, cfg.cross_attention_dim, generator=g)
    null = torch.randn(1, 4, cfg.cross_attention_dim, generator=g)
    return x, torch.tensor([999, 321])[:B], cond, null


def reference(unet, eta, delta, alpha, beta, x, t, cond, null, scale):
    """The two-model result with dense offsets."""
    base = unet.state_dict()
    dense = lambda o: o.to_dense(base) if isinstance(o, LowRankOffset) else o  # noqa: E731
    neg = negative_model(unet, base, dense(delta) if delta is not None else None, dense(eta) if eta is not None else None, alpha, beta)
    pos = negative_model(unet, base, eta=dense(eta)) if eta is not None else unet
    with torch.no_grad():
        return guided_denoiser(pos, neg, cond, null, scale)(x, t)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("config", ["tiny", "digits"])
@pytest.mark.parametrize("scale", [7.5, 1.0, 0.0])
def test_one_pass_equals_two_models_lora_eta_and_delta(config, scale):
    """The authors' LoRA shape (attention projections) for delta, a conv + attention LoRA for eta, both present."""
    unet = make_unet(config)
    x, t, cond, null = inputs(unet)
    if config == "digits":
        cond, null = cond[:, :, : unet.cfg.cross_attention_dim], null
    delta = LowRankOffset(lora_factors_for(unet, attention_layers(unet), 8, seed=1))
    eta = LowRankOffset(lora_factors_for(unet, conv_layers(unet) + attention_layers(unet)[:4], 4, seed=2))
    alpha, beta = 0.5, 2.0
    want = reference(unet, eta, delta, alpha, beta, x, t, cond, null, scale)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    pos, neg, how = npo_denoisers(unet, eta, delta, alpha, beta)
    assert how.startswith("one-pass")
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.no_grad():
        got = guided_denoiser(pos, neg, cond, null, scale)(x, t)
    handle.remove()
    assert calls == [2 * len(x)] if scale not in (0.0, 1.0) else calls == [len(x)]  # one batched pass per step
    err = rel(got, want)
    print(f"{config} scale {scale}: one-pass vs two-model relative error {err:.2g}")
    assert err <= 1e-5
    assert rel(got, reference(unet, None, None, 1, 1, x, t, cond, null, scale)) > 1e-3  # the offsets matter
    # the base model is untouched and computes theta outside the one-pass denoiser
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    fresh = UNet2DConditionModel(unet.cfg).eval()
    fresh.load_state_dict(before)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, cond), fresh(x, t, cond), rtol=0, atol=0)


def test_swapped_branches_and_per_sample_rows():
    """Each sample gets its own branch: a mixed mask equals the positive / negative model per sample."""
    unet = make_unet()
    x, t, cond, null = inputs(unet, B=2)
    delta = LowRankOffset(lora_factors_for(unet, attention_layers(unet), 8, seed=1))
    eta = LowRankOffset(lora_factors_for(unet, conv_layers(unet), 4, seed=2))
    owner = BranchedDenoiser(unet, eta, delta, alpha=0.3, beta=1.5)
    base = unet.state_dict()
    pos_m = negative_model(unet, base, eta=eta.to_dense(base))
    neg_m = negative_model(unet, base, delta.to_dense(base), eta.to_dense(base), 0.3, 1.5)
    with torch.no_grad():
        got = owner(x, t, cond, torch.tensor([True, False]))
        want = torch.cat([neg_m(x[:1], t[:1], cond[:1]), pos_m(x[1:], t[1:], cond[1:])])
    assert rel(got, want) <= 1e-5
    owner.remove()
    with torch.no_grad():
        torch.testing.assert_close(owner(x, t, cond, True), unet(x, t, cond), rtol=0, atol=0)  # hooks gone: theta


def test_svd_delta_with_dense_biases_and_norms():
    """A full delta (every key: weights, biases, norm parameters) cut by truncated SVD: one-pass equals the two-model
    result with the cut delta; at full rank the cut is exact; an all-zero weight gets no factors."""
    unet = make_unet()
    x, t, cond, null = inputs(unet)
    base = unet.state_dict()
    g = _gen(5)
    delta = {k: 0.02 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in base.items()}
    delta["conv_in.weight"].zero_()
    low, err = truncated_svd(delta, 4)
    assert 0.1 < err < 1 and "conv_in" not in low.factors and "conv_in.bias" in low.dense and low.rank == 4
    want = reference(unet, None, low, 1.0, 1.5, x, t, cond, null, 7.5)
    pos, neg, how = npo_denoisers(unet, delta=low, beta=1.5)
    with torch.no_grad():
        got = guided_denoiser(pos, neg, cond, null, 7.5)(x, t)
    assert how.startswith("one-pass") and rel(got, want) <= 1e-5
    pos.owner.remove()
    full, err_full = truncated_svd(delta, 10_000)
    assert err_full < 1e-6
    dense = full.to_dense(base)
    assert dense.keys() == delta.keys() - {"conv_in.weight"}  # the zero weight is dropped
    assert max((dense[k] - delta[k]).abs().max().item() for k in dense) < 1e-6
    with pytest.raises(ValueError, match="--delta-rank"):
        truncated_svd(delta, 0)


def test_lora_mode_dense_delta_is_recovered_exactly():
    """A delta saved densely from a LoRA (zeros off the LoRA layers): rank-8 SVD recovers it (error ~ 0)."""
    unet = make_unet()
    base = unet.state_dict()
    lora = lora_factors_for(unet, attention_layers(unet), 8, seed=7)
    dense = {k: torch.zeros_like(v) for k, v in base.items()}
    dense.update(LowRankOffset(lora).to_dense(base))
    low, err = truncated_svd(dense, 8)
    assert err < 1e-6 and sorted(low.factors) == sorted(lora)
    x, t, cond, null = inputs(unet)
    pos, neg, _ = npo_denoisers(unet, delta=low)
    with torch.no_grad():
        got = guided_denoiser(pos, neg, cond, null, 7.5)(x, t)
    assert rel(got, reference(unet, None, dense, 1.0, 1.0, x, t, cond, null, 7.5)) <= 1e-5


def test_paths_chosen_automatically(capsys):
    unet = make_unet()
    base = unet.state_dict()
    x, t, cond, null = inputs(unet)
    delta = {k: 0.01 * torch.randn(v.shape, generator=_gen(1)) for k, v in base.items()}
    pos, neg, how = npo_denoisers(unet, delta=delta)
    assert how.startswith("two-model") and "GiB" in how and isinstance(neg, torch.nn.Module) and pos is unet
    with pytest.raises(CheckpointError, match="one-pass"):
        npo_denoisers(make_unet(), delta=delta, one_pass=True)
    # a dense eta with alpha = 1 folds into the base weights: still one pass, same result as two models
    unet = make_unet()
    eta = {k: 0.01 * torch.randn(v.shape, generator=_gen(2)) for k, v in base.items()}
    low = LowRankOffset(lora_factors_for(unet, attention_layers(unet), 8, seed=1))
    want = reference(unet, eta, low, 1.0, 1.0, x, t, cond, null, 7.5)
    pos, neg, how = npo_denoisers(unet, eta=eta, delta=low)
    with torch.no_grad():
        got = guided_denoiser(pos, neg, cond, null, 7.5)(x, t)
    assert how.startswith("one-pass") and rel(got, want) <= 1e-5
    # with alpha != 1 the dense eta needs two models
    assert npo_denoisers(make_unet(), eta=eta, delta=low, alpha=0.5)[2].startswith("two-model")
    # factors for a layer that is not Linear / Conv, or that do not fit
    bad = LowRankOffset({"conv_norm_out": (torch.zeros(32, 1), torch.zeros(1, 1))})
    with pytest.raises(CheckpointError, match="not a Linear"):
        BranchedDenoiser(make_unet(), delta=bad)
    bad = LowRankOffset({"conv_in": (torch.zeros(32, 1), torch.zeros(1, 5))})
    with pytest.raises(CheckpointError, match="do not fit"):
        BranchedDenoiser(make_unet(), delta=bad)


def test_load_offset_factors_reads_lora_and_cuts_deltas(tmp_path):
    unet = make_unet()
    base = unet.state_dict()
    lora = lora_factors_for(unet, attention_layers(unet), 8, seed=1)
    state = {f"unet.{n}.lora.{d}.weight": v.contiguous() for n, (up, down) in lora.items() for d, v in (("up", up), ("down", down))}
    save_file(state, tmp_path / "lora.safetensors")
    off, how = load_offset_factors(tmp_path / "lora.safetensors", base)
    assert isinstance(off, LowRankOffset) and "rank 8" in how and sorted(off.factors) == sorted(lora)
    dense = off.to_dense(base)
    want = lora_to_delta(state, base)
    assert dense.keys() == want.keys() and all(torch.equal(dense[k], want[k]) for k in want)
    # a full model: dense without a rank, factors with one (error printed)
    full = {k: (v + 0.01 * torch.randn(v.shape, generator=_gen(3))).contiguous() for k, v in base.items()}
    save_file(full, tmp_path / "full.safetensors")
    off, how = load_offset_factors(tmp_path / "full.safetensors", base)
    assert not isinstance(off, LowRankOffset) and how.startswith("dense")
    off, how = load_offset_factors(tmp_path / "full.safetensors", base, rank=2)
    assert isinstance(off, LowRankOffset) and off.rank == 2 and "relative error" in how
    composed = compose_negative(base, delta=off.to_dense(base))
    assert all(composed[k].shape == base[k].shape for k in base)


def test_our_lora_mode_file_runs_one_pass(tmp_path):
    """train.py --lora-rank writes PEFT-named factors with alpha and the base fingerprint (npo_min.lora.save_lora):
    they load as factors (alpha / r folded in), run in one pass, and equal the two-model result."""
    import copy

    from npo_min.lora import add_lora, base_state_dict, merged_offset, save_lora

    unet = make_unet()
    base = copy.deepcopy(unet.state_dict())
    adapted = copy.deepcopy(unet)
    add_lora(adapted, rank=4, alpha=2.0, targets=("to_q", "to_v", "to_out.0", "ff.net.2"))
    g = _gen(9)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    path = save_lora(adapted, base_state_dict(adapted), tmp_path / "pytorch_lora_weights.safetensors", {"base": "tiny"})
    off, how = load_offset_factors(tmp_path, base)
    assert isinstance(off, LowRankOffset) and "rank 4" in how
    want_delta = merged_offset(adapted)
    dense = off.to_dense(base)
    assert sorted(dense) == sorted(want_delta) and max((dense[k] - want_delta[k]).abs().max().item() for k in dense) <= 1e-6
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_offset_factors(path, {k: v + 1 for k, v in base.items()})
    x, t, cond, null = inputs(unet)
    want = reference(unet, None, want_delta, 1.0, 1.0, x, t, cond, null, 7.5)
    pos, neg, how = npo_denoisers(unet, delta=off)
    with torch.no_grad():
        got = guided_denoiser(pos, neg, cond, null, 7.5)(x, t)
    assert how.startswith("one-pass") and rel(got, want) <= 1e-5
