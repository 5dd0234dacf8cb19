"""The README's results, in one command: plain CFG vs Self-NPO (K = 5) vs full simulation (K = 25).

    python -m eval.benchmark.results --out eval/reports/digits
    python -m eval.results --model fashion       # the same for Fashion-MNIST, with autoguidance (eval/reports/fashion)

Trains (or reuses, if already in --out) the Self-NPO delta with the digits defaults and the paper's
full-simulation baseline (K = N = 25 from pure noise) with the same steps, builds the two controls
(the base model's own negative branch = plain CFG; a random offset with the same per-tensor norm as
the K = 5 delta), evaluates all of them over a sweep of guidance scales with eval.benchmark.evaluate, and
writes results.json, results.md (tables), curves.png (margin against Frechet distance, one
curve per method across guidance scales) and curves_accuracy.png (the same with accuracy).
`--extra NAME="--lr 1e-5"` adds trained variants (sweeps of learning rate, steps, rollout w, ...);
`--betas` adds beta scalings of the K = 5 delta; `--autoguide` adds autoguidance (Karras et al. 2024)
with a weaker checkpoint of the same run as the negative branch at the conditional class (fashion
default: the 10% and 30% snapshots of its pretraining, weights/fashion-10pct and -30pct).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from eval.benchmark.classifier import DATA
from eval.benchmark.gap import format_gaps, gap_table, winners
from eval.benchmark.evaluate import Autoguide, evaluate, format_shift, format_table, prediction_shift
from npo_min import cli
from npo_min.checkpoint import atomic_write, read_metadata
from npo_min.guidance import negative_model
from npo_min.lora import LORA_FILE
from npo_min.offsets import load_offset, read_delta
from npo_min.pipelines import ROOT, default_weights, load_pipeline

PER_MODEL = {  # defaults that differ by model: digits as the README's original table; fashion sized for 2 CPU cores
    # (a 28x28 forward costs ~12x an 8x8 one: 200 samples x 10 DDIM steps per row, every trained row at 2 seeds)
    "digits": dict(num_per_class=50, guidance_scales="1.5,2,3,4,6", autoguide="", sample_steps=25, train_seeds=1,
                   dpo_npo=False),
    "fashion": dict(num_per_class=20, guidance_scales="1.5,2,3,5", autoguide="weights/fashion-10pct,weights/fashion-30pct",
                    sample_steps=10, train_seeds=2, dpo_npo=True),
}
# The classifier that labels DPO-NPO's preference pairs: never the judge (eval.benchmark.classifier.WEIGHTS)
PAIR_CLASSIFIER = {"digits": ROOT / "weights" / "digits_judge", "fashion": ROOT / "weights" / "fashion_reward"}


# delta metadata key -> train.py flag (dest): the recipe a reused delta must have been trained with
RECIPE = {"k": "k", "num_grid": "num_grid", "rollout_w": "rollout_w", "ema_rate": "ema", "start": "start",
          "renoise": "renoise", "loss": "loss", "huber_c": "huber_c", "cond_drop": "cond_drop", "steps": "steps",
          "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "weight_decay": "weight_decay",
          "seed": "seed"}
NPO_RECIPE = {"method": "method", "steps": "steps", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr",
              "weight_decay": "weight_decay", "seed": "seed", "dpo_beta": "dpo_beta"}  # the Diffusion-NPO trainers' metadata


def recipe_changes(delta: Path, argv: list[str]) -> list[str]:
    """The recipe entries where the delta's recorded metadata differs from what train.py `argv` would run."""
    sys.path.insert(0, str(ROOT))
    import train  # the root script: its parse_args resolves the per-model defaults

    want = vars(train.parse_args(argv))
    have = read_metadata(delta)
    recipe = NPO_RECIPE if want["method"] != "self-npo" else RECIPE
    return [f"{key}: recorded {have.get(key)!r}, requested {str(want[flag])!r}"
            for key, flag in recipe.items() if have.get(key) != str(want[flag])]


