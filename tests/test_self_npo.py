"""npo_min.self_npo: the TDFT training step (Self-NPO Eq. 12-17) against independent re-implementations.

The references below recompute the schedule with numpy (float64), step each sample on its own with
plain Python floats, and consume the same generator draws in the documented order
(rollout: randint(start index) then randn(noise); loss: rand(s) then randn(z)).
"""

import math

import numpy as np
import pytest
import torch

from npo_min import solvers
from npo_min.schedule import NoiseSchedule
from npo_min.self_npo import (
    SelfNPOConfig,
    ddim_grid,
    ema_update,
    sample_s,
    tdft_loss,
    truncated_rollout,
)

T = 1000
SCHED = NoiseSchedule.sd()
AC = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2)  # independent float64 SD schedule


def a_(t):
    return math.sqrt(AC[t])


def s_(t):
    return math.sqrt(1 - AC[t])


class ToyEps(torch.nn.Module):
    """A context-dependent eps model on (B, C, H, W): eps = tanh(w_c * x + u . mean(context) + t / 1000).

    Records the contexts it sees (to check which guidance branches are evaluated)."""

    def __init__(self, C=2, Dc=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(1, C, 1, 1, generator=g, dtype=torch.float64) * 0.5)
        self.u = torch.nn.Parameter(torch.randn(Dc, C, generator=g, dtype=torch.float64))
        self.seen = []

    def forward(self, x, t, context):
        self.seen.append((context.detach().clone(), t.clone()))
        c = (context.mean(1) @ self.u)[:, :, None, None]  # (B, C, 1, 1)
        return torch.tanh(self.w * x + c + t.to(x.dtype)[:, None, None, None] / 1000)


def _data(B=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64)
    cond = torch.randn(B, 4, 3, generator=g, dtype=torch.float64)
    null = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    return x0, cond, null


# ---------------------------------------------------------------- grid / config / s


def test_ddim_grid():
    g = ddim_grid(25)
    assert g.tolist() == list(range(39, 1000, 40)) and g[0] == 39 and g[-1] == 999 and len(g) == 25
    assert ddim_grid(10).tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert ddim_grid(1).tolist() == [999]
    # the grid equals the trailing DDIM timesteps of the solvers (reversed)
    assert g.flip(0).tolist() == solvers.make_timesteps(25, "trailing")


def test_config_defaults_and_validation():
    c = SelfNPOConfig()
    assert (c.num_grid, c.k, c.rollout_w, c.ema_rate, c.start, c.renoise, c.loss, c.huber_c) == \
        (25, 5, -1.0, 0.999, "data", "eq16", "huber", 0.001)
    SelfNPOConfig(k=25)  # K = N allowed (full simulation)
    SelfNPOConfig(k=1)
    bad = [dict(k=0), dict(k=26), dict(k=3, num_grid=2), dict(start="latent"), dict(renoise="eq17"), dict(loss="l1"),
           dict(ema_rate=1.0), dict(ema_rate=-0.1), dict(cond_drop=1.5), dict(num_grid=0, k=0)]
    for kw in bad:
        with pytest.raises(ValueError):
            SelfNPOConfig(**kw)


def test_sample_s_range_and_uniformity():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 39, 500, 959, 998, 999]).repeat(2000)
    s = sample_s(t, T, g)
    assert s.dtype == torch.long and s.shape == t.shape
    assert ((s >= t + 1) | (t == T - 1)).all() and (s <= T - 1).all()
    assert (s[t == 999] == 999).all() and (s[t == 998] == 999).all()
    # uniformity for a fixed t = 899: 100 equally likely values. Pearson chi-square with 99 dof has
    # mean 99, sd 14; bound 99 + 5 sd = 169 (a fixed seed, so deterministic; a wrong range or a bias
    # toward either end gives chi-square in the thousands at n = 50000).
    n = 50_000
    s = sample_s(torch.full((n,), 899), T, torch.Generator().manual_seed(1))
    counts = torch.bincount(s - 900, minlength=100).double()
    assert counts.shape == (100,) and (s >= 900).all() and (s <= 999).all()
    chi2 = ((counts - n / 100) ** 2 / (n / 100)).sum().item()
    assert chi2 < 169, chi2
    # t = 0: mean of U{1..999} is 500, sd 288 -> SE of the mean 288 / sqrt(n) = 1.3; 5 SE = 6.5
    s0 = sample_s(torch.zeros(n, dtype=torch.long), T, torch.Generator().manual_seed(2))
    assert abs(s0.double().mean().item() - 500) < 6.5 and s0.min() == 1 and s0.max() == 999


