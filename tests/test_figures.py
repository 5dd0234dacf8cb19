"""python -m npo_min.figures on a tiny setting, the statistic behind figure 1, and the plot helper.

Figure 1's claim, checked at the figure's own defaults (t = 400, s = 450, n = 20000): the covariance
of the Eq. 16 cloud equals the analytic level-s covariance of the mixture within 5 standard errors
per entry (SE estimated from the n samples: sd of the centred products / sqrt(n)), and the Eq. 15
cloud is more than 10 SE off, too small on the diagonal.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from npo_min import figures
from npo_min.checkpoint import fingerprint
from npo_min.offsets import save_delta
from npo_min.digits import load_digits_model
from npo_min.plot import Axes, Figure, marching_squares, nice_ticks
from npo_min.self_npo import SelfNPOConfig, ddim_grid, truncated_rollout
from npo_min.schedule import NoiseSchedule

Z_OK, Z_FAIL = 5.0, 10.0


def cov_z(x: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """(d, d) z-scores of the sample covariance of x (n, d) against cov."""
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]  # (n, d, d)
    return (prods.mean(0) - cov) / (prods.std(0) / math.sqrt(len(x)))


def test_theorem1_covariances():
    d = figures.theorem1_data()  # the figure's defaults
    assert (d["t"], d["s"], d["n"]) == (400, 450, 20000)
    z16, z15 = cov_z(d["x16"], d["cov_s"]), cov_z(d["x15"], d["cov_s"])
    assert z16.abs().max() < Z_OK, z16
    assert z15.abs().max() > Z_FAIL, z15
    assert (torch.diagonal(d["cov15"]) < torch.diagonal(d["cov_s"])).all()  # too tight, not merely different
    # the 50% highest-density region of p_s holds ~50% of the Eq. 16 cloud (binomial SE), more of Eq. 15's
    se = math.sqrt(0.25 / d["n"])
    assert abs(d["inside16"][0.5] - 0.5) < Z_OK * se
    assert d["inside15"][0.5] - 0.5 > Z_FAIL * se


def test_theorem1_rejects_s_below_t():
    with pytest.raises(ValueError, match="t <= s"):
        figures.theorem1_data(t=500, s=400)


def test_marching_squares_circle():
    """The contour {x^2 + y^2 = r^2} of a sampled field: every vertex within 0.5% of r, total length 2 pi r within 0.5%."""
    res, half, r = 201, 1.0, 0.6
    g = np.linspace(-half, half, res)
    field = g[None, :] ** 2 + g[:, None] ** 2  # (res, res), rows = y
    segs = marching_squares(field, r**2)
    to_xy = lambda p: (-half + p[0] * 2 * half / (res - 1), -half + p[1] * 2 * half / (res - 1))
    pts = np.array([to_xy(p) for seg in segs for p in seg])
    radii = np.hypot(pts[:, 0], pts[:, 1])
    assert np.abs(radii / r - 1).max() < 5e-3
    length = sum(math.dist(to_xy(a), to_xy(b)) for a, b in segs)
    assert abs(length / (2 * math.pi * r) - 1) < 5e-3
    # a level outside the field's range draws nothing; a saddle cell gives two segments
    assert marching_squares(field, 10.0) == []
    assert len(marching_squares(np.array([[1.0, 0.0], [0.0, 1.0]]), 0.5)) == 2


def test_nice_ticks_and_axes_mapping():
    assert nice_ticks(0, 999) == [0, 200, 400, 600, 800]
    fig = Figure(200, 100)
    ax = Axes(fig, (10, 10, 110, 60), (0, 1), (1e-2, 1e2), ylog=True)
    x, y = ax.px(np.array([0.0, 1.0]), np.array([1e-2, 1.0]))
    assert x.tolist() == [10, 110] and y.tolist() == [60, 35]


def test_rollout_trajectory_does_not_change_results():
    """truncated_rollout with trajectory= returns the same end point, and its last entry is that end point."""
    unet, embed, _ = load_digits_model()
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    cond, null = embed(torch.tensor([1, 7])).detach(), embed(torch.tensor([10])).detach()
    cfg = SelfNPOConfig(num_grid=25, k=2)
    plain = truncated_rollout(unet, x0, cond, null, NoiseSchedule.sd(), cfg, torch.Generator().manual_seed(3))
    traj = []
    logged = truncated_rollout(unet, x0, cond, null, NoiseSchedule.sd(), cfg, torch.Generator().manual_seed(3), trajectory=traj)
    for a, b in zip(plain, logged):
        assert torch.equal(a, b)
    assert len(traj) == cfg.k + 1 and torch.equal(traj[-1][0], plain[0]) and torch.equal(traj[-1][2], plain[2])
    # start_index: the rollout starts there and walks K grid steps down
    traj = []
    truncated_rollout(unet, x0, cond, null, NoiseSchedule.sd(), cfg, start_index=torch.tensor([10, 1]), trajectory=traj)
    grid = ddim_grid(25)
    assert [t.tolist() for _, t, _ in traj] == [[grid[10], grid[1]], [grid[9], grid[0]], [grid[8], 0]]
    with pytest.raises(ValueError, match="start_index"):
        truncated_rollout(unet, x0, cond, null, NoiseSchedule.sd(), cfg, start_index=torch.tensor([25, 0]))


def _check_pngs(out, expected_sizes):
    for name, size in expected_sizes.items():
        path = out / name
        with Image.open(path) as img:
            img.verify()  # a complete, uncorrupted PNG
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == size, (name, img.size)
            assert len(img.convert("L").getcolors(1 << 16)) > 10  # not blank


def test_figures_cli_tiny(tmp_path, capsys):
    """All four figures on a tiny setting, NPO rows from a small random delta; refuses to overwrite."""
    unet, _, _ = load_digits_model()
    base = unet.state_dict()
    g = torch.Generator().manual_seed(0)
    trained = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    delta_file = save_delta(trained, base, tmp_path / "delta.safetensors", {"base": "digits", "k": 5, "steps": 0})
    out = tmp_path / "figs"
    args = ["--out", str(out), "--toy-samples", "500", "--k", "2", "--rollout-t", "119", "--digit-indices", "0,5",
            "--scales", "1,3", "--betas", "1", "--steps", "2", "--neg-ckpt", str(delta_file)]
    figures.main(args)
    printed = capsys.readouterr().out
    assert printed.count("wrote") == 4 and "betas [1.0]" in printed
    # fig 2: 1 + (K + 1) columns, 2 digits; fig 3: 2 rows (CFG, beta 1), 2 scales; both at their minimum widths
    _check_pngs(out, {"fig1_theorem1.png": (1560, 1080), "fig2_rollout.png": (900, 150 + 2 * (2 * 72 + 20) + 120),
                      "fig3_guidance.png": (980, 170 + 2 * 72 + 120), "fig4_schedules.png": (1400, 640)})
    with pytest.raises(FileExistsError, match="--overwrite"):
        figures.main(args)
    figures.main(args + ["--overwrite", "--figures", "4"])
    assert fingerprint(base) == fingerprint(load_digits_model()[0].state_dict())  # nothing modified the base


def test_figures_cli_errors(tmp_path):
    with pytest.raises(ValueError, match="not on the N = 25 grid"):
        figures.main(["--out", str(tmp_path), "--figures", "2", "--rollout-t", "100"])
    with pytest.raises(SystemExit):
        figures.main(["--out", str(tmp_path), "--figures", "5"])
    assert not list(tmp_path.glob("*.png"))


def test_schedules_figure_takes_zero_terminal_snr(tmp_path):
    """figure_schedules with a second, zero-terminal-SNR schedule (alpha_{T-1} = 0, nsr = inf there), as
    CogVideoX's will be: the infinite end point is left out of the log axis instead of failing."""
    ac = NoiseSchedule.sd().alphas_cumprod
    a = ac.sqrt()
    a = (a - a[-1]) * a[0] / (a[0] - a[-1])  # rescaled so alpha_{T-1} = 0 (Lin et al. 2024, Alg. 1)
    named = [("SD1.5 scaled-linear", NoiseSchedule.sd()), ("zero-terminal-SNR", NoiseSchedule(a**2))]
    figures.figure_schedules(named, 25, tmp_path / "s.png")
    _check_pngs(tmp_path, {"s.png": (1400, 640)})
