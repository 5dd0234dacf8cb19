"""CogVideoX's schedule and DDIM step: NoiseSchedule.cogvideox, to_x0 / to_eps under v-prediction,
Eq. 16 at zero terminal SNR, and ddim(prediction_type="v_prediction") vs CogVideoXDDIMScheduler.

Oracles: diffusers' CogVideoXDDIMScheduler (test-only) and closed-form Gaussian posteriors.
"""

import math

import pytest
import torch

from npo_min.schedule import (NoiseSchedule, eps_to_x0, from_x0_eps, renoise_eq16, rescale_zero_terminal_snr,
                              shift_snr, to_eps, to_x0)
from npo_min.solvers import ddim, make_timesteps

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXDDIMScheduler  # noqa: E402

F64 = torch.float64


def ref_scheduler(shift):
    """THUDM/CogVideoX-{2b,5b} scheduler/scheduler_config.json values."""
    return CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                                  timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=shift)


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_alphas_cumprod_vs_diffusers(shift):
    ours = NoiseSchedule.cogvideox(shift)
    ref = ref_scheduler(shift).alphas_cumprod
    assert ref.dtype == F64  # this scheduler builds its betas in float64 too
    torch.testing.assert_close(ours.alphas_cumprod, ref, rtol=1e-12, atol=1e-15)
    assert ours.alphas_cumprod[-1].item() == 0.0 and ours.alpha(torch.tensor([999])).item() == 0.0
    assert math.isinf(ours.nsr(torch.tensor([999])).item())


def test_snr_shift_and_rescale_definitions():
    ac = NoiseSchedule.sd().alphas_cumprod
    snr = ac / (1 - ac)
    shifted = shift_snr(ac, 3.0)
    torch.testing.assert_close(shifted / (1 - shifted), snr / 3.0, rtol=1e-12, atol=0)  # SNR -> SNR / s
    r = rescale_zero_terminal_snr(shifted)
    assert r[-1] == 0 and r[0].item() == pytest.approx(shifted[0].item(), rel=1e-14)
    with pytest.raises(ValueError, match="snr_shift_scale"):
        shift_snr(ac, 0.0)


@pytest.mark.parametrize("n", [50, 25, 7, 1])
def test_trailing_timesteps_vs_diffusers(n):
    sched = ref_scheduler(3.0)
    sched.set_timesteps(n)
    assert make_timesteps(n, "trailing", steps_offset=0) == sched.timesteps.tolist()


def toy_v_model(x, t):
    """A deterministic stand-in for the transformer: v depends on x and t nonlinearly."""
    tt = t.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)) / 1000
    return torch.tanh(x) * (0.5 + tt) - 0.3 * tt * x + 0.1


@pytest.mark.parametrize("shift,n", [(3.0, 50), (1.0, 13)])
def test_ddim_v_prediction_vs_diffusers(shift, n):
    noise = torch.randn(2, 3, 4, 6, 10, generator=torch.Generator().manual_seed(n))  # (B, F, C, H, W) latents
    ours = ddim(toy_v_model, noise, make_timesteps(n, "trailing", steps_offset=0), NoiseSchedule.cogvideox(shift),
                set_alpha_to_one=True, prediction_type="v_prediction")
    sched = ref_scheduler(shift)
    sched.set_timesteps(n)
    x = noise
    for t in sched.timesteps:
        x = sched.step(toy_v_model(x, t.expand(2)), t, x, return_dict=False)[0]
    assert torch.isfinite(ours).all()
    assert (ours - x).abs().max().item() < 1e-5, (ours - x).abs().max().item()


def test_ddim_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        ddim(toy_v_model, torch.zeros(1, 2), [999], NoiseSchedule.cogvideox(), prediction_type="sample")


# ---------------------------------------------------------------- Tweedie and Eq. 16 under v-prediction

MU, S2 = 0.7, 0.3**2  # toy data x0 ~ N(MU, S2), eps ~ N(0, 1)


