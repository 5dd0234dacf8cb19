"""The method as pictures, each computed by the project's own functions (issue 14).

    python -m npo_min.figures --out out/figures                       # about 15 s on 2 CPU cores
    python -m npo_min.figures --out out/figures --neg-ckpt out/self-npo/delta.safetensors   # about 25 s

writes
  fig1_theorem1.png   Self-NPO Thm. 1 on a 2-D Gaussian mixture: x_t re-noised to level s by Eq. 16
                      matches the true level-s marginal; Eq. 15 on the exact Tweedie estimate is too tight
  fig2_rollout.png    a truncated rollout (Eq. 14 start, K DDIM steps on the N-grid, rollout w) on the
                      digits model: x_t and the Tweedie estimate at every point
  fig3_guidance.png   one noise, one class: plain CFG and NPO (theta + beta * delta) across guidance scales
  fig4_schedules.png  alpha_t, sigma_t and nsr_t of the SD1.5 schedule with the Self-NPO grid marked
Every image carries its own title, axis labels and legend. Existing PNGs are kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import check_writable
from .plot import COLORS, GRAYS, Axes, Figure
from .schedule import NoiseSchedule, add_noise
from .self_npo import SelfNPOConfig, ddim_grid, truncated_rollout
from .toy import F64, GaussianMixture, moment_z, renoise_chain

FILES = {1: "fig1_theorem1.png", 2: "fig2_rollout.png", 3: "fig3_guidance.png", 4: "fig4_schedules.png"}

# The figure-1 prior: three anisotropic modes, scale ~1 like SD latents. With s just above t the
# variance that Eq. 15 misses, alpha_s^2 E[Var(x0 | x_t)], is largest near SNR ~ 1 (t ~ 400 on SD1.5).
FIG1_MIXTURE = GaussianMixture(
    [0.3, 0.3, 0.4], [[-1.2, -0.7], [1.2, -0.7], [0.0, 1.2]],
    [[[0.10, 0.05], [0.05, 0.10]], [[0.10, -0.05], [-0.05, 0.10]], [[0.15, 0.0], [0.0, 0.05]]])
HPD_MASSES = (0.5, 0.9, 0.99)  # contours of p_s drawn at the density levels enclosing these masses


# ------------------------------------------------------------------ figure 1: Theorem 1


def theorem1_data(t: int = 400, s: int = 450, n: int = 20000, seed: int = 0, prior: GaussianMixture = FIG1_MIXTURE) -> dict:
    """The clouds of figure 1 and their statistics.

    x0 ~ p_ref, x_t = alpha_t x0 + sigma_t eps, x_{t->0} = E[x0 | x_t] (exact), then x_s by Eq. 16 from
    x_t and by Eq. 15 from x_{t->0}, with the SAME x0, eps and z (both chains use `seed`). Returns a
    dict with the clouds `(n, 2)`, the analytic level-s mean / covariance, the sample covariances, the
    max |z| of mean and covariance entries against the analytic ones (`moment_z`), the log-density
    levels of the 50/90/99% highest-density regions of p_s and the fraction of each cloud inside them.

    Raises:
        ValueError: s < t (Eq. 16 only noises up), or n < 100.
    """
    if not 0 <= t <= s < prior.schedule.num_train_timesteps:
        raise ValueError(f"figure 1 needs 0 <= t <= s <= {prior.schedule.num_train_timesteps - 1}; got t={t}, s={s}.")
    if n < 100:
        raise ValueError(f"figure 1 needs at least 100 samples (--toy-samples); got {n}.")
    x0, x_t, x_t0, x16 = renoise_chain(prior, t, s, n, torch.Generator().manual_seed(seed), "eq16")
    *_, x15 = renoise_chain(prior, t, s, n, torch.Generator().manual_seed(seed), "eq15")
    mean_s, cov_s = prior.level(s)
    # highest-density regions of the true p_s: the density level exceeded with probability q
    ref = torch.Generator().manual_seed(seed + 1)
    a, sg = (torch.tensor(v, dtype=F64) for v in prior.alpha_sigma(s))
    x_ref = add_noise(prior.sample(n, ref), torch.randn(n, prior.d, generator=ref, dtype=F64), a, sg)
    logp_ref = prior.log_density(x_ref, s)
    levels = {q: torch.quantile(logp_ref, 1 - q).item() for q in HPD_MASSES}
    inside = lambda x: {q: (prior.log_density(x, s) > lv).double().mean().item() for q, lv in levels.items()}
    return dict(prior=prior, t=t, s=s, n=n, x0=x0, x_t=x_t, x_t0=x_t0, x16=x16, x15=x15, mean_s=mean_s, cov_s=cov_s,
                cov16=torch.cov(x16.T), cov15=torch.cov(x15.T), z16=moment_z(x16, mean_s, cov_s),
                z15=moment_z(x15, mean_s, cov_s), levels=levels, inside16=inside(x16), inside15=inside(x15))


def _density_grid(prior, t, lim, res=110):
    """log p_t on a res x res grid over [-lim, lim]^2 (row 0 = bottom)."""
    g = torch.linspace(-lim, lim, res, dtype=F64)
    yy, xx = torch.meshgrid(g, g, indexing="ij")  # (res, res): rows = y
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)  # (res*res, 2)
    return prior.log_density(pts, t).reshape(res, res).numpy()  # (res*res,) -> (res, res)


def _ellipse(ax, mean, cov, color, dash=None, k=2.0):
    """The k-sigma ellipse {mean + k L u, |u| = 1} of a 2x2 covariance (L = Cholesky factor)."""
    th = torch.linspace(0, 2 * math.pi, 121, dtype=F64)
    pts = mean[:, None] + k * torch.linalg.cholesky(cov) @ torch.stack([th.cos(), th.sin()])  # (2, 121)
    ax.line(pts[0].numpy(), pts[1].numpy(), color, width=2, dash=dash)


def figure_theorem1(d: dict, path: Path, n_scatter: int = 1500) -> None:
    prior, t, s = d["prior"], d["t"], d["s"]
    at, st = prior.alpha_sigma(t)
    as_, ss = prior.alpha_sigma(s)
    lim = math.ceil(2 * torch.quantile(torch.cat([d["x16"], d["x0"]]).abs().flatten(), 0.997).item()) / 2
    fig = Figure(1560, 1080, f"Self-NPO Theorem 1 on a 2-D Gaussian mixture: re-noising x_t (t = {t}) to level s = {s}, SD1.5 schedule")
    boxes = [(90 + 510 * c, 90 + 500 * r, 90 + 510 * c + 400, 90 + 500 * r + 400) for r in range(2) for c in range(3)]
    logp_s = _density_grid(prior, s, lim)
    m = slice(0, n_scatter)

    def cloud_panel(box, title, pts, color, log_density, levels, heat=False):
        ax = Axes(fig, box, (-lim, lim), (-lim, lim))
        if heat:
            ax.heatmap(np.exp(log_density), vmin=0, stops=GRAYS)
        ax.frame(title, "x[0]", "x[1]", grid=not heat)
        ax.scatter(pts[m, 0].numpy(), pts[m, 1].numpy(), color, radius=1.4)
        for lv in levels:
            ax.contour(log_density, lv, "black", 2)
        return ax

    # (a) x0 and its Tweedie estimate
    logp_0 = _density_grid(prior, None, lim)
    lv0 = _hpd_levels_on_grid(logp_0)
    ax = cloud_panel(boxes[0], "x0 ~ p_ref and Tweedie E[x0 | x_t]", d["x0"], "gray", logp_0, lv0)
    ax.scatter(d["x_t0"][m, 0].numpy(), d["x_t0"][m, 1].numpy(), "tab:orange", radius=1.4)
    ax.legend([("x0 ~ p_ref", "gray", "dot"), (f"E[x0 | x_t], t = {t}", "tab:orange", "dot"), ("p_ref 50/90/99% regions", "black", "line")])
    # (b) x_t on its own marginal
    logp_t = _density_grid(prior, t, lim)
    ax = cloud_panel(boxes[1], f"forward process: x_t = alpha_t x0 + sigma_t eps, t = {t}", d["x_t"], "tab:purple", logp_t,
                     _hpd_levels_on_grid(logp_t), heat=True)
    ax.legend([("x_t", "tab:purple", "dot"), (f"p_t density (shade), 50/90/99% regions", "black", "line")])
    # (d), (e) the two re-noising rules against the true p_s
    levels = list(d["levels"].values())
    for box, key, color, title, rule in (
        (boxes[3], "16", "tab:blue", "Eq. 16: x_s = (alpha_s/alpha_t) x_t + sqrt(...) z", "Eq. 16 from x_t"),
        (boxes[4], "15", "tab:red", "Eq. 15: x_s = alpha_s E[x0 | x_t] + sigma_s z", "Eq. 15 from E[x0|x_t]"),
    ):
        ax = cloud_panel(box, title, d["x" + key], color, logp_s, levels, heat=True)
        _ellipse(ax, d["mean_s"], d["cov_s"], "black", dash=(7, 5))
        _ellipse(ax, d["x" + key].mean(0), d["cov" + key], color)
        ax.legend([(f"x_s, {rule}", color, "dot"), ("true p_s: 50/90/99% regions", "black", "line"),
                   ("2-sd ellipse of p_s (analytic)", "black", "dash"), ("2-sd ellipse of the cloud", color, "line")], corner="tl")
    # (c) the first coordinate: analytic density of p_s against histograms of the two clouds
    bins = torch.linspace(-lim, lim, 41, dtype=F64)
    centres, width = (bins[1:] + bins[:-1]) / 2, (bins[1] - bins[0]).item()
    hist = lambda x: torch.histc(x[:, 0], 40, -lim, lim) / (len(x) * width)
    xs = torch.linspace(-lim, lim, 300, dtype=F64)
    pdf = prior.pdf_1d(xs, s, 0)
    top = 1.25 * max(pdf.max().item(), hist(d["x15"]).max().item())
    ax = Axes(fig, boxes[2], (-lim, lim), (0, top))
    ax.frame(f"coordinate x[0] at level s = {s}", "x[0]", "density")
    ax.line(xs.numpy(), pdf.numpy(), "black", 3)
    ax.line(centres.numpy(), hist(d["x16"]).numpy(), "tab:blue", 2)
    ax.line(centres.numpy(), hist(d["x15"]).numpy(), "tab:red", 2)
    ax.legend([("true p_s (analytic)", "black", "line"), ("Eq. 16 histogram", "tab:blue", "line"),
               ("Eq. 15 histogram", "tab:red", "line")], corner="tl")
    # (f) the numbers
    l, tp, r, b = boxes[5]
    c = lambda C: f"[{C[0, 0]:.3f} {C[0, 1]:+.3f}; {C[1, 1]:.3f}]"
    pct = lambda ins: " / ".join(f"{100 * v:.1f}%" for v in ins.values())
    lines = [
        (f"t = {t}: alpha_t = {at:.3f}, sigma_t = {st:.3f}", "black"),
        (f"s = {s}: alpha_s = {as_:.3f}, sigma_s = {ss:.3f}", "black"),
        (f"n = {d['n']} chains x0 -> x_t -> x_s (same x0, eps, z for both)", "black"),
        ("", "black"),
        ("covariance of x_s [xx xy; yy]", "black"),
        (f"  analytic p_s:  {c(d['cov_s'])}", "black"),
        (f"  Eq. 16:        {c(d['cov16'])}   max|z| = {d['z16']:.1f}", "tab:blue"),
        (f"  Eq. 15:        {c(d['cov15'])}   max|z| = {d['z15']:.1f}", "tab:red"),
        ("  (z: entry minus analytic, in standard errors from n)", "gray"),
        ("", "black"),
        ("mass inside the 50 / 90 / 99% regions of p_s", "black"),
        (f"  Eq. 16:  {pct(d['inside16'])}", "tab:blue"),
        (f"  Eq. 15:  {pct(d['inside15'])}  (too tight)", "tab:red"),
        ("", "black"),
        ("Eq. 16 continues the forward process: x_s ~ p_s exactly.", "black"),
        ("Eq. 15 noises a posterior MEAN, so it misses", "black"),
        ("alpha_s^2 E[Var(x0 | x_t)]: the cloud is too tight.", "black"),
    ]
    for i, (txt, col) in enumerate(lines):
        fig.text((l - 40, tp - 30 + 25 * i), txt, size=15, color=col)
    fig.save(path)


def _hpd_levels_on_grid(logp: np.ndarray) -> list[float]:
    """Density levels enclosing HPD_MASSES of a density sampled on a regular grid (mass by grid sum)."""
    p = np.sort(np.exp(logp).ravel())[::-1]
    cum = np.cumsum(p) / p.sum()
    return [float(np.log(p[min(np.searchsorted(cum, q), len(p) - 1)])) for q in HPD_MASSES]


# ------------------------------------------------------------------ figure 2: truncated rollout


def _pixels(x: torch.Tensor) -> np.ndarray:
    """(8, 8) in [-1, 1] -> uint8 (clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def rollout_data(unet, embed, cfg: SelfNPOConfig, start_t: int, indices: list[int], seed: int = 0) -> dict:
    """A truncated rollout (`truncated_rollout`) from TRAIN-split digits `indices`, started at grid
    timestep `start_t` (Eq. 14); returns the digits, labels and the K + 1 `(x_t, t, x0_hat)` points.

    Raises:
        ValueError: start_t not on the N-point grid, or an index outside the train split.
    """
    from .digits import NULL_CLASS, load_digits

    images, labels = load_digits("train")
    if not indices or min(indices) < 0 or max(indices) >= len(images):
        raise ValueError(f"--digit-indices must lie in 0..{len(images) - 1} (train split); got {indices}.")
    grid = ddim_grid(cfg.num_grid).tolist()
    if start_t not in grid:
        raise ValueError(f"--rollout-t {start_t} is not on the N = {cfg.num_grid} grid {grid}: pick one of these.")
    x0, y = images[indices], labels[indices]
    with torch.no_grad():
        cond, null = embed(y), embed(torch.tensor([NULL_CLASS]))
    trajectory = []
    truncated_rollout(unet, x0, cond, null, NoiseSchedule.sd(), cfg, torch.Generator().manual_seed(seed),
                      start_index=torch.full((len(indices),), grid.index(start_t)), trajectory=trajectory)
    return dict(x0=x0, labels=y, trajectory=trajectory, cfg=cfg, start_t=start_t)


CELL, GAP = 64, 8  # one 8x8 digit upscaled 8x, and the gap between cells


def figure_rollout(d: dict, path: Path) -> None:
    cfg, traj, B = d["cfg"], d["trajectory"], len(d["labels"])
    cols = 1 + len(traj)
    left, top = 240, 150
    width = left + cols * (CELL + GAP) + 40
    height = top + B * (2 * (CELL + GAP) + 20) + 120
    fig = Figure(max(width, 900), height, "Truncated rollout (Self-NPO Eq. 14 + K DDIM steps) on the digits model")
    fig.text((fig.image.width // 2, 44), f"N = {cfg.num_grid} grid, K = {cfg.k} steps, rollout guidance w = {cfg.rollout_w:g}"
             f"{' (unconditional model)' if cfg.rollout_w == -1 else ''}, start t' = {d['start_t']}", size=16, anchor="mt")
    x_col = lambda j: left + j * (CELL + GAP)
    fig.text((x_col(0) + CELL // 2, top - 40), "real x0", size=14, anchor="mb")
    fig.text((x_col(0) + CELL // 2, top - 22), "(train)", size=14, anchor="mb")
    for j, (_, t, _) in enumerate(traj, start=1):
        fig.text((x_col(j) + CELL // 2, top - 40), f"step {j - 1}", size=14, anchor="mb")
        fig.text((x_col(j) + CELL // 2, top - 22), f"t = {int(t[0])}", size=14, anchor="mb")
    fig.draw.line([(x_col(1), top - 60), (x_col(cols) - GAP, top - 60)], fill=COLORS["gray"], width=2)
    fig.text((x_col(cols) - GAP, top - 64), "DDIM (eta = 0)  ->", size=14, anchor="rb", color="gray")
    for i in range(B):
        y0 = top + i * (2 * (CELL + GAP) + 20)
        fig.paste(_pixels(d["x0"][i, 0]), (x_col(0), y0 + (CELL + GAP) // 2), scale=CELL // 8)
        fig.text((20, y0 + CELL // 2), "x_t", size=15, anchor="lm")
        fig.text((20, y0 + CELL // 2 + 18), "(clipped to [-1, 1])", size=12, anchor="lm", color="gray")
        fig.text((20, y0 + CELL + GAP + CELL // 2), "Tweedie E[x0 | x_t]", size=15, anchor="lm")
        fig.text((20, y0 + CELL + GAP + CELL // 2 + 18), f"(digit {int(d['labels'][i])}, Eq. 12)", size=12, anchor="lm", color="gray")
        for j, (x, _, x0_hat) in enumerate(traj, start=1):
            fig.paste(_pixels(x[i, 0]), (x_col(j), y0), scale=CELL // 8)
            fig.paste(_pixels(x0_hat[i, 0]), (x_col(j), y0 + CELL + GAP), scale=CELL // 8)
        last = x_col(cols - 1)
        fig.draw.rectangle([last - 3, y0 + CELL + GAP - 3, last + CELL + 2, y0 + 2 * CELL + GAP + 2], outline=COLORS["tab:red"], width=2)
    note = ["Red box: the training target x_{t->0} (Tweedie estimate at the rollout's end point).",
            "The student regresses it at x_s, re-noised from the end point by Eq. 16 (Eq. 17).",
            "With w = -1 the rollout sees only the null class c', so it may drift away from the digit."]
    for k, s in enumerate(note):
        fig.text((20, height - 100 + 22 * k), s, size=14)
    fig.save(path)


# ------------------------------------------------------------------ figure 3: guidance composition


def guidance_data(unet, embed, digit: int, scales: list[float], betas: list[float], delta: dict | None,
                  steps: int = 25, seed: int = 0) -> dict:
    """Samples `(1, 8, 8)` for one class and one noise: plain CFG (negative = the base model) and,
    with a delta, NPO (negative = theta + beta * delta, Diffusion-NPO Eq. 10) per beta, per scale."""
    from .digits import sample_digits
    from .guidance import negative_model

    noise = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([digit])
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    rows = [("plain CFG: theta", unet)]
    if delta is not None:
        rows += [(f"NPO: theta + {b:g} delta", negative_model(unet, base, delta=delta, beta=b)) for b in betas]
    grid = [[sample_digits(unet, neg, embed, labels, noise, g, steps=steps)[0] for g in scales] for _, neg in rows]
    return dict(rows=[r for r, _ in rows], grid=grid, scales=scales, digit=digit, seed=seed, steps=steps)


def figure_guidance(d: dict, path: Path, delta_note: str) -> None:
    nr, nc = len(d["rows"]), len(d["scales"])
    top = 170
    width = max(230 + nc * (CELL + GAP) + 60, 980)
    left = max(230, (width - nc * (CELL + GAP)) // 2 + 60)  # the grid centred, room for the row labels
    height = top + nr * (CELL + GAP) + 120
    fig = Figure(width, height, f"Guidance composition on the digits model: digit {d['digit']}, one fixed noise (seed {d['seed']})")
    fig.text((width // 2, 44), "eps = eps_neg + scale (eps_pos - eps_neg)  (Diffusion-NPO Eq. 9);  "
             "negative weights theta + beta delta  (Eq. 10)", size=15, anchor="mt")
    fig.text((left + nc * (CELL + GAP) / 2, top - 62), "guidance scale (= w + 1)", size=16, anchor="mb")
    for j, g in enumerate(d["scales"]):
        fig.text((left + j * (CELL + GAP) + CELL // 2, top - 10), f"{g:g}", size=15, anchor="mb")
    fig.text((left - 12, top - 10), "negative model", size=16, anchor="rb")
    for i, name in enumerate(d["rows"]):
        y = top + i * (CELL + GAP)
        fig.text((left - 12, y + CELL // 2), name, size=15, anchor="rm")
        for j, img in enumerate(d["grid"][i]):
            fig.paste(_pixels(img[0]), (left + j * (CELL + GAP), y), scale=CELL // 8)
    for k, s in enumerate([f"DDIM, {d['steps']} steps, trailing spacing; the same noise in every cell. Scale 1 = the positive model alone.",
                           delta_note]):
        fig.text((20, height - 90 + 24 * k), s, size=14, color="black" if k == 0 else "tab:red" if "No NPO" in s else "black")
    fig.save(path)


# ------------------------------------------------------------------ figure 4: schedules


def schedules() -> list[tuple[str, NoiseSchedule]]:
    """The schedules drawn in figure 4, (name, NoiseSchedule): SD1.5 / SDXL, and CogVideoX (v-prediction,
    SNR shift, zero terminal SNR: alpha_{T-1} = 0, nsr = inf at the end)."""
    return [("SD1.5 / SDXL scaled-linear", NoiseSchedule.sd()),
            ("CogVideoX-2B: SNR shift 3, zero terminal SNR", NoiseSchedule.cogvideox(3.0)),
            ("CogVideoX-5B: zero terminal SNR", NoiseSchedule.cogvideox(1.0))]


def figure_schedules(named: list[tuple[str, NoiseSchedule]], num_grid: int, path: Path) -> None:
    fig = Figure(1400, 640, f"Noise schedules: alpha_t, sigma_t and nsr_t = sigma_t / alpha_t, with the Self-NPO grid (N = {num_grid})")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    left = Axes(fig, (100, 90, 640, 520), (0, 999), (0, 1))
    left.frame("alpha_t (solid) and sigma_t (dashed)", "timestep t", "alpha_t, sigma_t")
    nsr_all = torch.cat([s.nsr(torch.arange(s.num_train_timesteps)) for _, s in named])
    nsr_all = nsr_all[torch.isfinite(nsr_all) & (nsr_all > 0)]
    lo, hi = 10 ** math.floor(math.log10(nsr_all.min())), 10 ** math.ceil(math.log10(nsr_all.max()))
    right = Axes(fig, (800, 90, 1340, 520), (0, 999), (lo, hi), ylog=True)
    right.frame("nsr_t (log axis)", "timestep t", "nsr_t = sigma_t / alpha_t")
    entries_l, entries_r = [], []
    for k, (name, sched) in enumerate(named):
        c = colors[k % len(colors)]
        T = sched.num_train_timesteps
        t = torch.arange(T)
        grid = ddim_grid(num_grid, T)
        left.line(t.numpy(), sched.alpha(t).numpy(), c, 2)
        left.line(t.numpy(), sched.sigma(t).numpy(), c, 2, dash=(8, 5))
        left.scatter(grid.numpy(), sched.alpha(grid).numpy(), c, radius=3.5, outline="black")
        left.scatter(grid.numpy(), sched.sigma(grid).numpy(), c, radius=3.5, outline="black")
        right.line(t.numpy(), sched.nsr(t).numpy(), c, 2)
        right.scatter(grid.numpy(), sched.nsr(grid).numpy(), c, radius=3.5, outline="black")
        entries_l += [(f"{name}: alpha_t", c, "line"), (f"{name}: sigma_t", c, "dash")]
        nsr_g = sched.nsr(grid)
        end = f"{nsr_g[-1]:.3g}" if torch.isfinite(nsr_g[-1]) else f"inf (t = {int(grid[-1])}, off the axis)"
        entries_r += [(f"{name}: nsr_t {nsr_g[0]:.3g} .. {end} on the grid", c, "line")]
    dots = (f"Self-NPO grid: t = {', '.join(map(str, ddim_grid(num_grid).tolist()[:3]))}, ..., "
            f"{ddim_grid(num_grid).tolist()[-1]}", "black", "dot")
    left.legend(entries_l + [dots], corner="bl")
    right.legend(entries_r + [dots], corner="br")
    fig.text((100, 575), "The rollout walks down this grid (K steps of T/N); Eq. 16 then re-noises from t to s > t, "
             "which needs nsr_s >= nsr_t (nsr increases with t).", size=15)
    fig.save(path)


# ------------------------------------------------------------------ CLI


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m npo_min.figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/figures", help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs")
    p.add_argument("--figures", type=_ints, default=[1, 2, 3, 4], help="which figures, e.g. 1,4 (default: 1,2,3,4)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    p.add_argument("--thm1-t", type=int, default=400, help="fig 1: level t of x_t (default: %(default)s)")
    p.add_argument("--thm1-s", type=int, default=450, help="fig 1: target level s >= t (default: %(default)s)")
    p.add_argument("--toy-samples", type=int, default=20000, help="fig 1: chains x0 -> x_t -> x_s (default: %(default)s)")
    p.add_argument("--weights", default=None, help="figs 2-3: digits model folder (default: weights/digits)")
    p.add_argument("--num-grid", type=int, default=25, help="figs 2, 4: N, the DDIM grid (default: %(default)s)")
    p.add_argument("--k", type=int, default=5, help="fig 2: K rollout steps (default: %(default)s)")
    p.add_argument("--rollout-w", type=float, default=-1.0, help="fig 2: guidance weight in the rollout (default: %(default)s)")
    p.add_argument("--rollout-t", type=int, default=439, help="fig 2: start t' on the grid (default: %(default)s)")
    p.add_argument("--digit-indices", type=_ints, default=[0, 1, 2], help="fig 2: train-split digits (default: 0,1,2)")
    p.add_argument("--neg-ckpt", default=None, help="fig 3: NPO delta.safetensors (default: none, CFG row only)")
    p.add_argument("--ignore-fingerprint", action="store_true", help="fig 3: apply a delta made for another base")
    p.add_argument("--digit", type=int, default=3, help="fig 3: the class 0..9 (default: %(default)s)")
    p.add_argument("--scales", type=_floats, default=[1.0, 1.5, 3.0, 5.0, 7.5], help="fig 3: guidance scales (default: 1,1.5,3,5,7.5)")
    p.add_argument("--betas", type=_floats, default=[0.5, 1.0, 2.0], help="fig 3: NPO betas (default: 0.5,1,2)")
    p.add_argument("--steps", type=int, default=25, help="fig 3: DDIM sampling steps (default: %(default)s)")
    args = p.parse_args(argv)
    if not args.figures or not set(args.figures) <= set(FILES):
        p.error(f"--figures must be a subset of 1,2,3,4; got {args.figures}.")
    if not 0 <= args.digit <= 9:
        p.error(f"--digit must be in 0..9; got {args.digit}.")
    if args.steps < 1 or not args.scales:
        p.error("--steps must be >= 1 and --scales non-empty.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # batch-1 8x8 digits: one thread is fastest, and far faster on a busy machine
    out = Path(args.out)
    paths = {k: check_writable(out / FILES[k], args.overwrite) for k in sorted(set(args.figures))}  # fail before any work
    cfg = SelfNPOConfig(num_grid=args.num_grid, k=args.k, rollout_w=args.rollout_w)
    unet = embed = None
    if {2, 3} & set(paths):
        from .digits import DEFAULT_WEIGHTS, load_digits_model

        unet, embed, _ = load_digits_model(args.weights or DEFAULT_WEIGHTS)
    for k, path in paths.items():
        start = time.time()
        if k == 1:
            d = theorem1_data(args.thm1_t, args.thm1_s, args.toy_samples, args.seed)
            figure_theorem1(d, path)
            info = (f"t={d['t']} s={d['s']} n={d['n']}: cov(p_s) {d['cov_s'].flatten().numpy().round(4).tolist()}, "
                    f"Eq.16 {d['cov16'].flatten().numpy().round(4).tolist()} (max|z| {d['z16']:.1f}), "
                    f"Eq.15 {d['cov15'].flatten().numpy().round(4).tolist()} (max|z| {d['z15']:.1f})")
        elif k == 2:
            figure_rollout(rollout_data(unet, embed, cfg, args.rollout_t, args.digit_indices, args.seed), path)
            info = f"K={cfg.k}, N={cfg.num_grid}, w={cfg.rollout_w:g}, t'={args.rollout_t}"
        elif k == 3:
            delta, note = None, ("No NPO rows: no --neg-ckpt given. Make a delta with `python train.py` (about 5 min) "
                                 "and pass --neg-ckpt out/self-npo/delta.safetensors.")
            if args.neg_ckpt:
                from .offsets import read_delta

                base = {n: v.clone() for n, v in unet.state_dict().items()}
                delta, meta = read_delta(args.neg_ckpt, base, check_fingerprint=not args.ignore_fingerprint)
                note = (f"delta: {args.neg_ckpt} (K = {meta.get('k', '?')}, {meta.get('steps', '?')} steps, "
                        f"lr {meta.get('lr', '?')}); plain CFG = beta 0.")
            figure_guidance(guidance_data(unet, embed, args.digit, args.scales, args.betas, delta, args.steps, args.seed), path, note)
            info = f"digit {args.digit}, scales {args.scales}, " + (f"betas {args.betas}" if delta is not None else "CFG only")
        else:
            figure_schedules(schedules(), args.num_grid, path)
            info = ", ".join(name for name, _ in schedules())
        print(f"wrote {path} ({time.time() - start:.1f} s): {info}")


if __name__ == "__main__":
    from npo_min.cli import run

    run(main)
