"""Self-NPO (truncated diffusion fine-tuning) of a diffusion model; writes delta.safetensors.

    python train.py                                  # digits model, K = 5, about 5 min on 2 CPU cores
    python train.py --k 25 --start noise             # the paper's full-simulation baseline
    python train.py --method pretrain --out weights/digits --overwrite   # remake the shipped base model
    python train.py --model sd15 --weights v1-5-pruned-emaonly.safetensors --data DIR --k 5

Outputs under --out: delta.safetensors (or model.safetensors for --method pretrain), loss.csv,
args.json. An existing output is never overwritten without --overwrite.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from npo_min.checkpoint import CheckpointError, atomic_write, check_writable, fingerprint, save_safetensors
from npo_min.delta import save_delta
from npo_min.schedule import NoiseSchedule
from npo_min.self_npo import SelfNPOConfig
from npo_min import training

# Per-model defaults for the flags left unset. digits: sized for 2 CPU cores (see README results);
# sd15: the authors' recipe (REFERENCE.md: lr 1e-6, batch 80 = 4 x 20, 1000 steps).
MODEL_DEFAULTS = {
    "digits": {"steps": 400, "batch_size": 64, "lr": 1e-4, "weights": "weights/digits"},
    "sd15": {"steps": 1000, "batch_size": 4, "lr": 1e-6, "weights": None},
}
PRETRAIN_DEFAULTS = {"steps": 4000, "batch_size": 128, "lr": 1e-3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="digits", choices=sorted(MODEL_DEFAULTS), help="model preset")
    p.add_argument("--method", default="self-npo", choices=["self-npo", "pretrain"],
                   help="self-npo: TDFT fine-tuning -> delta; pretrain: plain diffusion training (digits only)")
    p.add_argument("--weights", default=None, help="base checkpoint (digits: weights/digits; sd15: single file or diffusers folder)")
    p.add_argument("--data", default=None, help="sd15: folder of images with same-name .txt captions")
    p.add_argument("--out", default="out/self-npo", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    g = p.add_argument_group("Self-NPO recipe (Self-NPO Eq. 13-17; defaults = the authors')")
    g.add_argument("--k", type=int, default=5, help="K: truncated DDIM steps per rollout (1..N)")
    g.add_argument("--num-grid", type=int, default=25, help="N: DDIM grid size over T = 1000")
    g.add_argument("--rollout-w", type=float, default=-1.0, help="guidance weight inside the rollout (-1 = unconditional)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA rate of the target model")
    g.add_argument("--start", default="data", choices=["data", "noise"], help="rollout start: real data noised (Eq. 14) or pure noise (Eq. 13)")
    g.add_argument("--renoise", default="eq16", choices=["eq16", "eq15"], help="eq16 = TDFT; eq15 = naive truncation ablation")
    g.add_argument("--loss", default="huber", choices=["huber", "l2"], help="pseudo-Huber or L2 on x0")
    g.add_argument("--huber-c", type=float, default=0.001, help="pseudo-Huber c")
    g.add_argument("--cond-drop", type=float, default=0.0, help="probability the student is trained on c' instead of c")
    o = p.add_argument_group("optimisation (unset = per-model default)")
    o.add_argument("--steps", type=int, default=None, help="optimizer steps (digits 400, sd15 1000, pretrain 4000)")
    o.add_argument("--batch-size", type=int, default=None, help="batch per micro-step (digits 64, sd15 4, pretrain 128)")
    o.add_argument("--lr", type=float, default=None, help="AdamW learning rate, constant (digits 1e-4, sd15 1e-6, pretrain 1e-3)")
    o.add_argument("--weight-decay", type=float, default=1e-3, help="AdamW weight decay")
    o.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    o.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    o.add_argument("--seed", type=int, default=0, help="random seed")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sd = p.add_argument_group("sd15 only")
    sd.add_argument("--tokenizer", default=None, help="tokenizer folder (vocab.json, merges.txt) for single-file weights")
    sd.add_argument("--sd15-config", default=None, choices=["sd15", "tiny"], help="architecture preset (default: sd15, or the folder's config.json)")
    sd.add_argument("--resolution", type=int, default=512, help="training resolution in pixels")
    sd.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights / autocast dtype")
    sd.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    sd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)
    defaults = PRETRAIN_DEFAULTS if args.method == "pretrain" else MODEL_DEFAULTS[args.model]
    for key in ("steps", "batch_size", "lr", "weights"):
        if getattr(args, key, None) is None and key in defaults:
            setattr(args, key, defaults[key])
    if args.steps < 1:
        p.error(f"--steps must be >= 1 (got {args.steps}).")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1 (got {args.batch_size}).")
    if args.lr <= 0:
        p.error(f"--lr must be > 0 (got {args.lr}).")
    if args.method == "pretrain" and args.model != "digits":
        p.error("--method pretrain is for the digits model only; SD checkpoints come pretrained.")
    return args


def write_log(log: list[dict], path: Path) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(log[0]))
            w.writeheader()
            w.writerows(log)
    atomic_write(path, write)


def run_pretrain(args, out: Path) -> None:
    from npo_min.digits import NULL_CLASS, build_digits_model, digits_config_json, load_digits

    model_file = check_writable(out / "model.safetensors", args.overwrite)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits("train")
    unet, embed = build_digits_model()
    start = time.time()
    ema, log = training.pretrain(unet, embed, images, labels, NULL_CLASS, NoiseSchedule.sd(), args.steps,
                                 args.batch_size, args.lr, generator=gen, progress=not args.no_progress)
    seconds = time.time() - start
    meta = {"model": "digits", "method": "pretrain", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "train_seconds": f"{seconds:.0f}", "command": " ".join(sys.argv),
            "unet_fingerprint": fingerprint({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})}
    save_safetensors(ema, model_file, meta, overwrite=args.overwrite)
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(digits_config_json()))
    write_log(log, out / "loss.csv")
    print(f"wrote {model_file} ({args.steps} steps, {seconds:.0f} s, final loss {log[-1]['loss']:.4f})")


def setup_digits(args, gen):
    """(unet, batches, null_context, base description) for Self-NPO on the digits model."""
    from npo_min.digits import NULL_CLASS, load_digits, load_digits_model

    unet, embed, meta = load_digits_model(args.weights)
    images, labels = load_digits("train")  # the held-out split never enters training
    with torch.no_grad():
        contexts = embed(labels)
        null = embed(torch.tensor([NULL_CLASS]))

    def batches():
        for idx in training.shuffled_batches(len(images), args.batch_size, gen):
            yield images[idx], contexts[idx]

    return unet, batches(), null, f"digits:{args.weights}"


def run_self_npo(args, out: Path) -> None:
    cfg = SelfNPOConfig(num_grid=args.num_grid, k=args.k, rollout_w=args.rollout_w, ema_rate=args.ema, start=args.start,
                        renoise=args.renoise, loss=args.loss, huber_c=args.huber_c, cond_drop=args.cond_drop)
    delta_file = check_writable(out / "delta.safetensors", args.overwrite)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    autocast = None
    if args.model == "digits":
        unet, batches, null, base_name = setup_digits(args, gen)
    else:
        from npo_min.sd15 import setup_self_npo

        unet, batches, null, base_name, autocast = setup_self_npo(args, gen)
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    start = time.time()
    log = training.self_npo(unet, batches, null, NoiseSchedule.sd(), cfg, args.steps, args.lr, args.weight_decay,
                            args.grad_clip, args.grad_accum, autocast, gen, progress=not args.no_progress)
    seconds = time.time() - start
    meta = {"base": base_name, "model": args.model, "k": cfg.k, "num_grid": cfg.num_grid, "rollout_w": cfg.rollout_w,
            "ema_rate": cfg.ema_rate, "start": cfg.start, "renoise": cfg.renoise, "loss": cfg.loss, "huber_c": cfg.huber_c,
            "cond_drop": cfg.cond_drop, "steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed, "train_seconds": f"{seconds:.1f}",
            "command": " ".join(sys.argv)}
    save_delta(unet.state_dict(), base, delta_file, meta, overwrite=args.overwrite)
    write_log(log, out / "loss.csv")
    print(f"wrote {delta_file}: K={cfg.k}, {args.steps} steps in {seconds:.0f} s "
          f"({seconds / args.steps:.2f} s/step), final loss {log[-1]['loss']:.4g}")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.method == "pretrain":
        run_pretrain(args, out)
    else:
        run_self_npo(args, out)
    atomic_write(out / "args.json", lambda tmp: Path(tmp).write_text(json.dumps(vars(args), indent=2)))


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, FileExistsError, PermissionError) as e:
        raise SystemExit(f"error: {e}")
