"""npo_min.solvers against diffusers' DDIM / Euler / DPM-Solver++(2M) schedulers fed the same model outputs.

A deterministic fake denoiser (exact eps of N(0, I) data plus a fixed random nonlinear term, so the
trajectory stays O(1) and the step formulas all matter) is run by both; every model input (x, t)
along the trajectory and the final sample are compared.

Measured max abs errors (fp32 and fp64 inputs, n in {1, 7, 25}, both spacings, outputs O(3)): <= 4.1e-6
(final sample) and <= 3.4e-6 (model inputs along the trajectory), from diffusers computing betas /
sigmas in float32 (our schedule is float64). Tolerance 1e-5.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from npo_min import solvers
from npo_min.schedule import NoiseSchedule

T = 1000
TOL = 1e-5
SD = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SCHEDULERS = {
    # SD1.5's scheduler config
    "ddim": lambda sp: DDIMScheduler(**SD, timestep_spacing=sp, set_alpha_to_one=False, clip_sample=False),
    "euler": lambda sp: EulerDiscreteScheduler(**SD, timestep_spacing=sp),
    "dpmpp_2m": lambda sp: DPMSolverMultistepScheduler(
        **SD, timestep_spacing=sp, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        final_sigmas_type="zero", lower_order_final=True),
}
D = 8


class FakeDenoiser:
    """eps(x, t) = sigma_t x + 0.3 tanh(A x + b t / 1000); records every (x, t) it is called with."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        self.sig = (1 - NoiseSchedule.sd().alphas_cumprod).sqrt()
        self.calls = []

    def __call__(self, x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        self.calls.append((x.clone(), t.clone()))
        dt = x.dtype
        return self.sig[t].to(dt)[:, None] * x + 0.3 * torch.tanh(x @ self.A.to(dt).T + self.b.to(dt) * t.to(dt)[:, None] / 1000)


def run_diffusers(sched, n, noise, model):
    sched.set_timesteps(n)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        eps = model(x_in, torch.full((x.shape[0],), int(t)))
        x = sched.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 25])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmpp_2m"])
def test_solver_matches_diffusers(solver, spacing, n, dtype):
    g = torch.Generator().manual_seed(n)
    noise = torch.randn(16, D, generator=g, dtype=dtype)
    ref_model, our_model = FakeDenoiser(), FakeDenoiser()
    sched = SCHEDULERS[solver](spacing)
    ref = run_diffusers(sched, n, noise, ref_model)
    ours = solvers.sample(our_model, noise, n, NoiseSchedule.sd(), solver=solver, spacing=spacing)
    assert ours.dtype == dtype and ours.shape == noise.shape
    # same timesteps, in order
    ref_ts = [int(t) for t in sched.timesteps]
    assert [int(t[0]) for _, t in our_model.calls] == ref_ts
    assert len(our_model.calls) == len(ref_model.calls) == n
    # same model inputs at every step (the whole trajectory), and the same output
    for (xo, _), (xr, _) in zip(our_model.calls, ref_model.calls):
        assert (xo - xr).abs().max().item() <= TOL
    err = (ours - ref).abs().max().item()
    assert err <= TOL, err
    assert ref.abs().max() > 0.5  # non-degenerate trajectory


