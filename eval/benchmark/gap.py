"""The gap to a baseline's curve at equal Frechet distance, with its standard error.

Guidance trades fidelity (margin of the intended class) against distance to the real data (FD) as the scale
grows, so comparing two methods at the same *scale* mixes both. The issue's measure compares them at the same
FD. A method traced over guidance scales is a polyline of (FD, margin) points, linear between neighbouring
scales; its frontier F(fd) is the best margin it reaches anywhere on that polyline at an FD no worse than fd
(FD is not monotonic in the scale: it falls, then rises, so a low scale can be beaten by the same method's higher
scale on both axes). At each of the method's scales, with fd = its FD there,

    gap = F_method(fd) - F_baseline(fd)

the best margin the method reaches at that FD minus the best the baseline (plain CFG, or autoguidance) reaches.
gap > 0: the method's frontier is above the baseline's; the baseline against itself gives 0. When fd is below
every FD the baseline's scales reach, the gap is undefined (NaN, shown as "-"): the method is closer to the data
than the baseline ever gets, a comparison the margin alone cannot make.

The same comparison the other way round, for the methods whose FD leaves the baseline's range: the FD gain at
equal margin, G_baseline(m) - G_method(m), where G(m) is the lowest FD a method reaches at a margin no worse than m
and m is the method's margin at that scale (> 0: the method reaches that margin closer to the data; FD units).

Two noise sources make up each standard error (`gap_table`):
  - the sample set: the same sample indices are resampled with replacement for every method and the baseline
    (the samples are seed-paired), margins and FDs recomputed, the gap recomputed; `n_boot` times;
  - training: each trained variant is run with >= 2 training seeds (`-seedS` suffixes); between-seed standard
    error of the mean gap = std over seeds / sqrt(S).
    SE = sqrt(SE_seeds^2 + SE_sample^2), the sample part taken from the bootstrap of the seed-mean gap.
"""

from __future__ import annotations

import math
import re

import torch

from eval.metrics import feature_stats, frechet_distance_from_stats

SEED_SUFFIX = re.compile(r"-seed(\d+)$")


def family(method: str) -> str:
    """The variant a method row belongs to: its name without the `-seedS` training-seed suffix."""
    return SEED_SUFFIX.sub("", method)


def margin_at_fd(curve: list[tuple[float, float]], fd: float) -> float:
    """The largest margin on the polyline `curve` [(FD, margin), ...] (ordered by scale) at FD <= `fd`; NaN if none.

    Along a segment both FD and margin are linear, so the maximum is at a vertex with FD <= fd or where the
    segment crosses FD = fd.
    """
    candidates = [m for f, m in curve if f <= fd]
    for (f0, m0), (f1, m1) in zip(curve, curve[1:]):
        if f0 != f1 and min(f0, f1) <= fd <= max(f0, f1):
            candidates.append(m0 + (fd - f0) / (f1 - f0) * (m1 - m0))  # linear in FD along the segment
    return max(candidates) if candidates else math.nan


def fd_at_margin(curve: list[tuple[float, float]], margin: float) -> float:
    """The lowest FD on the polyline `curve` [(FD, margin), ...] at a margin >= `margin`; NaN if none."""
    candidates = [f for f, m in curve if m >= margin]
    for (f0, m0), (f1, m1) in zip(curve, curve[1:]):
        if m0 != m1 and min(m0, m1) <= margin <= max(m0, m1):
            candidates.append(f0 + (margin - m0) / (m1 - m0) * (f1 - f0))  # linear in margin along the segment
    return min(candidates) if candidates else math.nan


def gaps(points: dict[str, list[tuple[float, float, float]]], baseline: str, measure: str = "margin") -> dict[str, list[float]]:
    """{method: [gap at each of its scales]} to `baseline`'s frontier. points: {method: [(scale, FD, margin), ...]}.

    measure "margin": F_method(FD) - F_baseline(FD) (margin units); "fd": G_baseline(margin) - G_method(margin)
    (FD units; > 0 = closer to the data at equal margin).
    """
    curve = lambda pts: [(f, m) for _, f, m in sorted(pts)]
    if measure == "margin":
        return {name: [margin_at_fd(curve(pts), fd) - margin_at_fd(curve(points[baseline]), fd) for _, fd, _ in sorted(pts)]
                for name, pts in points.items() if name != baseline}
    return {name: [fd_at_margin(curve(points[baseline]), m) - fd_at_margin(curve(pts), m) for _, _, m in sorted(pts)]
            for name, pts in points.items() if name != baseline}


def _points(samples: dict, ref_stats, idx: torch.Tensor | None = None) -> dict[str, list[tuple[float, float, float]]]:
    points = {}
    for (method, scale), (margin, feats) in samples.items():
        if idx is not None:
            margin, feats = margin[idx], feats[idx]
        fd = frechet_distance_from_stats(*ref_stats, *feature_stats(feats))
        points.setdefault(method, []).append((scale, fd, margin.double().mean().item()))
    return points


