"""VP noise schedules and the conversions between eps, x0 and v (Self-NPO Eq. 2, 12, 15, 16).

Forward process: x_t = alpha_t x0 + sigma_t eps, alpha_t = sqrt(alphas_cumprod[t]),
sigma_t = sqrt(1 - alphas_cumprod[t]), t = 0..T-1 (T = 1000 for SD). All schedule arithmetic is
float64; results are cast to the sample's dtype.
"""

from __future__ import annotations

import torch


def make_alphas_cumprod(
    kind: str = "scaled_linear", num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """`alphas_cumprod` (T,) float64 = cumprod(1 - beta_t).

    "scaled_linear" (SD1.5/SDXL): beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2.
    "linear" (DDPM): beta_t = linspace(beta_start, beta_end, T).

    Raises:
        ValueError: unknown `kind`, or betas outside (0, 1).
    """
    T = num_train_timesteps
    if kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta schedule {kind!r}: use 'scaled_linear' or 'linear'.")
    if not (0 < betas.min() and betas.max() < 1):
        raise ValueError(f"betas must lie in (0, 1); got [{betas.min():.3g}, {betas.max():.3g}].")
    return torch.cumprod(1.0 - betas, dim=0)


class NoiseSchedule:
    """alpha_t, sigma_t and the noise-to-signal ratio nsr_t = sigma_t / alpha_t of a VP schedule.

    `alpha(t)`, `sigma(t)` and `nsr(t)` take integer timesteps `(B,)` (0..T-1) and return float64
    `(B,)`; `expand(v, x)` reshapes a `(B,)` tensor to broadcast against `x` `(B, ...)`.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.num_train_timesteps = len(alphas_cumprod)

    @classmethod
    def sd(cls) -> "NoiseSchedule":
        """SD1.5/SDXL: scaled_linear betas 0.00085 -> 0.012, T = 1000."""
        return cls(make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012))

    def _ac(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.min() < 0 or t.max() >= self.num_train_timesteps:
            raise ValueError(f"timesteps must be integers in 0..{self.num_train_timesteps - 1}; got {t}.")
        return self.alphas_cumprod.to(t.device)[t]

    def alpha(self, t):
        return self._ac(t).sqrt()

    def sigma(self, t):
        return (1 - self._ac(t)).sqrt()

    def nsr(self, t):
        ac = self._ac(t)
        return ((1 - ac) / ac).sqrt()

    @staticmethod
    def expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B,) -> (B, 1, ..., 1)

    def coefs(self, t, x):
        """(alpha_t, sigma_t) shaped to broadcast with x."""
        return self.expand(self.alpha(t), x), self.expand(self.sigma(t), x)


# ---- conversions between parameterisations (alpha, sigma already broadcastable) ----

def add_noise(x0, eps, alpha, sigma):
    """Forward process q(x_t | x0): x_t = alpha_t x0 + sigma_t eps."""
    return alpha * x0 + sigma * eps


def eps_to_x0(x_t, eps, alpha, sigma):
    """Tweedie x0-estimate from an eps prediction: x0_hat = (x_t - sigma_t eps) / alpha_t.

    With eps = -sigma_t * score this is E[x0 | x_t] (Self-NPO Eq. 2 and 12; Diffusion-NPO Eq. 1).
    """
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x_t, x0, alpha, sigma):
    return (x_t - alpha * x0) / sigma


def v_to_x0(x_t, v, alpha, sigma):
    """v-prediction (CogVideoX): v = alpha_t eps - sigma_t x0, so x0 = alpha_t x_t - sigma_t v."""
    return alpha * x_t - sigma * v


def v_to_eps(x_t, v, alpha, sigma):
    return sigma * x_t + alpha * v


def x0_eps_to_v(x0, eps, alpha, sigma):
    return alpha * eps - sigma * x0


# ---- re-noising for truncated diffusion fine-tuning ----

def renoise_eq16(x_t, alpha_t, sigma_t, alpha_s, sigma_s, z):
    """Self-NPO Eq. 16: x_s = (alpha_s / alpha_t) x_t + sqrt(sigma_s^2 - sigma_t^2 alpha_s^2 / alpha_t^2) z.

    Written as x_s = alpha_s (x_t / alpha_t + sqrt(nsr_s^2 - nsr_t^2) z): the forward process
    continued from level t to level s > t, so x_s has the noise-perturbed marginal of p_ref at
    level s (Thm. 1). Requires nsr_s >= nsr_t (s >= t).
    """
    nsr_t, nsr_s = sigma_t / alpha_t, sigma_s / alpha_s
    gap = nsr_s**2 - nsr_t**2
    if (gap < -1e-12).any():
        raise ValueError("Eq. 16 needs s >= t (nsr_s >= nsr_t); got a smaller target noise level.")
    return alpha_s * (x_t / alpha_t + gap.clamp_min(0).sqrt() * z)


def renoise_eq15(x0_hat, alpha_s, sigma_s, z):
    """Self-NPO Eq. 15, "naive truncation": x_s = alpha_s x0_hat + sigma_s z.

    Noises the Tweedie estimate as if it were a sample; its marginal does NOT match p_ref at
    level s (x0_hat is a posterior mean, smoother than a sample). Kept as an ablation.
    """
    return alpha_s * x0_hat + sigma_s * z
