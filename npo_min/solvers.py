"""Samplers as small pure functions over a denoiser `(x_t (B,...), t (B,)) -> eps`.

Each takes standard-normal `noise` and a descending list of integer timesteps and returns x0.
Timestep spacings and boundary conventions follow the diffusers schedulers SD ships with
(DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler), so results match them
step for step (tests/test_solvers.py).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .schedule import NoiseSchedule


def make_timesteps(num_steps: int, spacing: str = "leading", num_train_timesteps: int = 1000, steps_offset: int = 1,
                   solver: str = "ddim") -> list[int]:
    """Descending integer timesteps in 0..T-1, as the diffusers scheduler of `solver` spaces them.

    "leading" (SD1.5's scheduler config, steps_offset 1): [0, r, 2r, ...] reversed, plus steps_offset,
    r = T // num_steps; DPMSolverMultistep ("dpmpp_2m") instead uses r = T // (num_steps + 1) and
    drops the 0. "trailing": round(T - i T / n) - 1 for i = 0..n-1, so it starts at T-1 (the
    Self-NPO grid: 999, 959, ..., 39 for n = 25), for every solver.

    Raises:
        ValueError: num_steps outside 1..T, or an unknown spacing.
    """
    T = num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"number of steps must be in 1..{T}; got {num_steps}.")
    if spacing == "leading" and solver == "dpmpp_2m":
        r = T // (num_steps + 1)
        ts = [i * r + steps_offset for i in range(1, num_steps + 1)][::-1]
    elif spacing == "leading":
        r = T // num_steps
        ts = [i * r + steps_offset for i in range(num_steps)][::-1]
    elif spacing == "trailing":
        step = (T - T / num_steps) - T  # numpy.arange(T, 0, -T / n)'s own increment, so .5 ties round as diffusers'
        ts = [int(round(T + i * step)) - 1 for i in range(num_steps)]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: use 'leading' or 'trailing'.")
    return [min(max(t, 0), T - 1) for t in ts]


def _bar(it, progress):
    return tqdm(it, desc="sampling", leave=False) if progress else it


def _t(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


@torch.no_grad()
def ddim(denoise, noise, timesteps, schedule: NoiseSchedule, set_alpha_to_one: bool = False, progress=False,
         prediction_type: str = "epsilon"):
    """Deterministic DDIM (eta = 0): x_prev = alpha_prev x0_hat + sigma_prev eps_hat.

    The previous timestep is t - T // n (diffusers' rule); past 0 the final alpha is 1 if
    `set_alpha_to_one` else alphas_cumprod[0] (SD1.5 config: False). Starts at x_T = noise.

    `denoise` returns eps ("epsilon", SD) or v ("v_prediction", CogVideoX). The v branch is diffusers'
    CogVideoXDDIMScheduler.step: x0_hat = alpha_t x_t - sigma_t v, then the same DDIM update written
    without 1/alpha_t, x_prev = (sigma_prev / sigma_t) x_t + (alpha_prev - alpha_t sigma_prev / sigma_t) x0_hat,
    so it holds at t = T-1 under zero terminal SNR (alpha_t = 0, sigma_t = 1). CogVideoX's pipeline:
    `ddim(v_model, noise, make_timesteps(50, "trailing"), NoiseSchedule.cogvideox(3.0),
    set_alpha_to_one=True, prediction_type="v_prediction")`.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'.")
    ac, T = schedule.alphas_cumprod, schedule.num_train_timesteps
    final = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else ac[0]
    x = noise
    for t in _bar(timesteps, progress):
        t_prev = t - T // len(timesteps)
        a_t, a_prev = ac[t], (ac[t_prev] if t_prev >= 0 else final)
        out = denoise(x, _t(t, x))
        if prediction_type == "epsilon":
            x0 = (x - (1 - a_t).sqrt().item() * out) / a_t.sqrt().item()  # Tweedie, Eq. 2
            x = a_prev.sqrt().item() * x0 + (1 - a_prev).sqrt().item() * out
        else:
            x0 = a_t.sqrt().item() * x - (1 - a_t).sqrt().item() * out  # Tweedie under v-prediction
            ratio = ((1 - a_prev) / (1 - a_t)).sqrt()  # sigma_prev / sigma_t
            x = ratio.item() * x + (a_prev.sqrt() - a_t.sqrt() * ratio).item() * x0
    return x


def _sigmas(schedule: NoiseSchedule, timesteps) -> torch.Tensor:
    ac = schedule.alphas_cumprod[torch.tensor(timesteps)]
    return torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1, dtype=torch.float64)])  # (n + 1,), last = 0