def gap_table(samples: dict, ref_feats: torch.Tensor, baselines: list[str], n_boot: int = 200,
              seed: int = 0) -> list[dict]:
    """Gap rows {family, baseline, measure, guidance_scale, gap, se, se_seeds, se_sample, seeds, z} for every method
    family, measure "margin" (at equal FD) and "fd" (FD gain at equal margin).

    samples: {(method, guidance scale): (margins `(N,)`, features `(N, F)`)}, the same N seed-paired samples for
    every method and scale (eval.benchmark.evaluate's keep); ref_feats `(M, F)`: the held-out reference features.
    baselines: method names whose curves the others are compared with ("cfg", autoguidance rows).
    A family's gap is the mean over its seeds; z = gap / se. NaN where the gap is undefined.
    """
    ref_stats = feature_stats(ref_feats)
    n = len(next(iter(samples.values()))[0])
    methods = list(dict.fromkeys(m for m, _ in samples))
    families: dict[str, list[str]] = {}
    for m in methods:
        if m not in baselines:
            families.setdefault(family(m), []).append(m)

    measures = ("margin", "fd")
    members = sum(families.values(), [])

    def member_gaps(points) -> dict[tuple[str, str], dict[str, list[float]]]:  # (baseline, measure) -> {method: gaps}
        return {(b, measure): gaps({m: points[m] for m in [b, *members]}, b, measure) for b in baselines for measure in measures}

    def family_means(per_method) -> dict[tuple, torch.Tensor]:  # (family, baseline, measure) -> (scales,) seed-mean gap
        return {(fam, b, measure): torch.tensor([g[m] for m in ms], dtype=torch.float64).mean(0)
                for (b, measure), g in per_method.items() for fam, ms in families.items()}

    point = member_gaps(_points(samples, ref_stats))
    estimate = family_means(point)
    gen = torch.Generator().manual_seed(seed)
    boots = [family_means(member_gaps(_points(samples, ref_stats, torch.randint(0, n, (n,), generator=gen))))
             for _ in range(n_boot)]
    rows = []
    for (b, measure), per_method in point.items():
        for fam, ms in families.items():
            seeds = torch.tensor([per_method[m] for m in ms], dtype=torch.float64)  # (S, scales)
            boot = torch.stack([r[fam, b, measure] for r in boots])  # (n_boot, scales)
            for i, scale in enumerate(sorted(s for m, s in samples if m == ms[0])):
                g = estimate[fam, b, measure][i].item()
                finite = boot[:, i][boot[:, i].isfinite()]
                se_sample = finite.std().item() if len(finite) > 1 else math.nan
                se_seeds = (seeds[:, i].std() / len(ms) ** 0.5).item() if len(ms) > 1 else math.nan
                se = math.sqrt(se_sample ** 2 + (0.0 if math.isnan(se_seeds) else se_seeds ** 2))
                rows.append({"family": fam, "baseline": b, "measure": measure, "guidance_scale": scale, "gap": g,
                             "se": se, "se_seeds": se_seeds, "se_sample": se_sample, "seeds": len(ms),
                             "z": g / se if se > 0 and not math.isnan(g) else math.nan})
    return rows


def format_gaps(rows: list[dict], baseline: str, measure: str = "margin") -> str:
    """Markdown: one row per family, `gap ± se (z)` per guidance scale, against `baseline`'s curve."""
    mine = [r for r in rows if r["baseline"] == baseline and r.get("measure", "margin") == measure]
    scales = sorted({r["guidance_scale"] for r in mine})
    lines = [f"| method (training seeds) | " + " | ".join(f"scale {s:g}" for s in scales) + " |", "|---" * (len(scales) + 1) + "|"]
    for fam in dict.fromkeys(r["family"] for r in mine):
        cells = {r["guidance_scale"]: r for r in mine if r["family"] == fam}
        fmt = lambda r: "-" if r is None or math.isnan(r["gap"]) else f"{r['gap']:+.2f} ± {r['se']:.2f} ({r['z']:+.1f})"
        seeds = next(iter(cells.values()))["seeds"]
        lines.append(f"| {fam} ({seeds}) | " + " | ".join(fmt(cells.get(s)) for s in scales) + " |")
    return "\n".join(lines)


def winners(rows: list[dict], z: float = 2.0, primary: str = "cfg", measure: str = "margin") -> list[tuple[str, float]]:
    """(family, scale) points above `primary`'s frontier by more than `z` standard errors in `measure` and above every
    other baseline's by as much where that gap is defined (outside a baseline's range it cannot be compared)."""
    by_point: dict[tuple[str, float], list[dict]] = {}
    for r in (r for r in rows if r.get("measure", "margin") == measure):
        by_point.setdefault((r["family"], r["guidance_scale"]), []).append(r)
    out = []
    for key, rs in by_point.items():
        first = next((r for r in rs if r["baseline"] == primary), None)
        if first is not None and first["z"] > z and all(math.isnan(r["gap"]) or r["z"] > z for r in rs):
            out.append(key)
    return out
