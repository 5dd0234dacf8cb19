"""Self-NPO Thm. 1-3 checked by Monte Carlo on toy priors whose posteriors are analytic.

Setting: x0 ~ p_ref, x_t = alpha_t x0 + sigma_t eps (forward process), x_{t->0} = E[x0 | x_t]
(closed form for a Gaussian / Gaussian mixture), x_s = Eq. 16 (`renoise_eq16`) from x_t, with the
SD1.5 scaled_linear alpha_t, sigma_t.

  Thm 1: x_s ~ the forward-noised p_ref at level s.
  Thm 2: grad E||x_{t->0} - f(x_s)||^2 = grad E||x0 - f(x_s)||^2.
  Thm 3: hence the minimiser is f*(x_s) = E_{p_ref}[x0 | x_s] (the standard denoiser at level s).

Tolerances. All samples are seeded (the tests are deterministic). Every comparison of a Monte-Carlo
estimate with its expected value uses a z-score (estimate - expected) / SE, with SE estimated from the
same n samples (sample sd / sqrt(n), or the heteroskedasticity-robust sandwich SE for least-squares
coefficients), and the bound |z| < 5 (two-sided p ~ 6e-7 per comparison, so a few dozen comparisons
per test leave a false-alarm rate < 1e-4 for any seed). Negative controls (Eq. 15 "naive truncation",
or a wrong Tweedie target) must give |z| > 10 (p < 1e-22 under the null), so each test demonstrably
can fail.
"""

import math

import pytest
import torch

from npo_min.schedule import NoiseSchedule, renoise_eq16
from npo_min.self_npo import SelfNPOConfig, sample_s, truncated_rollout
from npo_min.toy import GaussianMixture as Mixture
from npo_min.toy import moment_z, renoise_chain

F64 = torch.float64
SCHED = NoiseSchedule.sd()
N_SAMPLES = 100_000
Z_OK, Z_FAIL = 5.0, 10.0


def a_s(t):
    t = torch.as_tensor(t)
    return SCHED.alpha(t).item(), SCHED.sigma(t).item()


# ---------------------------------------------------------------- toy priors (npo_min/toy.py)

MIX2D = Mixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]],
                [[[0.30, 0.10], [0.10, 0.20]], [[0.50, -0.20], [-0.20, 0.40]]])
MIX1D = Mixture([0.4, 0.6], [[-1.2], [1.0]], [[[0.05]], [[0.10]]])
GAUSS2D = Mixture([1.0], [[0.4, -0.3]], [[[0.6, 0.25], [0.25, 0.3]]])


def chain(prior, t, s, seed, n=N_SAMPLES, renoise="eq16", cov_scale=1.0):
    """x0 ~ p_ref -> x_t -> (x_{t->0}, x_s). With renoise='eq15', x_s = alpha_s x_{t->0} + sigma_s z."""
    return renoise_chain(prior, t, s, n, torch.Generator().manual_seed(seed), renoise, cov_scale)


def ks_stat(x, cdf):
    """sqrt(n) * sup |F_n - F|; its null distribution (Kolmogorov) has P(> 2.0) = 6e-4, P(> 2.5) = 1e-5."""
    n = x.shape[0]
    xs, _ = torch.sort(x)
    F = cdf(xs)
    i = torch.arange(1, n + 1, dtype=F64)
    return math.sqrt(n) * max((i / n - F).abs().max().item(), (F - (i - 1) / n).abs().max().item())


# ---------------------------------------------------------------- Thm. 1


@pytest.mark.parametrize("t,s", [(0, 500), (39, 79), (400, 999), (600, 601)])
def test_thm1_eq16_marginal_matches_level_s(t, s):
    x0, x_t, _, x_s = chain(MIX2D, t, s, seed=t + s)
    mean_s, cov_s = MIX2D.level(s)
    assert moment_z(x_s, mean_s, cov_s) < Z_OK
    # the whole 1-D marginal distribution, not only two moments (KS, bound 2.5: p = 1e-5)
    for dim in range(2):
        assert ks_stat(x_s[:, dim], lambda v: MIX2D.cdf_1d(v, s, dim)) < 2.5
    # sanity: x_t itself has the level-t marginal and differs from the level-s one
    assert moment_z(x_t, *MIX2D.level(t)) < Z_OK


