"""Self-NPO: truncated diffusion fine-tuning (TDFT), Self-NPO Eq. 13-17.

One training step, with a frozen-gradient *target* model (an EMA of the trained *student*):
  1. start:   x_{t'} = real data x0 noised to a random grid timestep t' (Eq. 14), or pure noise
              at t' = T-1 (Eq. 13);
  2. rollout: K deterministic DDIM steps on the N-point grid with the target model and guidance
              weight w inside the rollout, eps = eps(c) + w (eps(c) - eps(c')) (w = -1: the
              unconditional prediction, the paper's intentional corruption of the ODE);
  3. target:  the target model's Tweedie estimate x_{t->0} = E[x0 | x_t] at the end point (Eq. 12);
  4. re-noise: s ~ U{t+1, ..., T-1}, x_s = alpha_s (x_t / alpha_t + sqrt(nsr_s^2 - nsr_t^2) z) (Eq. 16)
              ("naive truncation" instead noises x_{t->0} directly, Eq. 15: an ablation);
  5. loss:    || x_{t->0} - f_theta(x_s, s, c) ||, f_theta = the student's x0 prediction (Eq. 17),
              L2 or pseudo-Huber sqrt(d^2 + c^2) - c.
K = N from pure noise is the paper's full-simulation baseline (every rollout reaches t = 0).

v-prediction models (CogVideoX) run the same step: every model output goes through
`schedule.to_x0` / `to_eps` (x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v), so the rollout, the
Tweedie target and the student's x0 prediction are the same quantities as under eps-prediction (the paper
converts v the same way; the conversion itself is exact algebra, tests/test_cogvideox_schedule.py).
delta = student - base is the NPO offset used in theta_neg = theta + beta * delta.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .guidance import expand_cond, guided_denoiser, share_cond, where_cond
from .schedule import NoiseSchedule, add_noise, renoise_eq15, renoise_eq16, to_eps, to_x0


@dataclass(frozen=True)
class SelfNPOConfig:
    """The knobs of the authors' recipe (Self-NPO/train.py and train.sh, SD1.5), defaults theirs."""

    num_grid: int = 25         # N: DDIM grid over T (timesteps 39, 79, ..., 999)
    k: int = 5                 # K: truncated DDIM steps per rollout (K + 1 model evaluations)
    rollout_w: float = -1.0    # guidance weight inside the rollout; -1 = unconditional (SDXL script: -5)
    ema_rate: float = 0.999    # target = EMA of the student, updated after every step
    start: str = "data"        # "data" (Eq. 14) or "noise" (Eq. 13)
    renoise: str = "eq16"      # "eq16" (TDFT) or "eq15" (naive truncation ablation)
    loss: str = "huber"        # "huber" (pseudo-Huber, train.sh) or "l2"
    huber_c: float = 0.001
    cond_drop: float = 0.0     # probability the student sees c' instead of c (authors: 0)

    def __post_init__(self):
        if not 1 <= self.k <= self.num_grid:
            raise ValueError(f"K (--k) must be in 1..N = {self.num_grid}; got {self.k}. Use K = N for full simulation.")
        if self.num_grid < 1:
            raise ValueError(f"N (--num-grid) must be >= 1; got {self.num_grid}.")
        for name, value, allowed in (("start", self.start, ("data", "noise")), ("renoise", self.renoise, ("eq16", "eq15")),
                                     ("loss", self.loss, ("huber", "l2"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {value!r}.")
        if not 0 <= self.ema_rate < 1:
            raise ValueError(f"ema_rate must be in [0, 1); got {self.ema_rate}.")
        if not 0 <= self.cond_drop <= 1:
            raise ValueError(f"cond_drop must be in [0, 1]; got {self.cond_drop}.")


def ddim_grid(num_grid: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The N-point training grid `(i + 1) * (T // N) - 1`, i = 0..N-1: (39, 79, ..., 999) for N = 25."""
    return torch.arange(1, num_grid + 1) * (num_train_timesteps // num_grid) - 1


_SHARD = (0, 1)  # (rank, world size) of a data-parallel run; see `sharded`


@contextlib.contextmanager
def sharded(rank: int, world: int):
    """Inside, every random draw of the rollout and the loss is made for the global batch (world x B) and
    this rank's slice [rank B, (rank + 1) B) is kept: with the same generator state on every rank, W ranks
    of batch B draw exactly what one process of batch W x B draws (npo_min/distributed.py)."""
    global _SHARD
    previous, _SHARD = _SHARD, (rank, world)
    try:
        yield
    finally:
        _SHARD = previous


def _draw(fn, shape, generator, **kwargs) -> torch.Tensor:
    """`fn(shape, generator=generator, **kwargs)` (torch.randn / rand / randint), this rank's slice of the global draw."""
    rank, world = _SHARD
    if world == 1:
        return fn(tuple(shape), generator=generator, **kwargs)
    b = shape[0]
    return fn((world * b, *shape[1:]), generator=generator, **kwargs)[rank * b : (rank + 1) * b]  # (W B, ...) -> (B, ...)


@torch.no_grad()
def truncated_rollout(target, x0, cond, null, schedule: NoiseSchedule, cfg: SelfNPOConfig, generator=None,
                      start_index: torch.Tensor | None = None, trajectory: list | None = None,
                      prediction_type: str = "epsilon"):
    """Steps 1-3: returns `(x_t, t, x0_target)`: end state `(B, ...)`, its timesteps `(B,)` in 0..T-1,
    and the target model's Tweedie estimate at (x_t, t).

    x0: `(B, C, H, W)` clean data (SD: scaled VAE latents; digits: pixels in [-1, 1]);
    cond / null: conditioning c and c' (`(B, L, D)` or a dict of batched tensors; null may have batch 1).
    The rollout's guidance is `guidance.cfg` with scale rollout_w + 1 (w = -1: only the c' branch runs).
    Samples reaching the grid's end step onto t = 0 (alphas_cumprod[0]) and stop moving.
    prediction_type: what `target` outputs, "epsilon" or "v_prediction" (converted to eps and x0 through the
    schedule, so a zero-terminal-SNR grid top, alpha = 0, stays finite).

    Optional, for inspection (npo_min/figures.py); the defaults leave the results unchanged:
    start_index: `(B,)` grid indices 0..N-1 of t' (start = "data" only) instead of the uniform draw;
    trajectory: a list that receives `(x_t, t, x0_hat)` at each of the K + 1 evaluated points.
    """
    B, T, N = x0.shape[0], schedule.num_train_timesteps, cfg.num_grid
    grid = ddim_grid(N, T).to(x0.device)
    rollout_eps = guided_denoiser(target, target, cond, null, cfg.rollout_w + 1.0)  # eps(c') + (w + 1)(eps(c) - eps(c'))
    randn = lambda: _draw(torch.randn, x0.shape, generator, dtype=x0.dtype).to(x0.device)
    if start_index is not None and (cfg.start != "data" or start_index.shape != (B,) or not 0 <= start_index.min() <= start_index.max() < N):
        raise ValueError(f"start_index must be (B,) = ({B},) grid indices in 0..{N - 1} with start 'data'; got {start_index}.")
    if cfg.start == "data":  # Eq. 14: x_{t'} ~ q(x_{t'} | x0), t' uniform on the grid
        idx = _draw(lambda shape, **kw: torch.randint(0, N, shape, **kw), (B,), generator).to(x0.device) if start_index is None else start_index.to(x0.device)
        alpha, sigma = schedule.coefs(grid[idx], x0)
        x = add_noise(x0, randn(), alpha, sigma)
    else:  # Eq. 13: x_T ~ N(0, I), started at the top of the grid
        idx = torch.full((B,), N - 1, device=x0.device)
        x = randn()
    for i in range(cfg.k + 1):
        t = torch.where(idx >= 0, grid[idx.clamp(min=0)], torch.zeros_like(idx))
        alpha, sigma = schedule.coefs(t, x)
        out = rollout_eps(x, t)  # the guided model output: eps or v
        x0_hat = to_x0(out, x, alpha, sigma, prediction_type)  # Tweedie, Eq. 12
        eps = to_eps(out, x, alpha, sigma, prediction_type)
        if trajectory is not None:
            trajectory.append((x, t, x0_hat))
        if i == cfg.k:
            return x, t, x0_hat
        moving = idx >= 0
        t_prev = torch.where(idx >= 1, grid[(idx - 1).clamp(min=0)], torch.zeros_like(idx))
        a_prev, s_prev = schedule.coefs(t_prev, x)
        x_next = a_prev * x0_hat + s_prev * eps  # DDIM (eta = 0)
        x = torch.where(moving.reshape(-1, *[1] * (x.ndim - 1)), x_next, x)  # (B,) -> (B, 1, 1, 1)
        idx = torch.where(moving, idx - 1, idx)


def sample_s(t: torch.Tensor, num_train_timesteps: int, generator=None) -> torch.Tensor:
    """s uniform over the integers t+1 .. T-1 (per sample); t = T-1 stays at T-1."""
    u = _draw(torch.rand, t.shape, generator, dtype=torch.float64).to(t.device)
    span = (num_train_timesteps - 1 - t).clamp(min=0)
    return (t + 1 + (u * span).floor().long()).clamp(max=num_train_timesteps - 1)


def pseudo_huber(d: torch.Tensor, c: float) -> torch.Tensor:
    return torch.sqrt(d**2 + c**2) - c


def tdft_loss(student, x_t, t, x0_target, cond, null, schedule: NoiseSchedule, cfg: SelfNPOConfig, generator=None,
              prediction_type: str = "epsilon"):
    """Steps 4-5 (Eq. 16, 17): the student's x0 prediction at (x_s, s) regressed on x0_target; scalar.

    prediction_type: what `student` outputs ("epsilon" | "v_prediction"), turned into x0 by `schedule.to_x0`.
    """
    T = schedule.num_train_timesteps
    s = sample_s(t, T, generator)
    z = _draw(torch.randn, x_t.shape, generator, dtype=x_t.dtype).to(x_t.device)
    alpha_t, sigma_t = schedule.coefs(t, x_t)
    alpha_s, sigma_s = schedule.coefs(s, x_t)
    if cfg.renoise == "eq16":
        x_s = renoise_eq16(x_t, alpha_t, sigma_t, alpha_s, sigma_s, z)
    else:
        x_s = renoise_eq15(x0_target, alpha_s, sigma_s, z)
    context = cond
    if cfg.cond_drop > 0:
        drop = _draw(torch.rand, (x_t.shape[0],), generator).to(x_t.device) < cfg.cond_drop
        context = where_cond(drop, share_cond(expand_cond(null, x_t.shape[0]), cond), cond)
    x0_pred = to_x0(student(x_s, s, context), x_s, alpha_s, sigma_s, prediction_type)
    d = x0_pred.float() - x0_target.float()
    return pseudo_huber(d, cfg.huber_c).mean() if cfg.loss == "huber" else (d**2).mean()


@torch.no_grad()
def ema_update(target: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """target <- rate * target + (1 - rate) * student, parameter by parameter."""
    for p_t, p_s in zip(target.parameters(), student.parameters()):
        p_t.lerp_(p_s.to(p_t.dtype), 1.0 - rate)


def denoising_loss(model, x0, context, schedule: NoiseSchedule, generator=None):
    """The standard diffusion objective in eps form, E_t,eps ||eps - eps_theta(x_t, t, c)||^2
    (Self-NPO Eq. 11 up to a per-timestep weight); used to pretrain the digits base model."""
    B, T = x0.shape[0], schedule.num_train_timesteps
    t = torch.randint(0, T, (B,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    alpha, sigma = schedule.coefs(t, x0)
    return F.mse_loss(model(add_noise(x0, eps, alpha, sigma), t, context).float(), eps.float())
