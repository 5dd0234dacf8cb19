"""Evaluate NPO guidance on the digits (or fashion) model: reward, Frechet distance, precision/recall, win rate.

    python -m eval.benchmark.evaluate --neg-ckpt out/self-npo/delta.safetensors
    python -m eval.benchmark.evaluate --model fashion --neg-ckpt out/fashion/delta.safetensors --autoguide weights/fashion-30pct

For every guidance scale, the same noise and labels are sampled with plain CFG (negative branch =
the base model at the null class), with each negative model, and with each autoguidance guide (a
weaker checkpoint of the same run at the *same* class, Karras et al. 2024). Metrics, against the
project's classifier of that model's images (eval/benchmark/classifier.py, trained on the train split only):
  - log p: mean log-probability of the intended class (a reward with headroom; p itself saturates);
  - margin: mean intended logit minus the best other logit; acc: share classified as the intended class;
  - FD: Frechet distance between classifier features of the samples and of the held-out test split
    (lower = closer to real data; the "real" row = as many train images vs test, the floor);
  - prec / rec: improved precision and recall (Kynkaanniemi et al. 2019, k = 3) against as many
    held-out test images: fidelity (samples inside the real manifold) and diversity (the reverse);
  - win: share of seeds where the method's margin beats plain CFG's (ties count for neither).
Printed as a table and written as JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.benchmark.classifier import DATA, DEFAULT_WEIGHTS as CLASSIFIER_WEIGHTS, WEIGHTS as CLASSIFIERS, load_classifier
from eval.metrics import class_log_prob, class_margin, frechet_distance, paired_win_rate, precision_recall
from npo_min import cli
from npo_min.checkpoint import atomic_write
from npo_min.digits import NUM_CLASSES, sample_digits
from npo_min.guidance import negative_model
from npo_min.offsets import load_offset
from npo_min.pipelines import default_weights, load_pipeline


@dataclass
class Autoguide:
    """Autoguidance's negative: a weaker model (unet + its own class table) evaluated at the conditional class."""

    unet: torch.nn.Module
    class_embedding: torch.nn.Module


@torch.no_grad()
def _features(clf, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([clf.features(part) for part in x.split(batch_size)])  # (N, F)


@torch.no_grad()
def evaluate(unet, embed, negatives: dict, scales, num_per_class=50, seed=1234, steps=25, solver="ddim",
             spacing="trailing", classifier_path=None, model="digits", keep: dict | None = None) -> tuple[list[dict], dict]:
    """Rows {method, guidance_scale, log_p, margin, accuracy, fd, precision, recall, win_vs_cfg, n} for plain
    CFG and each negative.

    negatives: {name: neg_unet (negative at the null class) or Autoguide}; "cfg" (the base model itself) is
    always included. model: "digits" or "fashion" (whose data and classifier; classifier_path overrides).
    The held-out test split is used only here, as the Frechet and precision/recall reference.
    keep: if a dict, filled with {(method, scale): (margins `(N,)`, classifier features `(N, F)`)} and
    {"ref": the held-out features `(M, F)`}, for eval.benchmark.gap's bootstrap.
    """
    clf = load_classifier(classifier_path or CLASSIFIERS[model])
    load = DATA[model]
    test_x, _ = load("test")
    ref = _features(clf, test_x)
    labels = torch.arange(NUM_CLASSES).repeat(num_per_class)
    n = len(labels)
    train_x, _ = load("train")
    floor_n = 500 if model == "digits" else n  # digits: the 500 of the original table; else as many as the samples
    floor = frechet_distance(_features(clf, train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:floor_n]]), ref)
    ref_pr = ref[torch.randperm(len(ref), generator=torch.Generator().manual_seed(1))[:n]]  # as many real as fake
    side = unet.cfg.sample_size
    noise = torch.randn((n, 1, side, side), generator=torch.Generator().manual_seed(seed))
    rows = []
    if keep is not None:
        keep["ref"] = ref
    for scale in scales:
        margins = {}
        for name, neg in {"cfg": unet, **negatives}.items():
            guide = dict(neg_unet=neg.unet, neg_embed=neg.class_embedding) if isinstance(neg, Autoguide) else dict(neg_unet=neg)
            x = sample_digits(unet, embed=embed, labels=labels, noise=noise, guidance_scale=scale, steps=steps, solver=solver,
                              spacing=spacing, batch_size=100 if side > 8 else 500, **guide)
            margin = class_margin(clf, x, labels)
            margins[name] = margin
            feats = _features(clf, x)
            precision, recall = precision_recall(ref_pr, feats)
            if keep is not None:
                keep[name, scale] = (margin, feats)
            rows.append({"method": name, "guidance_scale": scale, "log_p": class_log_prob(clf, x, labels).mean().item(),
                         "margin": margin.mean().item(), "accuracy": (clf(x).argmax(1) == labels).double().mean().item(),
                         "fd": frechet_distance(feats, ref), "precision": precision, "recall": recall,
                         "win_vs_cfg": None if name == "cfg" else paired_win_rate(margin, margins["cfg"]), "n": n})
    return rows, {"model": model, "real_train_vs_test_fd": floor, "real_fd_samples": floor_n, "num_samples": n,
                  "steps": steps, "solver": solver, "spacing": spacing, "seed": seed}