# ---------------------------------------------------------------- truncated rollout


def reference_rollout(model, x0, cond, null, cfg, seed):
    """Per-sample DDIM on the grid, with plain float coefficients from the numpy schedule."""
    g = torch.Generator().manual_seed(seed)
    B, N = x0.shape[0], cfg.num_grid
    grid = [(i + 1) * (T // N) - 1 for i in range(N)]
    if cfg.start == "data":
        idx0 = torch.randint(0, N, (B,), generator=g).tolist()
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    else:
        idx0 = [N - 1] * B
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    xs, ts, x0s = [], [], []
    for b in range(B):
        j = idx0[b]
        t = grid[j]
        x = (a_(t) * x0[b] + s_(t) * noise[b]) if cfg.start == "data" else noise[b].clone()
        c, u = cond[b : b + 1], null[0:1]
        for step in range(cfg.k + 1):
            t = grid[j] if j >= 0 else 0
            tt = torch.tensor([t])
            if cfg.rollout_w == -1.0:
                eps = model(x[None], tt, u)[0]
            elif cfg.rollout_w == 0.0:
                eps = model(x[None], tt, c)[0]
            else:
                ec, eu = model(x[None], tt, c)[0], model(x[None], tt, u)[0]
                eps = ec + cfg.rollout_w * (ec - eu)
            x0_hat = (x - s_(t) * eps) / a_(t)
            if step == cfg.k:
                break
            if j >= 0:  # samples already at t = 0 stop moving
                t_prev = grid[j - 1] if j >= 1 else 0
                x = a_(t_prev) * x0_hat + s_(t_prev) * eps
                j -= 1
        xs.append(x), ts.append(t), x0s.append(x0_hat)
    return torch.stack(xs), torch.tensor(ts), torch.stack(x0s), idx0


@pytest.mark.parametrize("w", [-1.0, 0.0, 1.5])
@pytest.mark.parametrize("start,k", [("data", 5), ("data", 12), ("noise", 3)])
def test_truncated_rollout_vs_reference(start, k, w):
    x0, cond, null = _data()
    cfg = SelfNPOConfig(k=k, start=start, rollout_w=w)
    model = ToyEps()
    x, t, tgt = truncated_rollout(model, x0, cond, null, SCHED, cfg, torch.Generator().manual_seed(5))
    rx, rt, rtgt, idx0 = reference_rollout(ToyEps(), x0, cond, null, cfg, seed=5)
    assert t.dtype == torch.long and t.tolist() == rt.tolist()
    # float64 throughout; different operation order only
    torch.testing.assert_close(x, rx, rtol=0, atol=1e-10)
    torch.testing.assert_close(tgt, rtgt, rtol=0, atol=1e-10)
    # end timesteps: K grid steps down from the start, or t = 0 once the grid is exhausted
    for b in range(len(idx0)):
        assert t[b].item() == (40 * (idx0[b] - k + 1) - 1 if idx0[b] - k >= 0 else 0)
    # K + 1 model evaluations, of only the branches w needs (checked by the contexts seen): one branch for
    # w = -1 (c') and w = 0 (c), else both in one batched pass on [c', c] (guidance.guided_denoiser)
    assert len(model.seen) == k + 1
    ctxs = [c for c, _ in model.seen]
    nulls = null.expand(len(x0), -1, -1)
    if w == -1.0:
        assert all(torch.equal(c, nulls) for c in ctxs)
    elif w == 0.0:
        assert all(torch.equal(c, cond) for c in ctxs)
    else:
        assert all(torch.equal(c, torch.cat([nulls, cond])) for c in ctxs)
    if start == "noise":
        assert (model.seen[0][1] == 999).all()


def test_rollout_from_noise_ignores_data_and_starts_at_999():
    x0, cond, null = _data()
    cfg = SelfNPOConfig(k=1, start="noise", rollout_w=0.0)
    calls = []

    def model(x, t, c):
        calls.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    out1 = truncated_rollout(model, x0, cond, null, SCHED, cfg, torch.Generator().manual_seed(3))
    first_x, first_t = calls[0]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=x0.dtype)
    assert (first_t == 999).all() and torch.equal(first_x, noise)  # pure noise at t = 999
    assert (out1[1] == 959).all()
    out2 = truncated_rollout(model, 100 * x0 + 7, cond, null, SCHED, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(out1[0], out2[0])  # the data does not enter


def test_samples_at_end_stop_moving():
    """With K = 10 and K = 20 every sample started at grid index < 10 is at t = 0 in both runs, and
    sits at the same x (it stopped moving); its target is the Tweedie estimate at t = 0."""
    x0, cond, null = _data(B=40)
    m = ToyEps()
    g = lambda: torch.Generator().manual_seed(11)
    x10, t10, tg10 = truncated_rollout(m, x0, cond, null, SCHED, SelfNPOConfig(k=10), g())
    x20, t20, tg20 = truncated_rollout(m, x0, cond, null, SCHED, SelfNPOConfig(k=20), g())
    done = t10 == 0
    assert 0 < done.sum() < 40  # some done, some not (seeded)
    assert (t20[done] == 0).all()
    torch.testing.assert_close(x10[done], x20[done], rtol=0, atol=0)
    torch.testing.assert_close(tg10[done], tg20[done], rtol=0, atol=0)
    assert not torch.allclose(x10[~done], x20[~done])


def test_full_simulation_ends_at_zero_and_equals_ddim_solver():
    """K = N from noise: every sample reaches t = 0 (alphas_cumprod[0]); the state equals the DDIM solver's
    output on the trailing grid with set_alpha_to_one = False (diffusers-checked in test_solvers)."""
    x0, cond, null = _data(B=6)
    N = 25
    cfg = SelfNPOConfig(num_grid=N, k=N, start="noise", rollout_w=2.0)
    m = ToyEps()
    x, t, tgt = truncated_rollout(m, x0, cond, null, SCHED, cfg, torch.Generator().manual_seed(4))
    assert (t == 0).all()
    assert len(m.seen) == N + 1 and all(len(c) == 2 * len(x0) for c, _ in m.seen)  # both branches, one batched pass a step

    def denoise(xx, tt):
        ec, eu = m(xx, tt, cond), m(xx, tt, null.expand(6, -1, -1))
        return ec + 2.0 * (ec - eu)

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=x0.dtype)
    ref = solvers.ddim(denoise, noise, solvers.make_timesteps(N, "trailing"), SCHED)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("renoise", ["eq16", "eq15"])
@pytest.mark.parametrize("loss", ["huber", "l2"])
def test_tdft_loss_hand_computation(renoise, loss):
    g0 = torch.Generator().manual_seed(0)
    B = 8
    x_t = torch.randn(B, 2, 3, 3, generator=g0, dtype=torch.float64)
    x0_tgt = torch.randn(B, 2, 3, 3, generator=g0, dtype=torch.float64) * 0.5
    cond = torch.randn(B, 4, 3, generator=g0, dtype=torch.float64)
    null = torch.zeros(1, 4, 3, dtype=torch.float64)
    t = torch.tensor([0, 39, 79, 500, 919, 959, 998, 999])
    cfg = SelfNPOConfig(renoise=renoise, loss=loss, huber_c=0.05)
    student = ToyEps(seed=1)
    got = tdft_loss(student, x_t, t, x0_tgt, cond, null, SCHED, cfg, torch.Generator().manual_seed(9))

    # hand computation with the same draws: u ~ rand (float64), then z ~ randn
    g = torch.Generator().manual_seed(9)
    u = torch.rand(B, generator=g, dtype=torch.float64)
    z = torch.randn(x_t.shape, generator=g, dtype=torch.float64)
    per_sample = []
    for b in range(B):
        tb = int(t[b])
        sb = min(tb + 1 + math.floor(u[b].item() * (T - 1 - tb)), T - 1)
        assert tb < sb or tb == T - 1
        at, st, as_, ss = a_(tb), s_(tb), a_(sb), s_(sb)
        if renoise == "eq16":  # Eq. 16 as written in the paper
            xs = as_ / at * x_t[b] + math.sqrt(ss**2 - st**2 * as_**2 / at**2) * z[b]
        else:  # Eq. 15
            xs = as_ * x0_tgt[b] + ss * z[b]
        eps = ToyEps(seed=1)(xs[None], torch.tensor([sb]), cond[b : b + 1])[0]
        d = (xs - ss * eps) / as_ - x0_tgt[b]
        per_sample.append(torch.sqrt(d**2 + 0.05**2) - 0.05 if loss == "huber" else d**2)
    expected = torch.stack(per_sample).mean()
    # tdft_loss forms the residual in float32 (mixed-precision training): relative 1e-6
    assert got.dtype == torch.float32
    assert abs(got.item() - expected.item()) < 1e-6 * max(1.0, abs(expected.item()))
    # differentiable w.r.t. the student only
    got.backward()
    assert student.w.grad is not None and student.w.grad.abs().sum() > 0


def test_tdft_eq15_and_eq16_differ_and_huber_is_not_l2():
    g0 = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 2, 3, 3, generator=g0, dtype=torch.float64)
    x0_tgt = torch.randn(4, 2, 3, 3, generator=g0, dtype=torch.float64)
    cond = torch.randn(4, 4, 3, generator=g0, dtype=torch.float64)
    t = torch.tensor([100, 200, 300, 400])
    vals = {}
    for r in ("eq15", "eq16"):
        for l in ("huber", "l2"):
            vals[r, l] = tdft_loss(ToyEps(), x_t, t, x0_tgt, cond, cond[:1], SCHED, SelfNPOConfig(renoise=r, loss=l),
                                   torch.Generator().manual_seed(1)).item()
    assert len({round(v, 8) for v in vals.values()}) == 4


