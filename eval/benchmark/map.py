"""The map: where Self-NPO helps, on each base model, per guidance scale, in two measures against plain CFG.

    python -m eval.benchmark.map        # reads eval/reports/*/results.json, writes eval/reports/map.png, map_gap.png, map.md

One line per base (the digits model; the fashion model at 10%, 30% and 100% of its pretraining), from the
`self-npo-k5` rows that `eval.results` wrote (a base whose results are missing is left out, and said so):
  - map.png: the seed-paired win rate (above 50%: Self-NPO's negative gives a higher intended-class margin than
    CFG's on most seeds);
  - map_gap.png: the gap to the CFG curve at equal FD (eval/benchmark/gap.py; above 0: a better margin than CFG
    reaches at the same FD), with +-2 standard errors where the report has them (reports written before the gap
    existed: the point estimate from their rows, no error bar).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from eval.benchmark.gap import family, gaps
from npo_min import cli
from npo_min.checkpoint import atomic_write
from npo_min.pipelines import ROOT

BASES = {  # label -> report folder, weak to strong within a family
    "fashion, 10% base": "fashion-10pct", "fashion, 30% base": "fashion-30pct", "fashion, shipped": "fashion",
    "digits, shipped": "digits",
}


def collect(reports: Path, method: str = "self-npo-k5") -> dict[str, list[tuple]]:
    """{base label: [(guidance scale, win rate vs CFG, n, gap vs CFG at equal FD, its SE or NaN), ...]} for the bases
    whose results.json exists."""
    out = {}
    for label, folder in BASES.items():
        path = reports / folder / "results.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        rows = [r for r in report["rows"] if r["method"] in ("cfg", method)]
        if "gaps" in report:
            gap = {g["guidance_scale"]: (g["gap"], g["se"]) for g in report["gaps"]
                   if g["family"] == method and g["baseline"] == "cfg" and g.get("measure", "margin") == "margin"}
        else:
            points = {m: [(r["guidance_scale"], r["fd"], r["margin"]) for r in rows if r["method"] == m] for m in ("cfg", method)}
            gap = {s: (g, math.nan) for s, g in zip(sorted(s for s, _, _ in points[method]), gaps(points, "cfg")[method])}
        out[label] = [(r["guidance_scale"], r["win_vs_cfg"], r["n"], *gap.get(r["guidance_scale"], (math.nan, math.nan)))
                      for r in rows if r["method"] == method]
    return out


def shift_vs_gap(report: dict) -> tuple[list[tuple[str, float, float]], float]:
    """Per variant family of one report: (family, mean shift of its negative over timesteps and seeds, mean margin gap
    to CFG at equal FD over scales where defined), sorted by shift, and the Spearman rank correlation of the two."""
    shift: dict[str, list[float]] = {}
    for r in report["shift"]:
        if r["method"] != "cfg" and not r["method"].startswith("autoguide"):
            shift.setdefault(family(r["method"]), []).append(r["shift"])
    gap: dict[str, list[float]] = {}
    for g in report["gaps"]:
        if g["baseline"] == "cfg" and g.get("measure", "margin") == "margin" and not math.isnan(g["gap"]):
            gap.setdefault(g["family"], []).append(g["gap"])
    rows = sorted(((f, sum(v) / len(v), sum(gap[f]) / len(gap[f])) for f, v in shift.items() if f in gap), key=lambda r: r[1])
    n = len(rows)
    if n < 3:
        return rows, math.nan
    rank = lambda vals: {v: i for i, v in enumerate(sorted(vals))}  # no ties in practice (float means)
    rx, ry = rank([r[1] for r in rows]), rank([r[2] for r in rows])
    d2 = sum((rx[r[1]] - ry[r[2]]) ** 2 for r in rows)
    return rows, 1 - 6 * d2 / (n * (n * n - 1))


def plot(lines: dict, path: Path, gap: bool = False) -> None:
    """Win rate (y, 0..100%; gap=False) or the gap at equal FD (y, margin units, +-2 SE bars; gap=True) against
    guidance scale (x), one polyline per base; the no-effect line (50% / 0) dashed."""
    W, H, pad, legend = 900, 480, 60, 200  # the legend sits right of the plot, never over a line
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = {label: [(p[0], p[3] if gap else p[1], 2 * p[4] if gap and not math.isnan(p[4]) else 0.0) for p in v
                   if not math.isnan(p[3] if gap else p[1])] for label, v in lines.items()}
    xs = [s for v in pts.values() for s, _, _ in v]
    ys = [y + e * k for v in pts.values() for _, y, e in v for k in (-1, 1)] + ([0.0] if gap else [0.0, 1.0])
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x0, x1 = x0 - 0.04 * (x1 - x0), x1 + 0.04 * (x1 - x0)  # keep the end points (and their bars) off the frame
    sx = lambda v: pad + (v - x0) / max(x1 - x0, 1e-9) * (W - legend - 2 * pad)
    sy = lambda v: H - pad - (v - y0) / max(y1 - y0, 1e-9) * (H - 2 * pad)
    d.rectangle([pad, pad, W - legend - pad, H - pad], outline="black")
    zero = 0.0 if gap else 0.5
    for x in range(pad, W - legend - pad, 12):
        d.line([(x, sy(zero)), (x + 6, sy(zero))], fill="gray")
    d.text((W // 2 - 60, H - pad + 30), "guidance scale", fill="black")
    d.text((8, pad - 30), "Self-NPO (K 5, defaults) vs plain CFG: " + (
        "margin gap to the CFG curve at equal FD (+-2 SE)" if gap else "seed-paired win rate"), fill="black")
    for v in ((y0, 0.0, y1) if gap else (0.0, 0.25, 0.5, 0.75, 1.0)):
        d.text((4, sy(v) - 6), f"{v:+.2f}" if gap else f"{100 * v:.0f}%", fill="black")
    for v in sorted(set(xs)):
        d.text((sx(v) - 6, H - pad + 6), f"{v:g}", fill="black")
    colors = ["orange", "red", "blue", "black", "green", "purple"]
    for i, (label, v) in enumerate(pts.items()):
        c = colors[i % len(colors)]
        if len(v) > 1:
            d.line([(sx(s), sy(y)) for s, y, _ in v], fill=c, width=2)
        for s, y, e in v:
            d.ellipse([sx(s) - 3, sy(y) - 3, sx(s) + 3, sy(y) + 3], fill=c)
            if e:
                d.line([(sx(s), sy(y - e)), (sx(s), sy(y + e))], fill=c, width=1)
        d.text((W - legend - pad + 10, pad + 6 + 14 * i), f"{label} (n={lines[label][0][2]})", fill=c)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", default=str(ROOT / "eval" / "reports"), help="folder of the eval.results outputs")
    p.add_argument("--out", default=None, help="output folder for map.png, map_gap.png and map.md (default: --reports)")
    args = p.parse_args(argv)
    reports = Path(args.reports)
    lines = collect(reports)
    if not lines:
        raise FileNotFoundError(f"no results.json under {reports}/{{{','.join(BASES.values())}}}: run `python -m eval.results` first.")
    out = Path(args.out or reports)
    out.mkdir(parents=True, exist_ok=True)
    width = max(len(v) for v in lines.values())
    cell = lambda p: (f"{p[0]:g} / {100 * p[1]:.1f}% / " + ("-" if math.isnan(p[3]) else f"{p[3]:+.2f}")
                      + ("" if math.isnan(p[4]) else f" ± {p[4]:.2f}"))
    table = ["| base | " + " | ".join("scale / win / gap at equal FD" for _ in range(width)) + " |", "|---" * (1 + width) + "|"]
    table += [f"| {label} (n={pts[0][2]}) | " + " | ".join(cell(p) for p in pts) + " |" for label, pts in lines.items()]
    missing = [label for label in BASES if label not in lines]
    md = ("\n".join(table) + "\n\nwin: seed-paired share of samples with a higher margin than plain CFG; gap: margin minus "
          "the CFG curve's at the same FD (± one standard error where the report has training seeds and a bootstrap; "
          "- = FD outside CFG's range)\n" + ("\nNot measured: " + ", ".join(missing) + "\n" if missing else ""))
    for label, folder in BASES.items():  # the evidence: does the size of the negative's move predict the gap?
        path = reports / folder / "results.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
        if "gaps" in report and "shift" in report:
            rows, rho = shift_vs_gap(report)
            md += (f"\n{label}: mean shift of the negative (eval.results' shift table, over timesteps and seeds) against "
                   f"the mean margin gap to CFG at equal FD, per variant; Spearman rank correlation {rho:+.2f} over "
                   f"{len(rows)} variants:\n\n| variant | shift | gap |\n|---|---|---|\n"
                   + "".join(f"| {f} | {x:.4f} | {y:+.2f} |\n" for f, x, y in rows))
    atomic_write(out / "map.md", lambda tmp: Path(tmp).write_text(md))
    plot(lines, out / "map.png")
    plot(lines, out / "map_gap.png", gap=True)
    print(md + f"wrote {out / 'map.png'}, map_gap.png and map.md")


if __name__ == "__main__":
    cli.run(main)
