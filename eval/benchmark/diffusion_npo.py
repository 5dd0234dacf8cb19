"""Diffusion-NPO's trainers on the digits benchmark: DPO-NPO, DPO, NPO + DPO (Eq. 10) and reward-NPO, judged twice.

    python -m eval.benchmark.diffusion_npo --out eval/reports/diffusion-npo-digits --runs out/diffusion-npo-digits

1. A preference set from the digits model's OWN samples (no human labels exist for digits): --per-class x 2
   samples per class with plain CFG (scale --pair-scale, DDIM 25, noise seed 777, not the evaluation's 1234);
   within a class, sample 2i is paired with sample 2i + 1 and the one with the higher margin under the reward
   classifier (weights/digits_classifier) is preferred; pairs whose margins differ by less than --tie-tol are
   ties (written with "tie": true, dropped by the trainer). Written as PNGs + pairs.jsonl (npo_min/pairs.py).
2. Trains (or reuses from --out) with train.py, LoRA rank 8 (MODELS["digits"].npo defaults unless --train-flags):
   dpo-npo (Eq. 8, delta), dpo (--no-reverse, eta) and reward-npo (Eq. 7, digits-margin reward, delta_r).
3. Samples the evaluation set (500 digits, 50 per class, noise seed 1234, DDIM 25: the benchmark's) per guidance
   scale for: plain CFG; NPO (negative theta + delta); the DPO model (theta + eta in both branches); NPO + DPO,
   positive theta + eta and negative theta + alpha eta + beta delta (Eq. 10, the paper's main configuration);
   reward-NPO (negative theta + delta_r); a random offset with the per-tensor norm of delta (control).
4. Judges every sample with the reward classifier (which built the pairs and trained reward-NPO) AND with the
   judge, weights/digits_judge (an MLP, another seed): margins, Frechet distance (reward-classifier features,
   as the benchmark), seed-paired win rates vs plain CFG under each, their standard errors, and how often the two
   classifiers agree on which of a seed pair is better.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eval.benchmark.classifier import DEFAULT_WEIGHTS as CLASSIFIER_WEIGHTS, load_classifier
from eval.benchmark.results import random_like
from eval.metrics import class_margin, frechet_distance, paired_win_rate
from eval.rewards import DIGITS_JUDGE
from npo_min.checkpoint import atomic_write
from npo_min.digits import DEFAULT_WEIGHTS, NUM_CLASSES, load_digits, sample_digits
from npo_min.guidance import negative_model
from npo_min.images import save_png, to_pil
from npo_min.offsets import load_offset
from npo_min.pipelines import ROOT, load_pipeline


def build_pairs(out: Path, unet, embed, per_class: int, scale: float, tie_tol: float, seed: int = 777,
                classifier_path: Path = CLASSIFIER_WEIGHTS, steps: int = 25, class_names=None) -> dict:
    """Write out/img/*.png and out/pairs.jsonl from the model's own samples (`steps` DDIM steps, CFG `scale`),
    each pair labelled by the margin under the classifier at `classifier_path`; prompts are `class_names`
    (default the digits "0".."9"). Returns counts."""
    class_names = class_names or [str(c) for c in range(NUM_CLASSES)]
    clf = load_classifier(classifier_path)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(2 * per_class)  # class c: indices c*2P .. c*2P + 2P - 1
    side = unet.cfg.sample_size  # 8 (digits) or 28 (fashion)
    noise = torch.randn((len(labels), 1, side, side), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = sample_digits(unet, unet, embed, labels, noise, scale, steps, batch_size=100 if side > 8 else 500)
    (out / "img").mkdir(parents=True, exist_ok=True)
    x = torch.stack([torch.from_numpy(np.array(to_pil(im))).float()[None] / 127.5 - 1 for im in x])  # (1, S, S) each: the PNGs' pixels
    with torch.no_grad():
        margin = class_margin(clf, x, labels)
    lines, ties = [], 0
    for i in range(0, len(labels), 2):
        for j in (i, i + 1):
            save_png(to_pil(x[j]), out / "img" / f"{j:05d}.png")
        a, b = (i, i + 1) if margin[i] >= margin[i + 1] else (i + 1, i)
        tie = bool(abs(margin[i] - margin[i + 1]) < tie_tol)
        ties += tie
        lines.append(json.dumps({"prompt": class_names[int(labels[i])], "chosen": f"img/{a:05d}.png", "rejected": f"img/{b:05d}.png",
                                 "tie": tie, "margin_chosen": round(float(margin[a]), 4), "margin_rejected": round(float(margin[b]), 4)}))
    atomic_write(out / "pairs.jsonl", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    gap = torch.tensor([json.loads(l)["margin_chosen"] - json.loads(l)["margin_rejected"] for l in lines])
    return {"pairs": len(lines), "ties": ties, "kept": len(lines) - ties, "pair_scale": scale, "tie_tol": tie_tol,
            "per_class": per_class, "mean_margin": margin.mean().item(), "mean_gap": gap.mean().item(), "seed": seed,
            "steps": steps, "classifier": Path(classifier_path).name}


def train(runs_dir: Path, name: str, flags: str) -> Path:
    folder = runs_dir / name
    if (folder / "pytorch_lora_weights.safetensors").exists() or (folder / "delta.safetensors").exists():
        print(f"[{name}] reusing {folder}")
        return folder
    argv = shlex.split(f"--out {folder} --no-progress {flags}")
    print(f"[{name}] python train.py {shlex.join(argv)}", flush=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], check=True)
    return folder


def se_mean(x: torch.Tensor) -> float:
    return (x.double().std() / len(x) ** 0.5).item()


def se_rate(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


@torch.no_grad()
def evaluate(unet, embed, methods: dict, scales, num_per_class=50, seed=1234, steps=25) -> list[dict]:
    """methods: {name: (pos_unet, neg_unet)}, "cfg" first. Rows per method and scale, both classifiers."""
    clf, judge = load_classifier(CLASSIFIER_WEIGHTS), load_classifier(DIGITS_JUDGE)
    ref = clf.features(load_digits("test")[0])
    labels = torch.arange(NUM_CLASSES).repeat(num_per_class)
    noise = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    rows = []
    for scale in scales:
        base = {}
        for name, (pos, neg) in methods.items():
            x = sample_digits(pos, neg, embed, labels, noise, scale, steps)
            m, j = class_margin(clf, x, labels), class_margin(judge, x, labels)
            if name == "cfg":
                base = {"m": m, "j": j}
            n = len(labels)
            row = {"method": name, "guidance_scale": scale, "margin": m.mean().item(), "margin_se": se_mean(m),
                   "judge_margin": j.mean().item(), "judge_margin_se": se_mean(j), "fd": frechet_distance(clf.features(x), ref),
                   "judge_accuracy": (j > 0).float().mean().item(), "n": n}
            if name != "cfg":
                win, jwin = paired_win_rate(m, base["m"]), paired_win_rate(j, base["j"])
                dm, dj = torch.sign(m - base["m"]), torch.sign(j - base["j"])
                both = (dm != 0) & (dj != 0)
                row |= {"win": win, "win_se": se_rate(win, n), "judge_win": jwin, "judge_win_se": se_rate(jwin, n),
                        "agree": ((dm == dj) & both).sum().item() / max(both.sum().item(), 1)}
            rows.append(row)
            print(f"  {name:<14} scale {scale:<4g} margin {row['margin']:.2f} judge {row['judge_margin']:.2f} FD {row['fd']:.2f}"
                  + (f" win {100 * row['win']:.1f}% judge win {100 * row['judge_win']:.1f}% agree {100 * row['agree']:.1f}%"
                     if name != "cfg" else ""), flush=True)
    return rows


def table(rows: list[dict], scales) -> str:
    lines = ["| negative / positive model | scale | margin (reward clf) | judge margin (MLP) | FD | win vs CFG | judge win vs CFG | reward and judge agree |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = lambda k: "-" if k not in r else f"{100 * r[k]:.1f}% ± {100 * r[k + '_se']:.1f}"
        agree = "-" if "agree" not in r else f"{100 * r['agree']:.1f}%"
        lines.append(f"| {r['method']} | {r['guidance_scale']:g} | {r['margin']:.2f} ± {r['margin_se']:.2f} | "
                     f"{r['judge_margin']:.2f} ± {r['judge_margin_se']:.2f} | {r['fd']:.2f} | {w('win')} | {w('judge_win')} | {agree} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "eval" / "reports" / "diffusion-npo-digits"), help="report folder (results.md, .json)")
    p.add_argument("--runs", default="out/diffusion-npo-digits", help="preference set and trained runs (reused when present)")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="base digits model")
    p.add_argument("--per-class", type=int, default=100, help="preference pairs per class (2x samples)")
    p.add_argument("--pair-scale", type=float, default=1.5, help="CFG scale of the samples the pairs are made of")
    p.add_argument("--tie-tol", type=float, default=0.1, help="pairs whose margins differ by less are ties (dropped)")
    p.add_argument("--train-flags", default="", help="extra train.py flags for every trained variant (e.g. --steps 100)")
    p.add_argument("--alpha", type=float, default=1.0, help="Eq. 10 alpha (eta in the negative branch)")
    p.add_argument("--beta", type=float, default=1.0, help="Eq. 10 beta (delta in the negative branch)")
    p.add_argument("--guidance-scales", default="1.5,3,6", help="comma-separated CFG scales")
    p.add_argument("--num-per-class", type=int, default=50, help="evaluation samples per class and scale")
    args = p.parse_args(argv)
    out, runs_dir = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("digits", args.weights)
    unet, embed = pipe.denoiser, pipe.class_embedding
    base = {k: v.clone() for k, v in unet.state_dict().items()}

    pairs_file = runs_dir / "pairs" / "pairs.jsonl"
    if pairs_file.exists():
        pair_info = json.loads((runs_dir / "pairs" / "info.json").read_text())
        print(f"reusing {pairs_file}")
    else:
        t0 = time.time()
        pair_info = build_pairs(runs_dir / "pairs", unet, embed, args.per_class, args.pair_scale, args.tie_tol)
        pair_info["seconds"] = time.time() - t0
        atomic_write(runs_dir / "pairs" / "info.json", lambda tmp: Path(tmp).write_text(json.dumps(pair_info, indent=2)))
    print("preference set:", pair_info, flush=True)

    common = f"--weights {args.weights} {args.train_flags}"
    runs = {"dpo-npo": train(runs_dir, "dpo-npo", f"--method dpo-npo --pairs {pairs_file} {common}"),
            "dpo": train(runs_dir, "dpo", f"--method dpo-npo --no-reverse --pairs {pairs_file} {common}"),
            "reward-npo": train(runs_dir, "reward-npo", f"--method reward-npo {common}")}
    offsets = {name: load_offset(folder, base, pipe.read_weights) for name, folder in runs.items()}
    delta, eta, delta_r = offsets["dpo-npo"], offsets["dpo"], offsets["reward-npo"]
    dpo_model = negative_model(unet, base, eta=eta)  # theta + eta: the positive branch of Eq. 10's configuration
    methods = {
        "cfg": (unet, unet),
        "dpo-npo": (unet, negative_model(unet, base, delta=delta, beta=args.beta)),
        "random-norm": (unet, negative_model(unet, base, delta=random_like(delta, seed=0), beta=args.beta)),
        "dpo": (dpo_model, dpo_model),
        "dpo+npo (Eq. 10)": (dpo_model, negative_model(unet, base, delta=delta, eta=eta, alpha=args.alpha, beta=args.beta)),
        "reward-npo": (unet, negative_model(unet, base, delta=delta_r, beta=args.beta)),
    }
    scales = [float(s) for s in args.guidance_scales.split(",")]
    t0 = time.time()
    rows = evaluate(unet, embed, methods, scales, args.num_per_class)
    meta = {}
    for name, folder in runs.items():
        log = (folder / "loss.csv").read_text().splitlines()
        args_json = json.loads((folder / "args.json").read_text())
        meta[name] = {"loss_first": log[1].split(",")[1], "loss_last": log[-1].split(",")[1], "header": log[0],
                      "last": log[-1], "steps": args_json["steps"], "lr": args_json["lr"], "lora_rank": args_json["lora_rank"],
                      "batch_size": args_json["batch_size"], "dpo_beta": args_json.get("dpo_beta"),
                      "norm": torch.sqrt(sum((v ** 2).sum() for v in offsets[name].values())).item()}
    report = (f"## Preference set\n\n{json.dumps(pair_info)}\n\n## Training\n\n```\n{json.dumps(meta, indent=1)}\n```\n\n"
              f"## Evaluation (alpha {args.alpha}, beta {args.beta}; ± = one standard error)\n\n{table(rows, scales)}\n")
    print(report)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(report))
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"rows": rows, "pairs": pair_info, "training": meta, "args": vars(args), "eval_seconds": time.time() - t0}, indent=2)))


if __name__ == "__main__":
    main()