def test_tdft_cond_drop_uses_null_context():
    g0 = torch.Generator().manual_seed(0)
    x_t = torch.randn(5, 2, 3, 3, generator=g0, dtype=torch.float64)
    cond = torch.randn(5, 4, 3, generator=g0, dtype=torch.float64)
    null = torch.randn(1, 4, 3, generator=g0, dtype=torch.float64)
    t = torch.full((5,), 500)
    for p, expect_null in ((1.0, True), (0.0, False)):
        m = ToyEps()
        tdft_loss(m, x_t, t, x_t, cond, null, SCHED, SelfNPOConfig(cond_drop=p), torch.Generator().manual_seed(0))
        (ctx, s), = m.seen
        assert torch.equal(ctx, null.expand(5, -1, -1) if expect_null else cond)
        assert ((s > 500) & (s < 1000)).all()


# ---------------------------------------------------------------- EMA


def test_ema_update():
    torch.manual_seed(0)
    target, student = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, student, 0.9)
    for b, p_t, p_s in zip(before, target.parameters(), student.parameters()):
        torch.testing.assert_close(p_t, 0.9 * b + 0.1 * p_s.detach(), rtol=0, atol=1e-7)
    ema_update(target, student, 0.0)  # rate 0 copies the student
    for p_t, p_s in zip(target.parameters(), student.parameters()):
        torch.testing.assert_close(p_t, p_s, rtol=0, atol=1e-7)
    # repeated updates converge geometrically: after n steps the gap is rate^n of the initial one
    target2 = torch.nn.Linear(3, 4)
    gap0 = [(pt - ps).detach().clone() for pt, ps in zip(target2.parameters(), student.parameters())]
    for _ in range(10):
        ema_update(target2, student, 0.999)
    for g, pt, ps in zip(gap0, target2.parameters(), student.parameters()):
        torch.testing.assert_close(pt - ps, g * 0.999**10, rtol=1e-4, atol=1e-7)