@pytest.mark.parametrize("t,s", [(300, 400), (400, 600)])
def test_thm1_eq15_naive_truncation_fails(t, s):
    """Eq. 15 on the exact Tweedie estimate: variance too small (Var x_{t->0} < Var x0), so the same check fails."""
    _, _, x_t0, x_s = chain(MIX2D, t, s, seed=t + s, renoise="eq15")
    mean_s, cov_s = MIX2D.level(s)
    assert moment_z(x_s, mean_s, cov_s) > Z_FAIL
    assert (torch.diagonal(torch.cov(x_s.T)) < torch.diagonal(cov_s)).all()
    # the mean is still right: the failure is the missing posterior variance alpha_s^2 E[Var(x0 | x_t)]
    assert ((x_s.mean(0) - mean_s).abs() / (x_s.std(0) / math.sqrt(len(x_s))) < Z_OK).all()
    assert ks_stat(x_s[:, 0], lambda v: MIX2D.cdf_1d(v, s, 0)) > 3  # Kolmogorov P(> 3) = 3e-8


# ---------------------------------------------------------------- Thm. 2 / 3 (linear model family)


def features(x_s):
    return torch.cat([x_s, torch.ones(len(x_s), 1, dtype=F64)], 1)  # (n, d + 1): f(x) = A x + b


def lstsq_z(X, Y, beta0):
    """z-scores of the least-squares fit of Y on X against beta0 (robust sandwich SE)."""
    XtX_inv = torch.linalg.inv(X.T @ X)
    beta = XtX_inv @ X.T @ Y  # (p, d)
    e = Y - X @ beta0  # residuals at the hypothesised coefficients
    z = torch.empty_like(beta)
    for j in range(Y.shape[1]):
        meat = (X * e[:, j : j + 1] ** 2).T @ X
        se = torch.diagonal(XtX_inv @ meat @ XtX_inv).sqrt()
        z[:, j] = (beta[:, j] - beta0[:, j]) / se
    return beta, z


def analytic_gauss_coef(prior, s):
    """E[x0 | x_s] for a Gaussian p_ref = mu + A (x_s - alpha_s mu), A = alpha_s cov (alpha_s^2 cov + sigma_s^2 I)^-1;
    returned as the (d + 1, d) matrix beta with f(x_s) = [x_s, 1] @ beta."""
    a, s_ = a_s(s)
    mu, cov = prior.mus[0], prior.covs[0]
    A = a * cov @ torch.linalg.inv(a**2 * cov + s_**2 * torch.eye(prior.d, dtype=F64))
    b = mu - A @ (a * mu)
    return torch.cat([A.T, b[None]], 0)


def analytic_lmmse_coef(prior, s):
    """The best AFFINE predictor of x0 from x_s under p_ref (moments of the mixture at level s)."""
    a, s_ = a_s(s)
    m, C = prior.moments()
    A = a * C @ torch.linalg.inv(a**2 * C + s_**2 * torch.eye(prior.d, dtype=F64))
    return torch.cat([A.T, (m - A @ (a * m))[None]], 0)


@pytest.mark.parametrize("t,s", [(100, 300), (400, 800)])
def test_thm2_same_least_squares_minimiser(t, s):
    """Regressing the Tweedie target and the true x0 on x_s (affine family) gives the same minimiser:
    the coefficient difference = the LS fit of (x_{t->0} - x0) on x_s, which must be 0 within 5 SE."""
    for prior in (GAUSS2D, MIX2D):
        x0, x_t, x_t0, x_s = chain(prior, t, s, seed=7 + t)
        X = features(x_s)
        zero = torch.zeros(X.shape[1], prior.d, dtype=F64)
        _, z = lstsq_z(X, x_t0 - x0, zero)
        assert z.abs().max() < Z_OK
        # Thm. 3 (affine family): both equal the analytic best affine predictor E-under-p_ref
        best = analytic_gauss_coef(prior, s) if prior is GAUSS2D else analytic_lmmse_coef(prior, s)
        for Y in (x_t0, x0):
            _, z = lstsq_z(X, Y, best)
            assert z.abs().max() < Z_OK
        # negative control: a wrong Tweedie target (posterior mean under a prior with 2x covariance)
        bad_t0 = prior.posterior_mean(x_t, t, cov_scale=2.0)
        _, z = lstsq_z(X, bad_t0 - x0, zero)
        assert z.abs().max() > Z_FAIL


@pytest.mark.parametrize("t,s", [(300, 500), (500, 700)])
def test_thm3_eq15_minimiser_is_wrong(t, s):
    """With Eq. 15 the regression of x_{t->0} on x_s is NOT E_{p_ref}[x0 | x_s] (Gaussian: analytic)."""
    _, _, x_t0, x_s = chain(GAUSS2D, t, s, seed=3, renoise="eq15")
    _, z = lstsq_z(features(x_s), x_t0, analytic_gauss_coef(GAUSS2D, s))
    assert z.abs().max() > Z_FAIL