@torch.no_grad()
def euler(denoise, noise, timesteps, schedule: NoiseSchedule, spacing: str = "leading", progress=False):
    """Euler on the probability-flow ODE in sigma space, x_ve = x_t / alpha_t, sigma = nsr_t.

    dx_ve/dsigma = eps, so x_ve <- x_ve + (sigma_next - sigma) eps; the model sees
    x_t = x_ve / sqrt(1 + sigma^2). Starts at noise * sigma_max ("trailing") or
    noise * sqrt(1 + sigma_max^2) ("leading"), as diffusers' EulerDiscreteScheduler.
    """
    sigmas = _sigmas(schedule, timesteps)
    s0 = sigmas[0].item()
    x = noise * (s0 if spacing == "trailing" else (s0**2 + 1) ** 0.5)
    for i, t in enumerate(_bar(timesteps, progress)):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        eps = denoise(x / (s**2 + 1) ** 0.5, _t(t, x))
        x = x + (s_next - s) * eps
    return x


@torch.no_grad()
def dpmpp_2m(denoise, noise, timesteps, schedule: NoiseSchedule, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, midpoint form, last step first order.

    With lambda = log(alpha / sigma) and h = lambda_next - lambda:
      x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D,
      D = x0_hat (first step, and the final step to sigma = 0),
      D = x0_hat + (x0_hat - x0_prev) / (2 r), r = h_prev / h (otherwise).
    Starts at x_T = noise (VP space), as diffusers' DPMSolverMultistepScheduler.
    """
    sigmas = _sigmas(schedule, timesteps)
    alphas = 1 / (1 + sigmas**2).sqrt()          # VP alpha_t from nsr
    vp_sigmas = sigmas * alphas                    # VP sigma_t
    lambdas = torch.log(alphas) - torch.log(vp_sigmas)  # lambda_n = +inf at sigma = 0
    x, x0_prev, h_prev = noise, None, None
    n = len(timesteps)
    for i, t in enumerate(_bar(timesteps, progress)):
        a, s = alphas[i].item(), vp_sigmas[i].item()
        eps = denoise(x, _t(t, x))
        x0 = (x - s * eps) / a
        if i == n - 1:  # final step to sigma = 0: x_0 = x0_hat
            x = x0
            break
        a_next, s_next = alphas[i + 1].item(), vp_sigmas[i + 1].item()
        h = (lambdas[i + 1] - lambdas[i]).item()
        D = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
        x = (s_next / s) * x - a_next * torch.expm1(torch.tensor(-h)).item() * D
        x0_prev, h_prev = x0, h
    return x


SOLVERS = {"ddim": ddim, "euler": euler, "dpmpp_2m": dpmpp_2m}


def sample(denoise, noise, num_steps: int, schedule: NoiseSchedule, solver: str = "ddim", spacing: str = "leading", progress=False,
           prediction_type: str = "epsilon", set_alpha_to_one: bool = False):
    """Run `solver` ("ddim" | "euler" | "dpmpp_2m") for `num_steps` steps; returns x0 `(B, ...)`.

    prediction_type: what `denoise` returns, "epsilon" or "v_prediction" (CogVideoX; DDIM only: its
    zero-terminal-SNR schedule starts at alpha = 0, where Euler's and DPM-Solver's sigma-space forms are
    infinite). set_alpha_to_one: DDIM's final alpha past t = 0 (CogVideoX: True, SD: False).

    Raises:
        ValueError: unknown solver or spacing, num_steps outside 1..T, or v_prediction with another solver than ddim.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: use one of {sorted(SOLVERS)}.")
    if prediction_type != "epsilon" and solver != "ddim":
        raise ValueError(f"solver {solver!r} takes eps-prediction models only; this model predicts {prediction_type}: use --solver ddim.")
    ts = make_timesteps(num_steps, spacing, schedule.num_train_timesteps, solver=solver)
    if solver == "euler":
        return euler(denoise, noise, ts, schedule, spacing=spacing, progress=progress)
    if solver == "ddim":
        return ddim(denoise, noise, ts, schedule, set_alpha_to_one=set_alpha_to_one, progress=progress,
                    prediction_type=prediction_type)
    return SOLVERS[solver](denoise, noise, ts, schedule, progress=progress)
