"""Evaluate NPO guidance on the digits model: reward, Frechet distance, seed-paired win rate.

    python -m eval.benchmark.evaluate --neg-ckpt out/self-npo/delta.safetensors

For every guidance scale, the same noise and labels are sampled with plain CFG (negative branch =
the base model at the null class) and with each negative model. Metrics, against the project's
digit classifier (eval/classifier.py, trained on the train split only):
  - log p: mean log-probability of the intended class (a reward with headroom; p itself saturates);
  - margin: mean intended logit minus the best other logit;
  - FD: Frechet distance between classifier features of the samples and of the held-out test
    digits (lower = closer to real data; "real" row = 500 train digits vs test, the floor);
  - win: share of seeds where the method's margin beats plain CFG's (ties count for neither).
Printed as a table and written as JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from eval.benchmark.classifier import DEFAULT_WEIGHTS as CLASSIFIER_WEIGHTS, load_classifier
from eval.metrics import class_log_prob, class_margin, frechet_distance, paired_win_rate
from npo_min import cli
from npo_min.checkpoint import atomic_write
from npo_min.digits import DEFAULT_WEIGHTS, NUM_CLASSES, load_digits, sample_digits
from npo_min.guidance import negative_model
from npo_min.offsets import load_offset
from npo_min.pipelines import load_pipeline


@torch.no_grad()
def evaluate(unet, embed, negatives: dict, scales, num_per_class=50, seed=1234, steps=25, solver="ddim",
             spacing="trailing", classifier_path=CLASSIFIER_WEIGHTS) -> tuple[list[dict], dict]:
    """Rows {method, guidance_scale, log_p, margin, fd, win_vs_cfg, n} for plain CFG and each negative.

    negatives: {name: neg_unet}; "cfg" (the base model itself) is always included. The held-out
    test split is used only here, as the Frechet reference.
    """
    clf = load_classifier(classifier_path)
    test_x, _ = load_digits("test")
    ref = clf.features(test_x)
    train_x, _ = load_digits("train")
    floor = frechet_distance(clf.features(train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:500]]), ref)
    labels = torch.arange(NUM_CLASSES).repeat(num_per_class)
    noise = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    rows = []
    for scale in scales:
        margins = {}
        for name, neg in {"cfg": unet, **negatives}.items():
            x = sample_digits(unet, neg, embed, labels, noise, scale, steps, solver, spacing)
            margin = class_margin(clf, x, labels)
            margins[name] = margin
            rows.append({"method": name, "guidance_scale": scale, "log_p": class_log_prob(clf, x, labels).mean().item(),
                         "margin": margin.mean().item(), "fd": frechet_distance(clf.features(x), ref),
                         "win_vs_cfg": None if name == "cfg" else paired_win_rate(margin, margins["cfg"]), "n": len(labels)})
    return rows, {"real_train_vs_test_fd": floor, "num_samples": len(labels), "steps": steps, "solver": solver,
                  "spacing": spacing, "seed": seed}


def format_table(rows: list[dict], info: dict) -> str:
    n = max([14] + [len(r["method"]) + 1 for r in rows])  # method column: names are never cut
    lines = [f"{'method':<{n}}{'scale':>6}{'log p':>11}{'margin':>9}{'FD':>8}{'win vs CFG':>12}", "-" * (n + 46)]
    for r in rows:
        win = "" if r["win_vs_cfg"] is None else f"{100 * r['win_vs_cfg']:.1f}%"
        lines.append(f"{r['method']:<{n}}{r['guidance_scale']:>6.2g}{r['log_p']:>11.2e}{r['margin']:>9.2f}{r['fd']:>8.2f}{win:>12}")
    lines.append(f"{'real digits':<{n}}{'':>6}{'':>11}{'':>9}{info['real_train_vs_test_fd']:>8.2f}{'':>12}")
    lines.append(f"({info['num_samples']} samples per row, {info['steps']} {info['solver']} steps, seed {info['seed']}; "
                 f"win = seed-paired share with higher margin than plain CFG, ties count for neither)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="base digits model")
    p.add_argument("--neg-ckpt", action="append", required=True,
                   help="NPO offset(s): delta.safetensors, a LoRA or a full digits model; repeat the flag to compare several")
    p.add_argument("--beta", type=float, default=1.0, help="delta scale in theta_neg = theta + beta * delta")
    p.add_argument("--guidance-scales", default="1.5,2,3,5", help="comma-separated CFG scales")
    p.add_argument("--num-per-class", type=int, default=50, help="samples per class and scale")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--seed", type=int, default=1234, help="noise seed (shared by all methods)")
    p.add_argument("--ignore-fingerprint", action="store_true", help="apply a delta made for another base")
    p.add_argument("--trust-delta", action="store_true", help="apply an offset file without our metadata as delta")
    p.add_argument("--out", default="out/eval", help="output folder (eval.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing eval.json")
    args = p.parse_args(argv)
    cli.check_finite_flags(args, ["beta"])
    if args.num_per_class < 1 or args.steps < 1:
        raise ValueError(f"--num-per-class and --steps must be >= 1 (got {args.num_per_class}, {args.steps}).")
    try:
        scales = [float(s) for s in args.guidance_scales.split(",")]
    except ValueError:
        raise ValueError(f"--guidance-scales takes comma-separated numbers, e.g. 1.5,2,3 (got {args.guidance_scales!r}).") from None
    if not all(math.isfinite(s) for s in scales):
        raise ValueError(f"--guidance-scales must be finite numbers (got {args.guidance_scales}).")
    out = cli.check_out([Path(args.out) / "eval.json"], args.overwrite, "eval.benchmark.evaluate")[0]
    pipe = load_pipeline("digits", args.weights)
    unet, embed = pipe.denoiser, pipe.class_embedding
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    negatives = {}
    for path in args.neg_ckpt:
        delta = load_offset(path, base, pipe.read_weights, not args.ignore_fingerprint, args.trust_delta)
        stem = Path(path).parent.name if Path(path).name == "delta.safetensors" else Path(path).stem
        name, i = stem, 1
        while name in negatives:  # two runs/x/delta.safetensors: x, x#1 (a row never vanishes)
            name, i = f"{stem}#{i}", i + 1
        negatives[name] = negative_model(unet, base, delta=delta, beta=args.beta)
    rows, info = evaluate(unet, embed, negatives, scales, args.num_per_class, args.seed, args.steps)
    bad = [f"{r['method']} at scale {r['guidance_scale']:g}" for r in rows
           if not all(math.isfinite(r[k]) for k in ("log_p", "margin", "fd"))]
    if bad:
        raise ValueError(f"non-finite metrics for {', '.join(bad[:3])}: the samples hold NaN / Inf (a diverged "
                         "offset or scale?). Nothing was written.")
    print(format_table(rows, info))
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps({"rows": rows, "info": info, "args": vars(args)}, indent=2)))
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
