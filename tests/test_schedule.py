"""npo_min.schedule: alphas_cumprod, alpha/sigma/nsr, eps/x0/v conversions, Tweedie, Eq. 15/16.

Oracles: diffusers' schedulers (float32 betas), an independent float64 numpy product, and closed-form
Gaussian / Gaussian-mixture posteriors.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from npo_min.schedule import (
    NoiseSchedule,
    add_noise,
    eps_to_x0,
    make_alphas_cumprod,
    renoise_eq15,
    renoise_eq16,
    v_to_eps,
    v_to_x0,
    x0_eps_to_v,
    x0_to_eps,
)

T = 1000
CASES = [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02), ("linear", 0.00085, 0.012)]


def numpy_alphas_cumprod(kind, b0, b1, n=T):
    """Independent float64 reference: the DDPM / LDM beta definitions, written with numpy."""
    betas = np.linspace(b0**0.5, b1**0.5, n) ** 2 if kind == "scaled_linear" else np.linspace(b0, b1, n)
    out, prod = np.empty(n), 1.0
    for i, b in enumerate(betas):  # explicit running product (not np.cumprod / torch.cumprod)
        prod *= 1.0 - b
        out[i] = prod
    return out


# ---------------------------------------------------------------- alphas_cumprod


@pytest.mark.parametrize("kind,b0,b1", CASES)
def test_alphas_cumprod_vs_numpy(kind, b0, b1):
    ours = make_alphas_cumprod(kind, T, b0, b1)
    assert ours.dtype == torch.float64 and ours.shape == (T,)
    # both float64: only rounding-order differences (1000 products -> ~1e-13 relative).
    np.testing.assert_allclose(ours.numpy(), numpy_alphas_cumprod(kind, b0, b1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind,b0,b1", CASES)
@pytest.mark.parametrize("sched_cls", [DDPMScheduler, DDIMScheduler])
def test_alphas_cumprod_vs_diffusers(kind, b0, b1, sched_cls):
    ref = sched_cls(num_train_timesteps=T, beta_start=b0, beta_end=b1, beta_schedule=kind).alphas_cumprod.double()
    ours = make_alphas_cumprod(kind, T, b0, b1)
    # diffusers builds betas and the cumulative product in float32: 1000 float32 products
    # accumulate ~1e-6 relative error (measured 9.3e-7 max for scaled_linear); 5e-6 leaves margin.
    rel = ((ours - ref).abs() / ours).max().item()
    assert rel < 5e-6, rel


def test_sd_schedule_known_values():
    s = NoiseSchedule.sd()
    ac = s.alphas_cumprod
    # Published SD1.5 values (float64): alphas_cumprod[0] = 1 - 0.00085, [999] ~ 0.0046601.
    assert ac[0].item() == pytest.approx(1 - 0.00085, abs=1e-15)
    assert ac[-1].item() == pytest.approx(0.0046601, abs=1e-6)
    assert (ac[1:] < ac[:-1]).all()


def test_make_alphas_cumprod_errors():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_alphas_cumprod("cosine")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        make_alphas_cumprod("linear", 1000, 0.001, 1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        make_alphas_cumprod("linear", 1000, 0.0, 0.02)


# ---------------------------------------------------------------- alpha / sigma / nsr


def test_alpha_sigma_nsr_identities():
    s = NoiseSchedule.sd()
    ref = numpy_alphas_cumprod("scaled_linear", 0.00085, 0.012)
    t = torch.tensor([0, 1, 39, 500, 998, 999])
    a, sg, r = s.alpha(t), s.sigma(t), s.nsr(t)
    assert a.dtype == sg.dtype == r.dtype == torch.float64 and a.shape == (6,)
    np.testing.assert_allclose(a.numpy(), np.sqrt(ref[t.numpy()]), rtol=1e-12)
    np.testing.assert_allclose(sg.numpy(), np.sqrt(1 - ref[t.numpy()]), rtol=1e-12)
    np.testing.assert_allclose((a**2 + sg**2).numpy(), 1.0, atol=1e-14)  # VP
    np.testing.assert_allclose(r.numpy(), (sg / a).numpy(), rtol=1e-13)
    # alpha decreasing, nsr increasing in t over the whole range
    full = torch.arange(T)
    assert (s.alpha(full)[1:] < s.alpha(full)[:-1]).all() and (s.nsr(full)[1:] > s.nsr(full)[:-1]).all()


def test_coefs_and_expand_broadcast():
    s = NoiseSchedule.sd()
    x = torch.zeros(3, 4, 5, 6, dtype=torch.float32)
    t = torch.tensor([0, 400, 999])
    a, sg = s.coefs(t, x)
    assert a.shape == (3, 1, 1, 1) and a.dtype == torch.float32
    np.testing.assert_allclose(a.flatten().numpy(), s.alpha(t).float().numpy())
    np.testing.assert_allclose(sg.flatten().numpy(), s.sigma(t).float().numpy())


@pytest.mark.parametrize("bad", [torch.tensor([-1]), torch.tensor([1000]), torch.tensor([0, 1000]), torch.tensor([3.0])])
def test_timestep_errors(bad):
    s = NoiseSchedule.sd()
    for fn in (s.alpha, s.sigma, s.nsr):
        with pytest.raises(ValueError, match="timesteps must be integers"):
            fn(bad)


# ---------------------------------------------------------------- conversions


def _draw(dtype=torch.float64, shape=(6, 3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = NoiseSchedule.sd()
    x0 = torch.randn(shape, generator=g, dtype=dtype)
    eps = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    a, sg = s.coefs(t, x0)
    return s, t, x0, eps, a, sg


def test_conversion_round_trips():
    s, t, x0, eps, a, sg = _draw()
    x_t = add_noise(x0, eps, a, sg)
    torch.testing.assert_close(x_t, a * x0 + sg * eps, rtol=0, atol=0)
    # float64; largest amplification is 1/alpha_999 ~ 15 -> errors ~1e-14
    torch.testing.assert_close(eps_to_x0(x_t, eps, a, sg), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0_to_eps(x_t, x0, a, sg), eps, rtol=0, atol=1e-12)
    v = x0_eps_to_v(x0, eps, a, sg)
    torch.testing.assert_close(v, a * eps - sg * x0, rtol=0, atol=1e-15)  # the v definition
    torch.testing.assert_close(v_to_x0(x_t, v, a, sg), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(v_to_eps(x_t, v, a, sg), eps, rtol=0, atol=1e-12)
    # cross consistency: eps -> x0 -> eps, v -> eps -> x0
    torch.testing.assert_close(x0_to_eps(x_t, eps_to_x0(x_t, eps, a, sg), a, sg), eps, rtol=0, atol=1e-11)
    torch.testing.assert_close(eps_to_x0(x_t, v_to_eps(x_t, v, a, sg), a, sg), x0, rtol=0, atol=1e-11)


def test_add_noise_and_velocity_vs_diffusers():
    s, t, x0, eps, a, sg = _draw(dtype=torch.float32)
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    # float32 schedules differ by ~1e-6 relative (see above); values are O(1..4)
    torch.testing.assert_close(add_noise(x0, eps, a, sg), ref.add_noise(x0, eps, t), rtol=0, atol=2e-5)
    torch.testing.assert_close(x0_eps_to_v(x0, eps, a, sg), ref.get_velocity(x0, eps, t), rtol=0, atol=2e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_prediction_vs_diffusers_ddim(prediction_type):
    """DDIMScheduler.step's pred_original_sample for eps- and v-prediction."""
    g = torch.Generator().manual_seed(1)
    s = NoiseSchedule.sd()
    ref = DDIMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type=prediction_type)
    ref.set_timesteps(25)
    x = torch.randn(2, 4, 8, 8, generator=g)
    out = torch.randn(2, 4, 8, 8, generator=g)
    for t in (ref.timesteps[0], ref.timesteps[12], ref.timesteps[-1]):
        tt = torch.full((2,), int(t))
        a, sg = s.coefs(tt, x)
        ours = eps_to_x0(x, out, a, sg) if prediction_type == "epsilon" else v_to_x0(x, out, a, sg)
        expected = ref.step(out, t, x).pred_original_sample
        # 1/alpha up to ~15 times float32 schedule differences: 1e-4 abs on O(10) values
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- Tweedie (Eq. 2 / 12)