# SD1.5 at 25 steps, for the record (these are the grids the solvers above were checked on)
def test_known_grids():
    assert solvers.make_timesteps(25, "leading")[:3] == [961, 921, 881] and solvers.make_timesteps(25, "leading")[-1] == 1
    assert solvers.make_timesteps(25, "trailing") == list(range(999, 0, -40))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_make_timesteps_vs_diffusers_ddim(spacing):
    """Every n in 1..999. Trailing: diffusers uses np.arange(T, 0, -T/n), whose float increment decides
    .5 ties (n = 48: 936 vs 937 with exact arithmetic). For 62 values of n (61, 103, ...) that arange
    returns n + 1 entries, the last being ~1e-13 -> timestep -1 (a diffusers quirk): compare the first n."""
    ref = DDIMScheduler(**SD, timestep_spacing=spacing, set_alpha_to_one=False, clip_sample=False)
    quirks = 0
    for n in range(1, T):
        ref.set_timesteps(n)
        expected = [int(t) for t in ref.timesteps]
        if len(expected) == n + 1 and spacing == "trailing":
            assert expected[-1] == -1
            expected, quirks = expected[:n], quirks + 1
        ts = solvers.make_timesteps(n, spacing)
        assert ts == expected, (spacing, n)
        assert all(0 <= t < T for t in ts) and all(a > b for a, b in zip(ts, ts[1:]))
    assert quirks == (62 if spacing == "trailing" else 0)


def test_make_timesteps_euler_same_grid():
    for spacing in ("leading", "trailing"):
        ref = EulerDiscreteScheduler(**SD, timestep_spacing=spacing)
        for n in (3, 10, 25, 50):
            ref.set_timesteps(n)
            assert solvers.make_timesteps(n, spacing) == [int(t) for t in ref.timesteps]


def test_make_timesteps_errors():
    with pytest.raises(ValueError, match="1..1000"):
        solvers.make_timesteps(0)
    with pytest.raises(ValueError, match="1..1000"):
        solvers.make_timesteps(1001)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        solvers.make_timesteps(10, "linspace")
    assert all(0 <= t < T for t in solvers.make_timesteps(1000, "leading"))  # clamped into range


def test_sample_errors():
    noise = torch.zeros(2, D)
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.sample(FakeDenoiser(), noise, 10, NoiseSchedule.sd(), solver="heun")
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        solvers.sample(FakeDenoiser(), noise, 10, NoiseSchedule.sd(), solver="ddim", spacing="linspace")
    with pytest.raises(ValueError, match="1..1000"):
        solvers.sample(FakeDenoiser(), noise, 0, NoiseSchedule.sd())


def test_solvers_exact_for_point_mass_data():
    """Independent sanity check (no diffusers): for data = a point mass at mu the exact eps is
    (x_t - alpha_t mu) / sigma_t, x0_hat = mu at every step and eps stays constant along the ODE,
    so Euler and DPM++ (final sigma 0) return mu, and DDIM (final alpha = alphas_cumprod[0], not 1)
    returns sqrt(ac_0) mu + sqrt(1 - ac_0) eps_first."""
    mu = torch.tensor([0.7, -1.3], dtype=torch.float64)
    s = NoiseSchedule.sd()
    ac0 = s.alphas_cumprod[0].item()

    def exact(x, t):  # x_t = a mu + s eps  =>  eps = (x - a mu) / s
        a, sg = s.coefs(t, x)
        return (x - a * mu) / sg

    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for solver in ("ddim", "euler", "dpmpp_2m"):
        for spacing in ("leading", "trailing"):
            calls = []
            out = solvers.sample(lambda x, t: calls.append((x, t)) or exact(x, t), noise, 10, s, solver=solver, spacing=spacing)
            if solver == "ddim":
                eps0 = exact(*calls[0])
                expected = ac0**0.5 * mu + (1 - ac0) ** 0.5 * eps0
            else:
                expected = mu.expand_as(out)
            assert (out - expected).abs().max().item() < 1e-9, (solver, spacing)  # float64 rounding only


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_make_timesteps_vs_diffusers_dpm(spacing):
    """make_timesteps(solver="dpmpp_2m") is DPMSolverMultistepScheduler's own grid (its "leading" differs from DDIM's)."""
    for n in (1, 2, 7, 24, 25, 50):
        ref = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                    timestep_spacing=spacing, steps_offset=1)
        ref.set_timesteps(n)
        assert solvers.make_timesteps(n, spacing, solver="dpmpp_2m") == [int(t) for t in ref.timesteps], n
