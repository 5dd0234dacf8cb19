"""A toy prior whose noisy marginals and posteriors are analytic: a Gaussian mixture in d dimensions.

Used to check Self-NPO Thm. 1-3 by Monte Carlo (tests/test_theorems.py) and to draw Thm. 1
(npo_min/figures.py). Forward process as in npo_min/schedule.py: x_t = alpha_t x0 + sigma_t eps.

  p_ref(x0)      = sum_k w_k N(x0; mu_k, C_k)
  p_t(x_t)       = sum_k w_k N(x_t; alpha_t mu_k, S_k),  S_k = alpha_t^2 C_k + sigma_t^2 I
  E[x0 | x_t]    = sum_k r_k(x_t) (mu_k + alpha_t C_k S_k^-1 (x_t - alpha_t mu_k))   (the exact Tweedie estimate)
  r_k(x_t)       = w_k N(x_t; alpha_t mu_k, S_k) / p_t(x_t)                          (responsibilities)

Everything is float64; timesteps are integers 0..T-1 of the mixture's NoiseSchedule (None where
allowed: p_ref itself, alpha = 1, sigma = 0).
"""

from __future__ import annotations

import math

import torch

from .schedule import NoiseSchedule, add_noise, renoise_eq15, renoise_eq16

F64 = torch.float64