def test_thm2_expected_gradients_agree():
    """Gradients of the two objectives at a fixed random affine f, by autograd, agree within sampling
    error (per-sample gradient differences give the SE); for the Gaussian both also equal the analytic
    expected gradient, which is far from 0 (so agreement is not trivial)."""
    t, s = 250, 600
    g = torch.Generator().manual_seed(0)
    A0 = torch.randn(2, 2, generator=g, dtype=F64)
    b0 = torch.randn(2, generator=g, dtype=F64)
    for prior in (GAUSS2D, MIX2D):
        x0, _, x_t0, x_s = chain(prior, t, s, seed=21)

        def grad(target):
            A, b = A0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
            loss = ((target - (x_s @ A.T + b)) ** 2).sum(1).mean()
            gA, gb = torch.autograd.grad(loss, (A, b))
            return torch.cat([gA.flatten(), gb])

        g_tweedie, g_x0 = grad(x_t0), grad(x0)
        # per-sample difference of the gradients: -2 (x_{t->0} - x0) (x) [x_s, 1]
        X = features(x_s)
        per = (-2 * (x_t0 - x0)[:, :, None] * X[:, None, :])  # (n, d, d + 1)
        per = torch.cat([per[:, :, :2].reshape(len(X), -1), per[:, :, 2]], 1)  # layout of [gA.flatten(), gb]
        se = per.std(0) / math.sqrt(len(X))
        assert ((g_tweedie - g_x0).abs() / se).max() < Z_OK
        # the per-sample form equals the autograd difference (checks the SE is for the right quantity)
        torch.testing.assert_close(per.mean(0), g_tweedie - g_x0, rtol=0, atol=1e-10)
        per_x0 = -2 * (x0 - (x_s @ A0.T + b0))[:, :, None] * X[:, None, :]
        per_x0 = torch.cat([per_x0[:, :, :2].reshape(len(X), -1), per_x0[:, :, 2]], 1)
        se_x0 = per_x0.std(0) / math.sqrt(len(X))
        assert (g_x0.abs() / se_x0).min() > 10  # non-trivial gradient: every entry > 10 SE from 0
        if prior is GAUSS2D:
            # analytic E grad = -2 (E[x0 x_s^T] - A E[x_s x_s^T] - b E[x_s]^T, E[x0] - A E[x_s] - b)
            a, sg = a_s(s)
            mu, cov = prior.mus[0], prior.covs[0]
            M2 = cov + torch.outer(mu, mu)
            Exsxs = a**2 * M2 + sg**2 * torch.eye(2, dtype=F64)
            gA = -2 * (a * M2 - A0 @ Exsxs - torch.outer(b0, a * mu))
            gb = -2 * (mu - A0 @ (a * mu) - b0)
            expected = torch.cat([gA.flatten(), gb])
            assert ((g_tweedie - expected).abs() / se_x0).max() < Z_OK
            assert ((g_x0 - expected).abs() / se_x0).max() < Z_OK


@pytest.mark.parametrize("t,s", [(200, 500), (500, 800)])
def test_thm3_nonparametric_regression_function(t, s):
    """1-D mixture (non-linear posterior mean): within quantile bins of x_s, the mean of
    x_{t->0} - E_{p_ref}[x0 | x_s] is 0 within 5 SE (so E[x_{t->0} | x_s] = E_{p_ref}[x0 | x_s], the
    minimiser over ALL f); with Eq. 15 it is not."""

    def max_bin_z(x_s, target):
        resid = (target - MIX1D.posterior_mean(x_s, s))[:, 0]
        order = torch.argsort(x_s[:, 0])
        zs = []
        for chunk in resid[order].chunk(40):  # 40 bins of 5000
            zs.append(chunk.mean().abs().item() / (chunk.std().item() / math.sqrt(len(chunk))))
        return max(zs)

    _, _, x_t0, x_s = chain(MIX1D, t, s, seed=5)
    assert max_bin_z(x_s, x_t0) < Z_OK
    _, _, x_t0_15, x_s_15 = chain(MIX1D, t, s, seed=5, renoise="eq15")
    assert max_bin_z(x_s_15, x_t0_15) > Z_FAIL


# ---------------------------------------------------------------- rollout with the exact model