@torch.no_grad()
def prediction_shift(unet, embed, negatives: dict, images: torch.Tensor, labels: torch.Tensor,
                     timesteps=(100, 300, 500, 700, 900), seed: int = 0) -> list[dict]:
    """How far each method's negative branch moves from plain CFG's, per timestep (the map's evidence).

    images `(N, 1, S, S)` in [-1, 1] (train split) with labels `(N,)`, noised to x_t at each t with seeded noise.
    Rows {method, t, shift, guide}: shift = RMS(eps_neg - eps_base(x_t, c')) / RMS(eps_base(x_t, c')), the
    relative move of the negative prediction away from the base's unconditional one (0 for plain CFG);
    guide = RMS(eps_pos - eps_neg), the size of the guidance direction that the scale multiplies.
    """
    from npo_min.digits import NULL_CLASS
    from npo_min.schedule import NoiseSchedule, add_noise

    schedule, g = NoiseSchedule.sd(), torch.Generator().manual_seed(seed)
    cond, null = embed(labels), embed(torch.full_like(labels, NULL_CLASS))
    rms = lambda v: v.pow(2).mean().sqrt().item()
    rows = []
    for t in timesteps:
        tt = torch.full((len(images),), t)
        alpha, sigma = schedule.coefs(tt, images)
        x_t = add_noise(images, torch.randn(images.shape, generator=g), alpha, sigma)
        pos, base_null = unet(x_t, tt, cond), unet(x_t, tt, null)
        for name, neg in {"cfg": unet, **negatives}.items():
            eps_neg = neg.unet(x_t, tt, neg.class_embedding(labels)) if isinstance(neg, Autoguide) else neg(x_t, tt, null)
            rows.append({"method": name, "t": t, "shift": rms(eps_neg - base_null) / rms(base_null), "guide": rms(pos - eps_neg)})
    return rows


def format_shift(rows: list[dict]) -> str:
    """A markdown table: one row per method, shift (guide) per timestep."""
    ts = list(dict.fromkeys(r["t"] for r in rows))
    lines = ["| negative branch | " + " | ".join(f"t={t}" for t in ts) + " |", "|---" * (len(ts) + 1) + "|"]
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = {r["t"]: f"{r['shift']:.3f} ({r['guide']:.3f})" for r in rows if r["method"] == m}
        lines.append(f"| {m} | " + " | ".join(cells[t] for t in ts) + " |")
    return "\n".join(lines)


def format_table(rows: list[dict], info: dict) -> str:
    n = max([14] + [len(r["method"]) + 1 for r in rows])  # method column: names are never cut
    lines = [f"{'method':<{n}}{'scale':>6}{'log p':>11}{'margin':>9}{'acc':>7}{'FD':>8}{'prec':>7}{'rec':>7}{'win vs CFG':>12}",
             "-" * (n + 67)]
    for r in rows:
        win = "" if r["win_vs_cfg"] is None else f"{100 * r['win_vs_cfg']:.1f}%"
        lines.append(f"{r['method']:<{n}}{r['guidance_scale']:>6.2g}{r['log_p']:>11.2e}{r['margin']:>9.2f}"
                     f"{100 * r['accuracy']:>6.1f}%{r['fd']:>8.2f}{r['precision']:>7.3f}{r['recall']:>7.3f}{win:>12}")
    lines.append(f"{'real ' + info.get('model', 'digits'):<{n}}{'':>6}{'':>11}{'':>9}{'':>7}{info['real_train_vs_test_fd']:>8.2f}")
    lines.append(f"({info['num_samples']} samples per row, {info['steps']} {info['solver']} steps, seed {info['seed']}; "
                 f"real = {info.get('real_fd_samples', 500)} train images vs the held-out test split; "
                 f"win = seed-paired share with higher margin than plain CFG, ties count for neither)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="digits", choices=sorted(CLASSIFIERS), help="which small model")
    p.add_argument("--weights", default=None, help="base model (default: weights/digits or weights/fashion)")
    p.add_argument("--neg-ckpt", action="append", default=[],
                   help="NPO offset(s): delta.safetensors, a LoRA or a full model; repeat the flag to compare several")
    p.add_argument("--autoguide", action="append", default=[],
                   help="autoguidance guide(s): a weaker full model of the same family (e.g. weights/fashion-30pct), "
                        "used at the conditional class; repeatable")
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
    if not args.neg_ckpt and not args.autoguide:
        raise ValueError("nothing to compare with plain CFG: give --neg-ckpt and/or --autoguide.")
    pipe = load_pipeline(args.model, args.weights or default_weights(args.model))
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
    for path in args.autoguide:
        weak = load_pipeline(args.model, path)
        negatives[f"autoguide:{Path(path).name}"] = Autoguide(weak.denoiser, weak.class_embedding)
    rows, info = evaluate(unet, embed, negatives, scales, args.num_per_class, args.seed, args.steps, model=args.model)
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