class GaussianMixture:
    """p_ref = sum_k w_k N(mu_k, C_k): weights `(K,)`, means `(K, d)`, covariances `(K, d, d)`.

    `schedule` (default: SD1.5's scaled_linear, NoiseSchedule.sd()) gives alpha_t, sigma_t for the
    timestep arguments `t` (int in 0..T-1) of the methods below.

    Raises:
        ValueError: shapes that do not fit together, or weights that are not a distribution.
    """

    def __init__(self, w, mus, covs, schedule: NoiseSchedule | None = None):
        self.w = torch.as_tensor(w, dtype=F64)
        self.mus = torch.as_tensor(mus, dtype=F64)  # (K, d)
        self.covs = torch.as_tensor(covs, dtype=F64)  # (K, d, d)
        K, d = self.mus.shape
        if self.w.shape != (K,) or self.covs.shape != (K, d, d):
            raise ValueError(f"mixture shapes do not fit: w {tuple(self.w.shape)}, mus {(K, d)}, covs {tuple(self.covs.shape)}; "
                             "want (K,), (K, d), (K, d, d).")
        if (self.w < 0).any() or abs(self.w.sum().item() - 1) > 1e-9:
            raise ValueError(f"mixture weights must be >= 0 and sum to 1; got {self.w.tolist()}.")
        self.d = d
        self.schedule = schedule or NoiseSchedule.sd()

    def alpha_sigma(self, t: int | None) -> tuple[float, float]:
        """(alpha_t, sigma_t) as Python floats; t = None gives (1, 0), i.e. p_ref itself."""
        if t is None:
            return 1.0, 0.0
        t = torch.as_tensor(t)
        return self.schedule.alpha(t).item(), self.schedule.sigma(t).item()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 ~ p_ref: `(n, d)`."""
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.d, generator=generator, dtype=F64)
        return self.mus[k] + (L[k] @ z[..., None])[..., 0]  # (n, d, d) @ (n, d, 1) -> (n, d)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean `(d,)` and covariance `(d, d)` of p_ref."""
        m = (self.w[:, None] * self.mus).sum(0)
        second = (self.w[:, None, None] * (self.covs + self.mus[:, :, None] * self.mus[:, None, :])).sum(0)
        return m, second - m[:, None] * m[None, :]

    def level(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Analytic mean `(d,)` and covariance `(d, d)` of the forward-noised marginal p_t."""
        a, s = self.alpha_sigma(t)
        m, C = self.moments()
        return a * m, a**2 * C + s**2 * torch.eye(self.d, dtype=F64)

    def _components(self, x: torch.Tensor, a: float, s: float, covs: torch.Tensor):
        """Per-component log(w_k N(x; a mu_k, S_k)) `(n, K)`, S_k^-1 (x - a mu_k) `(n, K, d)`."""
        S = a**2 * covs + s**2 * torch.eye(self.d, dtype=F64)  # (K, d, d): Cov(x_t | component k)
        diff = x[:, None, :] - a * self.mus[None]  # (n, K, d)
        Sd = torch.einsum("kij,nkj->nki", torch.linalg.inv(S), diff)
        log_n = -0.5 * (diff * Sd).sum(-1) - 0.5 * torch.logdet(S) - 0.5 * self.d * math.log(2 * math.pi)
        return log_n + self.w.log(), Sd

    def log_density(self, x: torch.Tensor, t: int | None) -> torch.Tensor:
        """log p_t(x) `(n,)` for points x `(n, d)`: the true level-t marginal density."""
        a, s = self.alpha_sigma(t)
        log_wn, _ = self._components(x.to(F64), a, s, self.covs)
        return torch.logsumexp(log_wn, dim=1)

    def posterior_mean(self, x: torch.Tensor, t: int, cov_scale: float = 1.0) -> torch.Tensor:
        """The exact Tweedie estimate E[x0 | x_t = x] `(n, d)` (Self-NPO Eq. 12 with the true score).

        cov_scale != 1 uses a prior with scaled component covariances: a deliberately WRONG Tweedie
        target (negative control in the tests).
        """
        a, s = self.alpha_sigma(t)
        covs = self.covs * cov_scale
        log_wn, Sd = self._components(x.to(F64), a, s, covs)
        resp = torch.softmax(log_wn, dim=1)  # (n, K)
        post = self.mus[None] + a * torch.einsum("kij,nkj->nki", covs, Sd)  # mu_k + a C_k S_k^-1 (x - a mu_k)
        return (resp[..., None] * post).sum(1)

    def pdf_1d(self, x: torch.Tensor, t: int | None, dim: int = 0) -> torch.Tensor:
        """Density `(n,)` of coordinate `dim` of p_t at points x `(n,)`."""
        a, s = self.alpha_sigma(t)
        var = a**2 * self.covs[:, dim, dim] + s**2  # (K,)
        return (self.w * torch.exp(-0.5 * (x[:, None] - a * self.mus[:, dim]) ** 2 / var) / (2 * math.pi * var).sqrt()).sum(1)

    def cdf_1d(self, x: torch.Tensor, t: int, dim: int = 0) -> torch.Tensor:
        """CDF `(n,)` of coordinate `dim` of p_t at points x `(n,)`."""
        a, s = self.alpha_sigma(t)
        sd = (a**2 * self.covs[:, dim, dim] + s**2).sqrt()
        return (self.w * 0.5 * (1 + torch.erf((x[:, None] - a * self.mus[:, dim]) / (sd * math.sqrt(2))))).sum(1)


def renoise_chain(prior: GaussianMixture, t: int, s: int, n: int, generator: torch.Generator | None = None,
                  renoise: str = "eq16", cov_scale: float = 1.0):
    """x0 ~ p_ref -> x_t (forward process) -> (x_{t->0} = E[x0 | x_t], x_s), each `(n, d)`.

    renoise "eq16": x_s from x_t by Self-NPO Eq. 16 (`renoise_eq16`); "eq15": x_s = alpha_s x_{t->0}
    + sigma_s z (`renoise_eq15`, naive truncation). Random draws in this order: x0, eps, z.
    Returns (x0, x_t, x_{t->0}, x_s).
    """
    if renoise not in ("eq16", "eq15"):
        raise ValueError(f"renoise must be 'eq16' or 'eq15'; got {renoise!r}.")
    f = lambda v: torch.tensor(v, dtype=F64)
    at, st = map(f, prior.alpha_sigma(t))
    as_, ss = map(f, prior.alpha_sigma(s))
    x0 = prior.sample(n, generator)
    x_t = add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=F64), at, st)
    x_t0 = prior.posterior_mean(x_t, t, cov_scale)
    z = torch.randn(x0.shape, generator=generator, dtype=F64)
    x_s = renoise_eq16(x_t, at, st, as_, ss, z) if renoise == "eq16" else renoise_eq15(x_t0, as_, ss, z)
    return x0, x_t, x_t0, x_s


def moment_z(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """Max |z| over the entries of the sample mean and sample covariance of x `(n, d)` against
    `mean` `(d,)` and `cov` `(d, d)`; each SE is estimated from the same n samples (sd / sqrt(n))."""
    n = x.shape[0]
    m = x.mean(0)
    z_mean = (m - mean) / (x.std(0) / math.sqrt(n))
    xc = x - m
    prods = xc[:, :, None] * xc[:, None, :]  # (n, d, d)
    z_cov = (prods.mean(0) - cov) / (prods.std(0) / math.sqrt(n))
    return max(z_mean.abs().max().item(), z_cov.abs().max().item())
