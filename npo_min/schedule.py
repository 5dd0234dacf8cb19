"""VP noise schedules and the conversions between eps, x0 and v (Self-NPO Eq. 2, 12, 15, 16).

Forward process: x_t = alpha_t x0 + sigma_t eps, alpha_t = sqrt(alphas_cumprod[t]),
sigma_t = sqrt(1 - alphas_cumprod[t]), t = 0..T-1 (T = 1000 for SD). All schedule arithmetic is
float64; results are cast to the sample's dtype.

Two parameterisations of the model output, related through (alpha_t, sigma_t) with alpha^2 + sigma^2 = 1:
    eps-prediction (SD1.5, SDXL):   x0 = (x_t - sigma_t eps) / alpha_t          (Tweedie, Eq. 2 / 12)
    v-prediction (CogVideoX):       v = alpha_t eps - sigma_t x0,  x0 = alpha_t x_t - sigma_t v,
                                    eps = sigma_t x_t + alpha_t v
`to_x0` / `to_eps` dispatch on `prediction_type` ("epsilon" | "v_prediction", diffusers' names).

Zero terminal SNR (CogVideoX, Lin et al. 2024 "Common Diffusion Noise Schedules and Sample Steps are
Flawed"): alpha_{T-1} = 0, sigma_{T-1} = 1, so nsr_{T-1} = inf and the eps-form x0 = (x_t - sigma eps) / alpha
is 0 / 0 there. The v-form conversions and `renoise_eq16` never divide by alpha_t when it is 0:
use them (not eps_to_x0, not nsr) with such a schedule. x_{T-1} is pure noise and x0_hat = -v there.
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


def shift_snr(alphas_cumprod: torch.Tensor, snr_shift_scale: float) -> torch.Tensor:
    """CogVideoX's SNR shift: alphas_cumprod / (s + (1 - s) alphas_cumprod), i.e. SNR_t -> SNR_t / s
    (s > 1 adds noise at every level; SNR = alphas_cumprod / (1 - alphas_cumprod))."""
    if snr_shift_scale <= 0:
        raise ValueError(f"snr_shift_scale must be > 0; got {snr_shift_scale}.")
    return alphas_cumprod / (snr_shift_scale + (1 - snr_shift_scale) * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Alg. 1: shift sqrt(alphas_cumprod) so its last value is 0, scale it so its first
    value is unchanged; returns the new alphas_cumprod (last entry exactly 0)."""
    a = alphas_cumprod.sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * (a0 / (a0 - aT))
    return a**2


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

    @classmethod
    def cogvideox(cls, snr_shift_scale: float = 3.0) -> "NoiseSchedule":
        """CogVideoX (diffusers CogVideoXDDIMScheduler, its scheduler_config.json): scaled_linear betas
        0.00085 -> 0.012, T = 1000, then the SNR shift (`shift_snr`, s = 3.0 for 2B, 1.0 for 5B), then
        the zero-terminal-SNR rescale (`rescale_zero_terminal_snr`), in that order. alpha_999 = 0."""
        ac = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
        return cls(rescale_zero_terminal_snr(shift_snr(ac, snr_shift_scale)))

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
        """sigma_t / alpha_t; +inf where alpha_t = 0 (zero terminal SNR)."""
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


PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}.")


def to_x0(pred, x_t, alpha, sigma, prediction_type: str = "epsilon"):
    """Tweedie x0-estimate (Eq. 2 / 12) from a model output of either parameterisation.

    "epsilon": (x_t - sigma eps) / alpha (needs alpha > 0); "v_prediction": alpha x_t - sigma v
    (finite everywhere, -v at zero terminal SNR). Raises ValueError on another prediction_type.
    """
    _check_prediction_type(prediction_type)
    return eps_to_x0(x_t, pred, alpha, sigma) if prediction_type == "epsilon" else v_to_x0(x_t, pred, alpha, sigma)


def to_eps(pred, x_t, alpha, sigma, prediction_type: str = "epsilon"):
    """The eps implied by a model output: eps itself, or sigma x_t + alpha v for v-prediction."""
    _check_prediction_type(prediction_type)
    return pred if prediction_type == "epsilon" else v_to_eps(x_t, pred, alpha, sigma)


def from_x0_eps(x0, eps, alpha, sigma, prediction_type: str = "epsilon"):
    """The training target of either parameterisation for (x0, eps): eps, or v = alpha eps - sigma x0."""
    _check_prediction_type(prediction_type)
    return eps if prediction_type == "epsilon" else x0_eps_to_v(x0, eps, alpha, sigma)


# ---- re-noising for truncated diffusion fine-tuning ----

def renoise_eq16(x_t, alpha_t, sigma_t, alpha_s, sigma_s, z):
    """Self-NPO Eq. 16: x_s = (alpha_s / alpha_t) x_t + sqrt(sigma_s^2 - sigma_t^2 alpha_s^2 / alpha_t^2) z.

    Equal to x_s = alpha_s (x_t / alpha_t + sqrt(nsr_s^2 - nsr_t^2) z): the forward process
    continued from level t to level s > t, so x_s has the noise-perturbed marginal of p_ref at
    level s (Thm. 1). Requires nsr_s >= nsr_t (s >= t).

    At zero terminal SNR (CogVideoX, alpha_{T-1} = 0) the form is read as its limit: alpha_s = 0 gives
    x_s = sigma_s z (pure noise), and alpha_t = 0 (then s = t = T-1) gives x_s = x_t. Where alpha > 0 the
    arithmetic is exactly the formula above.
    """
    one = torch.ones_like(alpha_t)
    safe_t, safe_s = torch.where(alpha_t > 0, alpha_t, one), torch.where(alpha_s > 0, alpha_s, one)
    gap = (sigma_s / safe_s) ** 2 - (sigma_t / safe_t) ** 2  # nsr_s^2 - nsr_t^2
    if ((gap < -1e-12) & (alpha_s > 0)).any():
        raise ValueError("Eq. 16 needs s >= t (nsr_s >= nsr_t); got a smaller target noise level.")
    x_s = alpha_s * (x_t / safe_t + gap.clamp_min(0).sqrt() * z)
    return torch.where(alpha_s > 0, x_s, torch.where(alpha_t > 0, sigma_s * z, x_t))


def renoise_eq15(x0_hat, alpha_s, sigma_s, z):
    """Self-NPO Eq. 15, "naive truncation": x_s = alpha_s x0_hat + sigma_s z.

    Noises the Tweedie estimate as if it were a sample; its marginal does NOT match p_ref at
    level s (x0_hat is a posterior mean, smoother than a sample). Kept as an ablation.
    """
    return alpha_s * x0_hat + sigma_s * z