def test_rollout_with_exact_model_preserves_marginal():
    """truncated_rollout (start = data, K = 5, w = 0) with the EXACT eps of a 1-D Gaussian p_ref = N(mu, c^2),
    then Eq. 16 to s ~ U{t+1..T-1}: x_s should follow the level-s marginal N(alpha_s mu, alpha_s^2 c^2 + sigma_s^2).

    For a Gaussian the DDIM map is linear, so the rollout's output law is known exactly: the mean is
    preserved exactly, the variance is shrunk by the discretisation (Cauchy-Schwarz, per step). We check
    (i) tightly (5 SE) against that exact DDIM law, and (ii) that the ODE discretisation bias of the
    variance relative to the true marginal, computed analytically, is small (0.8% here, bound 1.5%) -- i.e. the
    exact model's ODE approximately preserves marginals, and Eq. 16 carries that to level s."""
    mu, c = 0.3, 0.5
    n, N, K = N_SAMPLES, 25, 5
    ac = SCHED.alphas_cumprod
    grid = [(i + 1) * (1000 // N) - 1 for i in range(N)]

    def exact_eps(x, t, ctx):  # eps* = sigma_t (x - alpha_t mu) / (alpha_t^2 c^2 + sigma_t^2)
        a, sg = ac[t].sqrt()[:, None], (1 - ac[t]).sqrt()[:, None]
        return sg * (x - a * mu) / (a**2 * c**2 + sg**2)

    g = torch.Generator().manual_seed(0)
    x0 = mu + c * torch.randn(n, 1, generator=g, dtype=F64)
    ctx = torch.zeros(n, 1, 1, dtype=F64)
    cfg = SelfNPOConfig(num_grid=N, k=K, rollout_w=0.0)
    x_t, t, tgt = truncated_rollout(exact_eps, x0, ctx, ctx[:1], SCHED, cfg, torch.Generator().manual_seed(1))
    idx0 = torch.randint(0, N, (n,), generator=torch.Generator().manual_seed(1))  # the rollout's first draw
    end = idx0 - K
    assert torch.equal(t, torch.where(end >= 0, torch.tensor(grid)[end.clamp(min=0)], 0))  # same draws

    # exact law of the DDIM output: variance v_t -> k^2 v_t per step, k = (a' a c^2 + s' s) / v_t
    def ddim_var(j0):
        j, v = j0, float(ac[grid[j0]] * c**2 + 1 - ac[grid[j0]])
        for _ in range(K):
            if j < 0:
                break
            tt, tp = grid[j], (grid[j - 1] if j >= 1 else 0)
            a, sg, ap, sp = ac[tt].sqrt(), (1 - ac[tt]).sqrt(), ac[tp].sqrt(), (1 - ac[tp]).sqrt()
            v = float(((ap * a * c**2 + sp * sg) / (a**2 * c**2 + sg**2)) ** 2 * v)
            j -= 1
        return v

    vt_ddim = torch.tensor([ddim_var(j) for j in range(N)], dtype=F64)[idx0]
    vt_true = ac[t] * c**2 + 1 - ac[t]
    s = sample_s(t, 1000, torch.Generator().manual_seed(2))
    at, st, as_, ss = (v[:, None] for v in (ac[t].sqrt(), (1 - ac[t]).sqrt(), ac[s].sqrt(), (1 - ac[s]).sqrt()))
    x_s = renoise_eq16(x_t, at, st, as_, ss, torch.randn(n, 1, generator=g, dtype=F64))
    nsr_gap = (ss / as_) ** 2 - (st / at) ** 2
    var_s_ddim = ((as_ / at) ** 2 * vt_ddim[:, None] + as_**2 * nsr_gap)[:, 0]
    var_s_true = (as_**2 * c**2 + ss**2)[:, 0]
    u = (x_s[:, 0] - as_[:, 0] * mu) / var_s_true.sqrt()  # standardised by the TRUE level-s marginal
    se = lambda v: v.std().item() / math.sqrt(n)
    assert abs(u.mean().item()) / se(u) < Z_OK  # mean: exact
    expected_u2 = (var_s_ddim / var_s_true).mean().item()  # E[u^2] under the exact DDIM law
    assert abs((u**2).mean().item() - expected_u2) / se(u**2) < Z_OK
    bias = 1 - expected_u2  # discretisation shrinkage of the variance, analytic
    assert 0 <= bias < 0.015, bias  # measured 8.2e-3 (K = 5 steps of 40 on the N = 25 grid, c = 0.5)
    # and the target is the Tweedie estimate of the exact model at (x_t, t): E[x0 | x_t]
    post = mu + (ac[t].sqrt() * c**2 / vt_true)[:, None] * (x_t - ac[t].sqrt()[:, None] * mu)
    torch.testing.assert_close(tgt, post, rtol=0, atol=1e-10)