def train_variant(out: Path, name: str, extra: str, weights: str, common: str, retrain: bool = False) -> Path:
    """Run train.py into out/name unless a delta with the same recipe is already there; returns the delta path.

    Raises ValueError: a delta is there, trained with another recipe, and `retrain` is off.
    """
    delta = out / name / (LORA_FILE if "--method dpo-npo" in extra else "delta.safetensors")
    argv = shlex.split(f"--weights {shlex.quote(str(weights))} --out {shlex.quote(str(out / name))} {common} {extra}")
    if delta.exists():
        changes = recipe_changes(delta, argv)
        if not changes:
            print(f"[{name}] reusing {delta} (same recipe)")
            return delta
        if not retrain:
            raise ValueError(f"{delta} was trained with another recipe ({'; '.join(changes[:3])}): pass --retrain to "
                             "train it again, or choose another --out.")
        argv.append("--overwrite")
    elif (out / name / "loss.csv").exists():  # a committed report: its logs are kept, its deltas are not (.gitignore)
        print(f"[{name}] {delta} is not there (report deltas are not committed): training it again over {out / name}")
        argv.append("--overwrite")
    print(f"[{name}] python train.py {shlex.join(argv)}")
    code = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv]).returncode
    if code:
        print(f"error: train.py for [{name}] stopped with exit code {code} (its message is above).", file=sys.stderr)
        raise SystemExit(code)
    return delta


def random_like(delta: dict, seed: int) -> dict:
    """Gaussian offsets with exactly the per-tensor L2 norm of `delta` (the norm-matched control)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in delta.items():
        r = torch.randn(v.shape, generator=g)
        out[k] = r * (v.norm() / r.norm().clamp_min(1e-12))
    return out


def plot_curves(rows: list[dict], path: Path, metric: str = "margin", what: str = "held-out digits") -> None:
    """`metric` ("margin" or "accuracy") against Frechet distance (x), one polyline per method across guidance scales."""
    W, H, pad = 720, 480, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs, ys = [r["fd"] for r in rows], [r[metric] for r in rows]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda v: pad + (v - x0) / max(x1 - x0, 1e-9) * (W - 2 * pad)
    sy = lambda v: H - pad - (v - y0) / max(y1 - y0, 1e-9) * (H - 2 * pad)
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    d.text((W // 2 - 110, H - pad + 30), f"Frechet distance to {what} (lower is better)", fill="black")
    label = "mean margin of the intended class" if metric == "margin" else "share classified as the intended class"
    d.text((8, pad - 30), f"{label} (higher is better)", fill="black")
    for v in (x0, x1):
        d.text((sx(v) - 10, H - pad + 6), f"{v:.1f}", fill="black")
    for v in (y0, y1):
        d.text((8, sy(v) - 6), f"{v:.2f}", fill="black")
    colors = ["black", "red", "blue", "green", "orange", "purple", "brown", "magenta", "cyan", "gray"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, m in enumerate(methods):
        pts = [(sx(r["fd"]), sy(r[metric]), r["guidance_scale"]) for r in rows if r["method"] == m]
        c = colors[i % len(colors)]
        d.line([(x, y) for x, y, _ in pts], fill=c, width=2)
        for x, y, s in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
            d.text((x + 4, y - 12), f"{s:g}", fill=c)
        d.text((W - pad + 4 - 150, pad + 6 + 14 * i), m, fill=c)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def shift_report(model: str, unet, embed, negatives: dict) -> tuple[str, list[dict]]:
    """The markdown section on how far each negative branch moves from plain CFG's, and its rows."""
    train_x, train_y = DATA[model]("train")  # the shift is measured on training images, never the held-out split
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:100]
    rows = prediction_shift(unet, embed, negatives, train_x[pick], train_y[pick])
    return ("## How far each negative branch moves from plain CFG's\n\nshift = RMS(eps_neg - eps_base(c')) / "
            "RMS(eps_base(c')) (guide = RMS(eps_pos - eps_neg)) on 100 noised train images per timestep:\n\n"
            + format_shift(rows) + "\n"), rows


def seeded(name: str, seed: int) -> str:
    """The row name of training seed `seed` of a variant (seed 0 keeps the plain name; eval.benchmark.gap.family)."""
    return name if seed == 0 else f"{name}-seed{seed}"


