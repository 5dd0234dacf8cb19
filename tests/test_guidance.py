"""npo_min.guidance: CFG (Diffusion-NPO Eq. 3/9, Self-NPO Eq. 4), guided_denoiser, theta_neg composition (Eq. 10 / 7)."""

import pytest
import torch

from npo_min.guidance import cfg, compose_negative, guided_denoiser
from npo_min.offsets import difference


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.0, 7.5, -1.0])
def test_cfg_formula(scale):
    pos, neg = _randn(3, 4, 5, seed=1), _randn(3, 4, 5, seed=2)
    w = scale - 1.0  # the paper's w
    expected = (w + 1) * pos - w * neg  # Self-NPO Eq. 4
    torch.testing.assert_close(cfg(pos, neg, scale), expected, rtol=0, atol=1e-13)
    # the diffusers pipeline form
    torch.testing.assert_close(cfg(pos, neg, scale), neg + scale * (pos - neg), rtol=0, atol=1e-13)


def test_cfg_scale_one_is_positive():
    pos, neg = _randn(2, 3, seed=1), _randn(2, 3, seed=2)
    torch.testing.assert_close(cfg(pos, neg, 1.0), pos, rtol=0, atol=0)
    torch.testing.assert_close(cfg(pos, neg, 0.0), neg, rtol=0, atol=0)


class CountingModel(torch.nn.Module):
    """eps = tanh(x * w + t/1000 + mean(context)) per sample (no cross-sample coupling); counts calls."""

    def __init__(self, seed):
        super().__init__()
        self.w = torch.nn.Parameter(_randn(1, 4, 1, 1, seed=seed))
        self.calls = []

    def forward(self, x, t, context):
        self.calls.append(x.shape[0])
        return torch.tanh(x * self.w + t[:, None, None, None] / 1000 + context.mean((1, 2))[:, None, None, None])


def _inputs(B=3):
    x = _randn(B, 4, 2, 2, seed=10)
    t = torch.tensor([999, 500, 1])[:B]
    ctx = _randn(B, 5, 6, seed=11)
    null = _randn(1, 5, 6, seed=12)
    return x, t, ctx, null


@pytest.mark.parametrize("scale", [7.5, 2.0, 0.0])
def test_guided_denoiser_same_module_batched(scale):
    m = CountingModel(0)
    x, t, ctx, null = _inputs()
    with torch.no_grad():
        out = guided_denoiser(m, m, ctx, null, scale)(x, t)
        # one batched pass; scale 0 (the Self-NPO rollout's w = -1) needs only the c' branch
        assert m.calls == ([x.shape[0]] if scale == 0.0 else [2 * x.shape[0]])
        m.calls.clear()
        pos = m(x, t, ctx)
        neg = m(x, t, null.expand(3, -1, -1))
    expected = neg + scale * (pos - neg)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_guided_denoiser_two_models():
    pm, nm = CountingModel(0), CountingModel(1)
    x, t, ctx, null = _inputs()
    with torch.no_grad():
        out = guided_denoiser(pm, nm, ctx, null, 7.5)(x, t)
        assert pm.calls == [3] and nm.calls == [3]  # the positive model never sees c', the negative never c
        pos, neg = pm(x, t, ctx), nm(x, t, null.expand(3, -1, -1))
    torch.testing.assert_close(out, neg + 7.5 * (pos - neg), rtol=0, atol=1e-12)
    # swapping the models changes the result (the test distinguishes pos from neg)
    with torch.no_grad():
        swapped = guided_denoiser(nm, pm, ctx, null, 7.5)(x, t)
    assert (swapped - out).abs().max() > 1e-3


def test_guided_denoiser_scale_one_single_pass():
    pm, nm = CountingModel(0), CountingModel(1)
    x, t, ctx, null = _inputs()
    with torch.no_grad():
        out = guided_denoiser(pm, nm, ctx, null, 1.0)(x, t)
        assert pm.calls == [3] and nm.calls == []
        torch.testing.assert_close(out, pm(x, t, ctx), rtol=0, atol=0)