def _gauss_posterior_mean(x_t, mu, cov, a, sg):
    """E[x0 | x_t] for x0 ~ N(mu, cov): mu + a cov (a^2 cov + sg^2 I)^-1 (x_t - a mu)   (x0-side formula)."""
    d = mu.shape[0]
    S = a**2 * cov + sg**2 * torch.eye(d, dtype=torch.float64)
    return mu + (x_t - a * mu) @ torch.linalg.solve(S, a * cov).T


def _gauss_optimal_eps(x_t, mu, cov, a, sg):
    """E[eps | x_t] = Cov(eps, x_t) Var(x_t)^-1 (x_t - E x_t) = sg (a^2 cov + sg^2 I)^-1 (x_t - a mu)  (eps-side)."""
    d = mu.shape[0]
    S = a**2 * cov + sg**2 * torch.eye(d, dtype=torch.float64)
    return (x_t - a * mu) @ torch.linalg.inv(S).T * sg


@pytest.mark.parametrize("d", [1, 3])
def test_tweedie_gaussian(d):
    g = torch.Generator().manual_seed(d)
    s = NoiseSchedule.sd()
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = L @ L.T + 0.1 * torch.eye(d, dtype=torch.float64)
    x_t = torch.randn(50, d, generator=g, dtype=torch.float64) * 2
    for t in (0, 200, 600, 999):
        a, sg = s.alpha(torch.tensor(t)).item(), s.sigma(torch.tensor(t)).item()
        eps_star = _gauss_optimal_eps(x_t, mu, cov, a, sg)
        torch.testing.assert_close(eps_to_x0(x_t, eps_star, a, sg), _gauss_posterior_mean(x_t, mu, cov, a, sg),
                                   rtol=0, atol=1e-10)