def dpo_pairs(out: Path, model: str, pipe, sample_steps: int, per_class: int = 100) -> Path:
    """The DPO-NPO preference set in out/pairs (built once, reused): the model's own CFG samples (scale 1.5),
    `per_class` pairs per class, labelled by PAIR_CLASSIFIER[model], which never judges (eval.benchmark.diffusion_npo.build_pairs)."""
    from eval.benchmark.diffusion_npo import build_pairs

    pairs = out / "pairs" / "pairs.jsonl"
    if not pairs.exists():
        if not (PAIR_CLASSIFIER[model] / "model.safetensors").exists():
            raise FileNotFoundError(f"{PAIR_CLASSIFIER[model]} is missing (the classifier that labels the DPO-NPO pairs): "
                                    f"train it with eval.benchmark.classifier (weights/README.md), or pass --no-dpo-npo.")
        info = build_pairs(out / "pairs", pipe.denoiser, pipe.class_embedding, per_class=per_class, scale=1.5, tie_tol=0.1,
                           classifier_path=PAIR_CLASSIFIER[model], steps=sample_steps, class_names=pipe.class_names)
        atomic_write(out / "pairs" / "info.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
        print(f"preference set: {info}")
    return pairs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="digits", choices=sorted(PER_MODEL), help="which small model")
    p.add_argument("--out", default=None, help="output folder, deltas are reused from here (default: eval/reports/MODEL)")
    p.add_argument("--weights", default=None, help="base model (default: weights/MODEL)")
    p.add_argument("--common", default="--no-progress", help="train.py flags shared by every variant (--model is added)")
    p.add_argument("--no-full", action="store_true", help="skip the K = 25 full-simulation baseline")
    p.add_argument("--extra", action="append", default=[], metavar='NAME="FLAGS"', help="extra trained variant")
    p.add_argument("--betas", default="", help="extra beta scalings of the K = 5 delta, e.g. 0.5,2")
    p.add_argument("--autoguide", default=None, help="comma-separated weaker checkpoints for autoguidance "
                   "(default: none for digits; fashion: weights/fashion-10pct,weights/fashion-30pct); '' for none")
    p.add_argument("--guidance-scales", default=None, help="comma-separated CFG scales (default: digits 1.5,2,3,4,6; fashion 1.5,2,3,5)")
    p.add_argument("--num-per-class", type=int, default=None, help="samples per class and scale (default: digits 50, fashion 20)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM sampling steps (default: digits 25, fashion 10)")
    p.add_argument("--train-seeds", type=int, default=None,
                   help="training seeds 0..S-1 of every trained variant (default: digits 1, fashion 2): the seed part of "
                        "the gap's standard error")
    p.add_argument("--dpo-npo", action=argparse.BooleanOptionalAction, default=None,
                   help="add DPO-NPO (LoRA, pairs of the model's own samples labelled by weights/MODEL_reward; "
                        "default: fashion on, digits off: its own benchmark is eval.benchmark.diffusion_npo)")
    p.add_argument("--pairs-per-class", type=int, default=100, help="DPO-NPO preference pairs per class")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples of the sample set for the gap's standard error")
    p.add_argument("--seed", type=int, default=1234, help="sampling noise seed")
    p.add_argument("--shift-only", action="store_true",
                   help="only measure how far each negative branch moves from plain CFG's (writes shift.md; no sampling)")
    p.add_argument("--retrain", action="store_true", help="retrain a variant whose delta in --out has another recipe")
    args = p.parse_args(argv)
    for key, value in PER_MODEL[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.train_seeds, args.num_per_class, args.sample_steps, args.pairs_per_class) < 1 or args.n_boot < 2:
        raise ValueError("--train-seeds, --num-per-class, --sample-steps and --pairs-per-class must be >= 1 and --n-boot "
                         f">= 2 (got {args.train_seeds}, {args.num_per_class}, {args.sample_steps}, {args.pairs_per_class}, "
                         f"{args.n_boot}).")
    args.weights = args.weights or default_weights(args.model)
    out = Path(args.out or ROOT / "eval" / "reports" / args.model)
    out.mkdir(parents=True, exist_ok=True)
    common = f"--model {args.model} {args.common}"

    pipe = load_pipeline(args.model, args.weights)
    unet, embed = pipe.denoiser, pipe.class_embedding
    trained = {"self-npo-k5": ""}
    if not args.no_full:
        trained["full-sim-k25"] = "--k 25 --start noise"
    for item in args.extra:
        name, _, flags = item.partition("=")
        trained[name] = flags.strip('"')
    if args.dpo_npo:
        trained["dpo-npo"] = f"--method dpo-npo --pairs {shlex.quote(str(dpo_pairs(out, args.model, pipe, args.sample_steps, args.pairs_per_class)))}"
    variants = {seeded(name, s): flags + (f" --seed {s}" if s else "") for name, flags in trained.items()
                for s in range(args.train_seeds)}
    deltas = {name: train_variant(out, name, flags, args.weights, common, args.retrain) for name, flags in variants.items()}

    base = {k: v.clone() for k, v in unet.state_dict().items()}
    negatives, cost = {}, {}
    for name, path in deltas.items():
        if path.name == LORA_FILE:  # DPO-NPO's LoRA: applied as delta (theta + beta * delta, beta 1)
            delta, meta = load_offset(path.parent, base, pipe.read_weights), read_metadata(path)
        else:
            delta, meta = read_delta(path, base)
        negatives[name] = negative_model(unet, base, delta=delta)
        cost[name] = {"train_seconds": float(meta["train_seconds"]), "steps": int(meta["steps"]), "k": int(meta["k"]) if "k" in meta else None,
                      "lr": float(meta["lr"]), "delta_norm": torch.sqrt(sum((v.float() ** 2).sum() for v in delta.values())).item()}
        for s in range(args.train_seeds):
            if name == seeded("self-npo-k5", s):
                for b in filter(None, args.betas.split(",")):
                    negatives[seeded(f"k5-beta{b}", s)] = negative_model(unet, base, delta=delta, beta=float(b))
                negatives[seeded("random-norm", s)] = negative_model(unet, base, delta=random_like(delta, seed=s))
    for path in filter(None, args.autoguide.split(",")):
        weak = load_pipeline(args.model, path if Path(path).is_absolute() else ROOT / path)
        negatives[f"autoguide-{Path(path).name}"] = Autoguide(weak.denoiser, weak.class_embedding)
    if args.shift_only:
        md = shift_report(args.model, unet, embed, negatives)[0]
        atomic_write(out / "shift.md", lambda tmp: Path(tmp).write_text(md))
        print((out / "shift.md").read_text() + f"wrote {out / 'shift.md'}")
        return
    scales = [float(s) for s in args.guidance_scales.split(",")]
    start, keep = time.time(), {}
    rows, info = evaluate(unet, embed, negatives, scales, args.num_per_class, args.seed, args.sample_steps, model=args.model,
                          keep=keep)
    info["eval_seconds"] = time.time() - start
    ref = keep.pop("ref")
    baselines = ["cfg", *(n for n in negatives if n.startswith("autoguide-"))]
    gap_rows = gap_table(keep, ref, baselines, n_boot=args.n_boot)
    shift_md, shift = shift_report(args.model, unet, embed, negatives)

    table = format_table(rows, info)
    cost_lines = ["| variant | K | steps | lr | train seconds | s/step | ||delta|| |", "|---|---|---|---|---|---|---|"]
    for name, c in cost.items():
        cost_lines.append(f"| {name} | {'-' if c['k'] is None else c['k']} | {c['steps']} | {c['lr']:g} | {c['train_seconds']:.0f} | "
                          f"{c['train_seconds'] / c['steps']:.2f} | {c['delta_norm']:.4f} |")
    best = {m: winners(gap_rows, measure=m) for m in ("margin", "fd")}
    gap_md = ("## Gap to each baseline's frontier\n\nMargin gap at equal FD: the best margin the method reaches at an FD "
              "no worse than its own at that scale, minus the baseline's; FD gain at equal margin: the baseline's lowest FD "
              "at a margin no worse than the method's, minus the method's (> 0 = closer to the data). Linear between "
              "guidance scales (eval/benchmark/gap.py); mean over training seeds, ± one standard error (training seeds and "
              f"a {args.n_boot}-resample bootstrap of the {info['num_samples']} seed-paired samples), (z = gap / SE); "
              "- = outside the baseline's range.\n\n"
              + "\n\n".join(f"{title} against {b}:\n\n{format_gaps(gap_rows, b, m)}" for b in baselines
                              for m, title in (("margin", "Margin gap at equal FD"), ("fd", "FD gain at equal margin")))
              + "\n\nAbove plain CFG's and every autoguidance frontier by more than 2 SE: in margin at equal FD: "
              + (", ".join(f"{f} at scale {s:g}" for f, s in best["margin"]) or "none") + "; in FD at equal margin: "
              + (", ".join(f"{f} at scale {s:g}" for f, s in best["fd"]) or "none") + ".\n\n")
    report = ("## Training cost\n\n" + "\n".join(cost_lines) + f"\n\n## Evaluation\n\n```\n{table}\n```\n\n" + gap_md
              + shift_md)
    print(report)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(report))
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(
        json.dumps({"rows": rows, "gaps": gap_rows, "shift": shift, "info": info, "cost": cost, "variants": variants,
                    "args": vars(args), "metadata": {n: read_metadata(p) for n, p in deltas.items()}}, indent=2)))
    what = "held-out digits" if args.model == "digits" else f"the held-out {args.model} test split"
    plot_curves(rows, out / "curves.png", "margin", what)
    plot_curves(rows, out / "curves_accuracy.png", "accuracy", what)
    print(f"wrote {out / 'results.md'}, results.json, curves.png, curves_accuracy.png")


if __name__ == "__main__":
    cli.run(main)