def posterior_means(x_t, a, s):
    """E[x0 | x_t], E[eps | x_t], E[v | x_t] of the toy Gaussian, each from its own covariance with x_t."""
    var = a**2 * S2 + s**2
    dev = x_t - a * MU
    x0 = MU + a * S2 / var * dev
    eps = s / var * dev
    v = -s * MU + a * s * (1 - S2) / var * dev  # Cov(alpha eps - sigma x0, x_t) = a s - s a S2
    return x0, eps, v


def test_tweedie_v_vs_eps_forms():
    sched = NoiseSchedule.cogvideox(3.0)
    t = torch.tensor([0, 1, 250, 500, 900, 998, 999])
    x_t = torch.linspace(-3, 3, 7, dtype=F64)
    a, s = sched.alpha(t), sched.sigma(t)
    x0, eps, v = posterior_means(x_t, a, s)
    torch.testing.assert_close(to_x0(v, x_t, a, s, "v_prediction"), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(to_eps(v, x_t, a, s, "v_prediction"), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(from_x0_eps(x0, eps, a, s, "v_prediction"), v, rtol=0, atol=1e-12)
    ok = a > 0  # the eps form divides by alpha: undefined at t = 999
    torch.testing.assert_close(to_x0(eps[ok], x_t[ok], a[ok], s[ok], "epsilon"), x0[ok], rtol=0, atol=1e-9)
    assert to_x0(v, x_t, a, s, "v_prediction")[-1].item() == pytest.approx(MU, abs=1e-12)  # pure noise: prior mean
    assert not torch.isfinite(eps_to_x0(x_t[-1:], eps[-1:], a[-1:], s[-1:])).all()
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0(v, x_t, a, s, "sample")


@pytest.mark.parametrize("t,u", [(500, 700), (100, 999), (999, 999), (300, 300)])
def test_eq16_under_zero_terminal_snr(t, u):
    """Eq. 16 from level t to u >= t on the CogVideoX schedule: the re-noised samples have the forward
    marginal N(alpha_u MU, alpha_u^2 S2 + sigma_u^2) (Thm. 1), stay finite at alpha = 0, and the
    v-form Tweedie estimate at (x_s, u) equals the eps form wherever alpha_u > 0."""
    sched = NoiseSchedule.cogvideox(3.0)
    g = torch.Generator().manual_seed(t + u)
    n = 200_000
    at, st = sched.alpha(torch.tensor([t])), sched.sigma(torch.tensor([t]))
    au, su = sched.alpha(torch.tensor([u])), sched.sigma(torch.tensor([u]))
    x0 = MU + S2**0.5 * torch.randn(n, generator=g, dtype=F64)
    x_t = at * x0 + st * torch.randn(n, generator=g, dtype=F64)
    z = torch.randn(n, generator=g, dtype=F64)
    x_s = renoise_eq16(x_t, at, st, au, su, z)
    assert torch.isfinite(x_s).all()
    if t == u:  # no noise added: x_s = x_t (exactly at alpha = 0; up to rounding of alpha (x / alpha) elsewhere)
        torch.testing.assert_close(x_s, x_t, rtol=1e-12, atol=0 if au.item() == 0 else 1e-12)
    mean, var = (au * MU).item(), (au**2 * S2 + su**2).item()
    assert x_s.mean().item() == pytest.approx(mean, abs=5 / n**0.5)
    assert x_s.var().item() == pytest.approx(var, rel=0.02)
    x0_v = to_x0(posterior_means(x_s, au, su)[2], x_s, au, su, "v_prediction")
    torch.testing.assert_close(x0_v, posterior_means(x_s, au, su)[0], rtol=0, atol=1e-12)
    if au.item() > 0:
        x0_e = to_x0(posterior_means(x_s, au, su)[1], x_s, au, su, "epsilon")
        torch.testing.assert_close(x0_v, x0_e, rtol=0, atol=1e-9)
    if at.item() > 0:  # Self-NPO Eq. 16 as written, where it is defined
        paper = au / at * x_t + torch.sqrt((su**2 - st**2 * au**2 / at**2).clamp_min(0)) * z
        torch.testing.assert_close(x_s, paper, rtol=0, atol=1e-12)
