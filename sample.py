"""NPO-guided sampling: the same seeds with plain CFG and with the NPO negative model, side by side.

    python sample.py --neg-ckpt out/self-npo/delta.safetensors            # digits, grid.png
    python sample.py --model sd15 --weights PATH --neg-ckpt delta.safetensors --prompts prompts.txt

Guidance (Diffusion-NPO Eq. 9, 10): eps = (w + 1) eps_pos(x, c) - w eps_neg(x, c'), w = guidance_scale - 1,
positive weights theta + eta, negative weights theta + alpha * eta + beta * delta.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from npo_min.checkpoint import CheckpointError, atomic_write, check_writable, load_state_dict
from npo_min.delta import load_delta
from npo_min.guidance import negative_model, offset

MODEL_DEFAULTS = {
    "digits": {"weights": "weights/digits", "guidance_scale": 3.0, "steps": 25, "solver": "ddim", "spacing": "trailing"},
    # SD1.5 as in the authors' evaluation (REFERENCE.md): DPM-Solver++ 25 steps, scale 7.5. Their diffusers
    # DPMSolverMultistep used "linspace" spacing (999, 959, ..., 40); "trailing" (999, ..., 39) is the nearest here.
    "sd15": {"weights": None, "guidance_scale": 7.5, "steps": 25, "solver": "dpmpp_2m", "spacing": "trailing"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="digits", choices=sorted(MODEL_DEFAULTS))
    p.add_argument("--weights", default=None, help="base model (digits default: weights/digits)")
    p.add_argument("--neg-ckpt", default=None, help="NPO offset delta (delta.safetensors, a LoRA, or a full UNet for sd15)")
    p.add_argument("--pos-ckpt", default=None, help="positive model (e.g. a DPO UNet): eta = pos - base")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of eta in theta_neg (Eq. 10)")
    p.add_argument("--beta", type=float, default=1.0, help="weight of delta in theta_neg (Eq. 10)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale = w + 1 (digits 3.0, sd15 7.5)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (25)")
    p.add_argument("--solver", default=None, choices=["ddim", "euler", "dpmpp_2m"], help="digits ddim, sd15 dpmpp_2m")
    p.add_argument("--spacing", default=None, choices=["leading", "trailing"], help="timestep spacing")
    p.add_argument("--seed", type=int, default=0, help="base seed (sample i uses seed + i)")
    p.add_argument("--out", default="out/samples", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--ignore-fingerprint", action="store_true", help="apply a delta made for another base checkpoint")
    p.add_argument("--num-per-class", type=int, default=8, help="digits: samples per class in the grid")
    p.add_argument("--prompts", default=None, help="sd15: text file, one prompt per line")
    p.add_argument("--tokenizer", default=None, help="sd15: tokenizer folder (vocab.json, merges.txt) for single-file weights")
    p.add_argument("--sd15-config", default=None, choices=["sd15", "tiny"], help="sd15: architecture preset (default: sd15 or config.json)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--height", type=int, default=512, help="sd15: image height in pixels")
    p.add_argument("--width", type=int, default=512, help="sd15: image width in pixels")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="sd15: weights dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--batch-size", type=int, default=4, help="sd15: prompts per batch")
    args = p.parse_args(argv)
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1:
        p.error(f"--steps must be >= 1 (got {args.steps}).")
    if args.num_per_class < 1:
        p.error(f"--num-per-class must be >= 1 (got {args.num_per_class}).")
    return args


def digits_main(args) -> None:
    from npo_min.digits import NUM_CLASSES, load_digits_model, sample_digits, to_uint8_grid

    out = Path(args.out)
    grid_file = check_writable(out / "grid.png", args.overwrite)
    unet, embed, _ = load_digits_model(args.weights)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    eta = offset(load_state_dict(Path(args.pos_ckpt) / "model.safetensors" if Path(args.pos_ckpt).is_dir() else args.pos_ckpt,
                                 prefix="unet."), base) if args.pos_ckpt else None
    pos = negative_model(unet, base, eta=eta) if eta is not None else unet
    delta = None
    if args.neg_ckpt:
        delta, _ = load_delta(args.neg_ckpt, base, check_fingerprint=not args.ignore_fingerprint)
    neg_plain = negative_model(unet, base, eta=eta, alpha=args.alpha) if eta is not None else pos
    neg_npo = negative_model(unet, base, delta=delta, eta=eta, alpha=args.alpha, beta=args.beta)

    n = args.num_per_class
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n)  # rows = classes
    noise = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
    kw = dict(guidance_scale=args.guidance_scale, steps=args.steps, solver=args.solver, spacing=args.spacing)
    plain = sample_digits(pos, neg_plain, embed, labels, noise, **kw)
    npo = sample_digits(pos, neg_npo, embed, labels, noise, **kw) if delta is not None else plain
    left, right = to_uint8_grid(plain, n), to_uint8_grid(npo, n)
    gap = np.full((left.shape[0], 8), 255, dtype=np.uint8)
    side_by_side = np.concatenate([left, gap, right], axis=1)  # (H, W) | gap | (H, W)
    atomic_write(grid_file, lambda tmp: Image.fromarray(side_by_side).save(tmp, format="PNG"))
    atomic_write(out / "args.json", lambda tmp: Path(tmp).write_text(json.dumps(vars(args), indent=2)))
    print(f"wrote {grid_file}: left plain CFG, right NPO (beta {args.beta}), guidance scale {args.guidance_scale}, "
          f"rows = digits 0-9, same noise per column")


def main(argv=None):
    args = parse_args(argv)
    if args.model == "sd15":
        from npo_min.sd15 import sample_main

        return sample_main(args)
    digits_main(args)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, FileExistsError, PermissionError) as e:
        raise SystemExit(f"error: {e}")