# ---------------------------------------------------------------- weight composition


def _state(dtype_map, seed):
    shapes = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 4), "norm.weight": (2,)}
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shapes[k], generator=g, dtype=torch.float64).to(dtype_map.get(k, torch.float32)) for k in shapes}


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.3, 0.7), (0.0, 1.0), (1.0, 0.0)])
def test_compose_negative_formula(alpha, beta):
    dtypes = {"a.weight": torch.float16, "b.weight": torch.bfloat16, "a.bias": torch.float32, "norm.weight": torch.float64}
    base = _state(dtypes, 0)
    eta = {k: v.float() * 0.1 for k, v in _state({}, 1).items()}
    delta = {k: v.float() * 0.05 for k, v in _state({}, 2).items()}
    out = compose_negative(base, delta=delta, eta=eta, alpha=alpha, beta=beta)
    assert set(out) == set(base)
    for k in base:
        assert out[k].dtype == base[k].dtype and out[k].shape == base[k].shape
        # theta + alpha eta + beta delta summed in float32 and rounded ONCE to the base dtype (exact match:
        # rounding the partial sum theta + alpha eta to fp16/bf16 first is off by 1 ulp in places).
        # A float64 base is summed in float32 too (documented float32 arithmetic): 1e-6 on O(1) values.
        expected = (base[k].float() + alpha * eta[k].float() + beta * delta[k].float()).to(base[k].dtype)
        tol = 1e-6 if base[k].dtype == torch.float64 else 0
        torch.testing.assert_close(out[k], expected, rtol=0, atol=tol, msg=k)
    assert all(base[k] is not out[k] or (alpha == 0 and beta == 0) for k in base)


def test_compose_negative_subset_and_defaults():
    base = _state({}, 0)
    delta = {"a.weight": torch.ones(4, 3)}
    out = compose_negative(base, delta=delta, beta=0.5)
    torch.testing.assert_close(out["a.weight"], base["a.weight"] + 0.5)
    for k in ("a.bias", "b.weight", "norm.weight"):
        assert torch.equal(out[k], base[k])
    # nothing to add: identical values
    same = compose_negative(base)
    assert all(torch.equal(same[k], base[k]) for k in base)
    # base is not modified in place
    before = {k: v.clone() for k, v in base.items()}
    compose_negative(base, delta={k: torch.ones_like(v) for k, v in base.items()})
    assert all(torch.equal(before[k], base[k]) for k in base)


def test_compose_negative_errors():
    base = _state({}, 0)
    with pytest.raises(ValueError, match="delta has 1 keys the base model lacks"):
        compose_negative(base, delta={"nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"eta\[a.bias\] has shape"):
        compose_negative(base, eta={"a.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="delta"):
        compose_negative(base, delta={"b.weight": torch.zeros(4, 2)})


def test_offset():
    base = _state({"a.weight": torch.float16}, 0)
    weights = {k: v + 0.25 * torch.ones_like(v) * (i + 1) for i, (k, v) in enumerate(base.items())}
    off = difference(weights, base)
    assert set(off) == set(base)
    for i, k in enumerate(base):
        assert off[k].dtype == torch.float32
        torch.testing.assert_close(off[k], weights[k].float() - base[k].float(), rtol=0, atol=0)
        torch.testing.assert_close(off[k], torch.full(base[k].shape, 0.25 * (i + 1)), rtol=0, atol=2e-3)  # fp16 ulp
    # offset then compose (beta = 1) recovers the weights
    back = compose_negative(base, delta=off)
    for k in base:
        torch.testing.assert_close(back[k], weights[k].to(base[k].dtype), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="different keys"):
        difference({**weights, "extra": torch.zeros(1)}, base)
    with pytest.raises(ValueError, match="not the same architecture"):
        difference({**weights, "a.bias": torch.zeros(3)}, base)