def test_tweedie_gaussian_mixture_autograd_score():
    """2-D 3-component mixture: eps* = -sigma_t grad log p_t (autograd) vs the responsibility-weighted
    per-component posterior means."""
    g = torch.Generator().manual_seed(7)
    s = NoiseSchedule.sd()
    K, d = 3, 2
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    mus = torch.randn(K, d, generator=g, dtype=torch.float64) * 2
    Ls = torch.randn(K, d, d, generator=g, dtype=torch.float64) * 0.5
    covs = Ls @ Ls.transpose(1, 2) + 0.05 * torch.eye(d, dtype=torch.float64)
    x_t = torch.randn(40, d, generator=g, dtype=torch.float64) * 2
    I = torch.eye(d, dtype=torch.float64)
    for t in (100, 500, 900):
        a, sg = s.alpha(torch.tensor(t)).item(), s.sigma(torch.tensor(t)).item()
        S = a**2 * covs + sg**2 * I  # (K, d, d)
        comps = torch.distributions.MultivariateNormal(a * mus, covariance_matrix=S)
        x = x_t.clone().requires_grad_(True)
        logp = torch.logsumexp(comps.log_prob(x[:, None, :]) + w.log(), dim=1)
        score = torch.autograd.grad(logp.sum(), x)[0]
        x0_hat = eps_to_x0(x_t, -sg * score, a, sg)
        with torch.no_grad():
            resp = torch.softmax(comps.log_prob(x_t[:, None, :]) + w.log(), dim=1)  # (n, K)
            post = torch.stack([_gauss_posterior_mean(x_t, mus[k], covs[k], a, sg) for k in range(K)], 1)
            expected = (resp[..., None] * post).sum(1)
        torch.testing.assert_close(x0_hat, expected, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- Eq. 15 / 16


def test_renoise_eq16_matches_paper_form():
    g = torch.Generator().manual_seed(3)
    s = NoiseSchedule.sd()
    x_t = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    z = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 39, 400, 700, 998])
    s_ = torch.tensor([1, 999, 401, 999, 999])
    at, st = s.coefs(t, x_t)
    as_, ss = s.coefs(s_, x_t)
    paper = as_ / at * x_t + torch.sqrt(ss**2 - st**2 * as_**2 / at**2) * z  # Self-NPO Eq. 16 as written
    torch.testing.assert_close(renoise_eq16(x_t, at, st, as_, ss, z), paper, rtol=0, atol=1e-12)
    # s == t: zero extra noise, x_s == x_t
    torch.testing.assert_close(renoise_eq16(x_t, at, st, at, st, z), x_t, rtol=0, atol=1e-14)


def test_renoise_eq16_rejects_s_below_t():
    s = NoiseSchedule.sd()
    x = torch.zeros(2, 3)
    at, st = s.coefs(torch.tensor([500, 500]), x)
    as_, ss = s.coefs(torch.tensor([600, 499]), x)  # second sample has s < t
    with pytest.raises(ValueError, match="s >= t"):
        renoise_eq16(x, at, st, as_, ss, torch.zeros_like(x))


def test_renoise_eq15_form():
    g = torch.Generator().manual_seed(4)
    s = NoiseSchedule.sd()
    x0_hat = torch.randn(3, 4, generator=g, dtype=torch.float64)
    z = torch.randn(3, 4, generator=g, dtype=torch.float64)
    as_, ss = s.coefs(torch.tensor([10, 500, 999]), x0_hat)
    ac = torch.tensor(numpy_alphas_cumprod("scaled_linear", 0.00085, 0.012)[[10, 500, 999]])[:, None]
    torch.testing.assert_close(renoise_eq15(x0_hat, as_, ss, z), ac.sqrt() * x0_hat + (1 - ac).sqrt() * z,
                               rtol=0, atol=1e-14)


def test_renoise_eq16_is_forward_process_composition():
    """Eq. 16 applied to x_t = a_t x0 + s_t e1 gives a_s x0 + (noise of variance s_s^2) exactly: the
    coefficient of x0 is a_s and the two noise coefficients' squares sum to s_s^2 (Thm. 1, per sample)."""
    s = NoiseSchedule.sd()
    for t, u in [(0, 999), (100, 101), (300, 800)]:
        at, st = s.alpha(torch.tensor(t)).item(), s.sigma(torch.tensor(t)).item()
        as_, ss = s.alpha(torch.tensor(u)).item(), s.sigma(torch.tensor(u)).item()
        basis = torch.eye(3, dtype=torch.float64)  # columns: x0, e1, z
        x_t = at * basis[0] + st * basis[1]
        f64 = lambda v: torch.tensor(v, dtype=torch.float64)
        coef = renoise_eq16(x_t, f64(at), f64(st), f64(as_), f64(ss), basis[2])
        assert coef[0].item() == pytest.approx(as_, abs=1e-14)
        assert (coef[1] ** 2 + coef[2] ** 2).item() == pytest.approx(ss**2, abs=1e-13)
        assert math.isfinite(coef.sum().item())
