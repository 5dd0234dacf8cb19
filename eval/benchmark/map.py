"""The map: where Self-NPO helps. Its seed-paired win rate against plain CFG, per guidance scale, on each base model.

    python -m eval.benchmark.map        # reads eval/reports/*/results.json, writes eval/reports/map.png and map.md

One line per base (the digits model; the fashion model at 10%, 30% and 100% of its pretraining), from the
`self-npo-k5` rows that `eval.results` wrote (a base whose results are missing is left out, and said so).
Above 50% Self-NPO's negative gives a higher intended-class margin than CFG's on most seeds; below, CFG wins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from npo_min import cli
from npo_min.checkpoint import atomic_write
from npo_min.pipelines import ROOT

BASES = {  # label -> report folder, weak to strong within a family
    "fashion, 10% base": "fashion-10pct", "fashion, 30% base": "fashion-30pct", "fashion, shipped": "fashion",
    "digits, shipped": "digits",
}


def collect(reports: Path, method: str = "self-npo-k5") -> dict[str, list[tuple[float, float, int]]]:
    """{base label: [(guidance scale, win rate vs CFG, n), ...]} for the bases whose results.json exists."""
    out = {}
    for label, folder in BASES.items():
        path = reports / folder / "results.json"
        if path.is_file():
            rows = json.loads(path.read_text())["rows"]
            out[label] = [(r["guidance_scale"], r["win_vs_cfg"], r["n"]) for r in rows if r["method"] == method]
    return out


def plot(lines: dict, path: Path) -> None:
    """Win rate (y, 0..100%) against guidance scale (x), one polyline per base, the 50% line dashed."""
    W, H, pad = 720, 480, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [s for pts in lines.values() for s, _, _ in pts]
    x0, x1 = min(xs), max(xs)
    sx = lambda v: pad + (v - x0) / max(x1 - x0, 1e-9) * (W - 2 * pad)
    sy = lambda v: H - pad - v * (H - 2 * pad)
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    for x in range(pad, W - pad, 12):
        d.line([(x, sy(0.5)), (x + 6, sy(0.5))], fill="gray")
    d.text((W // 2 - 60, H - pad + 30), "guidance scale", fill="black")
    d.text((8, pad - 30), "Self-NPO (K 5, defaults): seed-paired win rate against plain CFG", fill="black")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.text((8, sy(v) - 6), f"{100 * v:.0f}%", fill="black")
    for v in sorted(set(xs)):
        d.text((sx(v) - 6, H - pad + 6), f"{v:g}", fill="black")
    colors = ["orange", "red", "blue", "black", "green", "purple"]
    for i, (label, pts) in enumerate(lines.items()):
        c = colors[i % len(colors)]
        d.line([(sx(s), sy(w)) for s, w, _ in pts], fill=c, width=2)
        for s, w, _ in pts:
            d.ellipse([sx(s) - 3, sy(w) - 3, sx(s) + 3, sy(w) + 3], fill=c)
        d.text((W - pad - 170, pad + 6 + 14 * i), f"{label} (n={pts[0][2]})", fill=c)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", default=str(ROOT / "eval" / "reports"), help="folder of the eval.results outputs")
    p.add_argument("--out", default=None, help="output folder for map.png and map.md (default: --reports)")
    args = p.parse_args(argv)
    reports = Path(args.reports)
    lines = collect(reports)
    if not lines:
        raise FileNotFoundError(f"no results.json under {reports}/{{{','.join(BASES.values())}}}: run `python -m eval.results` first.")
    out = Path(args.out or reports)
    out.mkdir(parents=True, exist_ok=True)
    table = ["| base | " + " | ".join("scale / win" for _ in range(max(len(v) for v in lines.values()))) + " |",
             "|---" * (1 + max(len(v) for v in lines.values())) + "|"]
    table += [f"| {label} (n={pts[0][2]}) | " + " | ".join(f"{s:g} / {100 * w:.1f}%" for s, w, _ in pts) + " |"
              for label, pts in lines.items()]
    missing = [label for label in BASES if label not in lines]
    md = "\n".join(table) + ("\n\nNot measured: " + ", ".join(missing) + "\n" if missing else "\n")
    atomic_write(out / "map.md", lambda tmp: Path(tmp).write_text(md))
    plot(lines, out / "map.png")
    print(md + f"wrote {out / 'map.png'} and map.md")


if __name__ == "__main__":
    cli.run(main)
