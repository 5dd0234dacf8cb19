"""NPO-guided sampling: the same seeds with plain CFG and with the NPO negative model, side by side.

    python sample.py --neg-ckpt out/self-npo/delta.safetensors            # digits: 8 samples of each class
    python sample.py --model sd15 --weights PATH --neg-ckpt delta.safetensors --prompts prompts.txt
    python sample.py --model cogvideox --weights CogVideoX-2b --neg-ckpt delta.safetensors --prompts prompts.txt --dtype bf16
    python sample.py --model sdxl --weights sd_xl_base_1.0.safetensors --tokenizer DIR --neg-ckpt delta.safetensors --prompts p.txt

Guidance (Diffusion-NPO Eq. 9, 10): eps = eps_neg + s (eps_pos - eps_neg), s = guidance_scale = w + 1;
positive weights theta_pos = theta + eta (eta from --pos-ckpt, else 0), negative weights
theta_neg = theta + alpha * eta + beta * delta (delta from --neg-ckpt). "base" = plain CFG, theta_pos on
both c and c'; "npo" = theta_pos on c, theta_neg on c'. Low-rank offsets (a LoRA, or a dense delta cut to
rank R with --delta-rank R) run in ONE batched [c', c] pass on one denoiser, as plain CFG does, each half
with its own low-rank terms (npo_min/batched_offsets.py); full-rank ones keep a second copy of the
denoiser and two passes per step, as the authors' pipelines (the memory cost is printed).
--neg-ckpt / --pos-ckpt take, for every model, our delta.safetensors, a LoRA (PEFT / diffusers / kohya
names) or a full fine-tuned denoiser (npo_min/offsets.py). Sample i uses noise seeded with seed + i.
Writes base/{i:04d}.png, npo/{i:04d}.png (so `eval.t2i.score --a OUT/npo --b OUT/base` pairs them),
grid.png (labelled: base | npo, first 16 rows) and args.json under --out; existing files are refused
before any work unless --overwrite. Video models (cogvideox) write base/{i:04d}.gif and npo/{i:04d}.gif
(animated, 8 fps) and a grid.png of frames (one row per prompt: 5 frames evenly spaced, base | npo).
Prompts are encoded before sampling, then the text encoder is released (T5-XXL: 9.5-19 GB).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from npo_min import cli
from npo_min.batched_offsets import load_offset_factors, npo_denoisers
from npo_min.guidance import guided_denoiser
from npo_min.images import labelled_grid, save_gif, save_png, to_pil, to_pil_frames
from npo_min.pipelines import DTYPES, MODELS, default_weights, load_pipeline
from npo_min.prompts import read_prompts
from npo_min.solvers import SOLVERS, sample

SCRIPT = "sample.py"
GRID_ROWS = 16  # grid.png shows the first rows only: 500 rows of 512 px would be an unusable image
GRID_FRAMES = 5  # video models: frames per clip shown in grid.png (evenly spaced, first and last included)
FPS = 8  # CogVideoX's frame rate (diffusers export_to_video(fps=8) in its examples)


def _defaults_help() -> str:
    return "per-model defaults (npo_min/pipelines/__init__.py MODELS):\n  " + "\n  ".join(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in spec.sample.items()) for name, spec in MODELS.items())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=_defaults_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", choices=sorted(MODELS), help="model family (default: digits)")
    p.add_argument("--weights", default=None, help="base model (digits default: weights/digits)")
    p.add_argument("--neg-ckpt", default=None, help="NPO offset delta: delta.safetensors, a LoRA, or a full fine-tuned denoiser")
    p.add_argument("--pos-ckpt", default=None, help="positive model or offset (e.g. a DPO UNet or LoRA): eta")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of eta in theta_neg (Eq. 10) (default: 1)")
    p.add_argument("--beta", type=float, default=1.0, help="weight of delta in theta_neg (Eq. 10) (default: 1)")
    p.add_argument("--delta-rank", type=int, default=None,
                   help="cut a full-rank --neg-ckpt delta to this rank (truncated SVD, error printed): one-pass guidance")
    p.add_argument("--two-model", action="store_true", help="force the two-model path (a second denoiser copy) for low-rank offsets too")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale s = w + 1")
    p.add_argument("--steps", type=int, default=None, help="solver steps")
    p.add_argument("--solver", default=None, choices=sorted(SOLVERS), help="ODE solver")
    p.add_argument("--spacing", default=None, choices=["leading", "trailing"], help="timestep spacing")
    p.add_argument("--prompts", default=None, help="prompt file (.txt one a line, .jsonl, .csv); class-conditional default: every class")
    p.add_argument("--num-per-class", type=int, default=8, help="class-conditional models without --prompts: samples per class (default: 8)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels")
    p.add_argument("--width", type=int, default=None, help="image width in pixels")
    p.add_argument("--num-frames", type=int, default=None, help="video models: frames per clip, 4k + 1 (cogvideox default: 49)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per batch")
    p.add_argument("--seed", type=int, default=0, help="base seed: sample i uses seed + i (default: 0)")
    p.add_argument("--out", default="out/samples", help="output folder (default: out/samples)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--ignore-fingerprint", action="store_true", help="apply a delta made for another base checkpoint")
    p.add_argument("--trust-delta", action="store_true",
                   help="apply an offset file without our metadata (its base cannot be checked) as delta")
    p.add_argument("--config", default=None, help="architecture preset of the family (default: the checkpoint's own / the full model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for single-file weights (vocab.json, merges.txt)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights dtype (default: fp32)")
    p.add_argument("--text-dtype", default=None, choices=sorted(DTYPES), help="text encoder dtype if not --dtype (cogvideox: bf16 T5)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if present)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    for key, value in MODELS[args.model].sample.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.weights is None:
        args.weights = default_weights(args.model)
    if args.delta_rank is not None and args.delta_rank < 1:
        p.error(f"--delta-rank must be >= 1 (got {args.delta_rank}).")
    for key in ("steps", "num_per_class", "batch_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1 (got {getattr(args, key)}).")
    if args.num_frames is not None and (args.num_frames < 1 or (args.num_frames - 1) % 4):
        p.error(f"--num-frames {args.num_frames} is not 4k + 1 (e.g. 9, 13, 49): the video VAE compresses time by 4.")
    if args.weights is None:
        raise ValueError(f"--model {args.model} needs --weights PATH: its base checkpoint (a single .safetensors / "
                         ".ckpt file or a diffusers folder; weights/README.md says where to get it).")
    cli.check_finite_flags(args, ["alpha", "beta", "guidance_scale"])
    for key in ("height", "width"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} must be >= 1 pixel (got {getattr(args, key)}).")
    if args.prompts is not None and args.num_per_class != p.get_default("num_per_class"):
        raise ValueError("--num-per-class does not apply with --prompts: each prompt is drawn once.")
    return args


def main(argv=None) -> list[Path]:
    """Returns the images written (base/, npo/, grid.png)."""
    args = parse_args(argv)
    if not (args.neg_ckpt or args.pos_ckpt):
        raise ValueError("nothing to compare: pass --neg-ckpt (an NPO delta / LoRA / model) and/or --pos-ckpt.")
    pipe = load_pipeline(args.model, args.weights, config=args.config, tokenizer=args.tokenizer,  # fp32 on the CPU
                         text_dtype=DTYPES.get(args.text_dtype))
    if args.prompts:
        prompts, per_row = read_prompts(args.prompts), (GRID_FRAMES if pipe.video else 1)
    elif pipe.class_names:
        prompts, per_row = [c for c in pipe.class_names for _ in range(args.num_per_class)], args.num_per_class
    else:
        raise ValueError(f"--model {args.model} needs --prompts FILE (.txt one prompt a line, .jsonl or .csv).")
    if args.num_frames is not None and not pipe.video:
        raise ValueError(f"--num-frames is for video models; --model {args.model} makes images.")
    frames = {"num_frames": args.num_frames} if pipe.video else {}
    pipe.noise_shape(args.height, args.width, **frames)  # refuses an impossible size before any work
    pipe.set_image_size(args.height, args.width)  # SDXL conditions on it (time ids); others ignore it
    out, ext = Path(args.out), "gif" if pipe.video else "png"
    names = [f"{kind}/{i:04d}.{ext}" for i in range(len(prompts)) for kind in ("base", "npo")] + ["grid.png"]
    files = cli.check_out([out / name for name in names] + [out / "args.json"], args.overwrite, SCRIPT)[:-1]

    # theta_pos = theta + eta on c; theta_neg = theta + alpha eta + beta delta on c' (Eq. 10)
    base = pipe.denoiser.state_dict()
    check = not args.ignore_fingerprint
    eta = delta = None
    if args.pos_ckpt:
        eta, how = load_offset_factors(args.pos_ckpt, base, pipe.read_weights, check, args.trust_delta)
        print(f"--pos-ckpt {args.pos_ckpt}: {how}")
    if args.neg_ckpt:
        delta, how = load_offset_factors(args.neg_ckpt, base, pipe.read_weights, check, args.trust_delta, rank=args.delta_rank)
        print(f"--neg-ckpt {args.neg_ckpt}: {how}")
    del base
    pos, neg, how = npo_denoisers(pipe.denoiser, eta, delta, args.alpha, args.beta, one_pass=False if args.two_model else None)
    print(how)
    del eta, delta
    dtype = DTYPES[args.dtype]
    pipe.to(args.device, dtype)
    if isinstance(neg, torch.nn.Module):
        neg.to(args.device, dtype)
    firsts = range(0, len(prompts), args.batch_size)
    conds = [(pipe.encode(prompts[f : f + args.batch_size]), pipe.null_cond(len(prompts[f : f + args.batch_size]))) for f in firsts]
    pipe.release_text_encoder()  # every prompt is encoded: free the text encoder before sampling

    rows = {"base": [], "npo": []}
    for first, (cond, null) in tqdm(zip(firsts, conds), total=len(conds), desc="batches", disable=args.no_progress):
        n = len(prompts[first : first + args.batch_size])
        noise = pipe.noise(n, args.seed + first, args.height, args.width, **frames).to(args.device, dtype)
        for kind, neg_model in (("base", pos), ("npo", neg)):
            denoise = guided_denoiser(pos, neg_model, cond, null, args.guidance_scale)
            x0 = sample(denoise, noise, args.steps, pipe.schedule, args.solver, args.spacing,
                        prediction_type=pipe.prediction_type, set_alpha_to_one=pipe.set_alpha_to_one)
            if pipe.video:  # (B, 3, F, H, W) clips: an animated GIF each, GRID_FRAMES of its frames in the grid
                images = []
                for j, clip in enumerate(pipe.decode(x0)):
                    clip_frames = to_pil_frames(clip)
                    save_gif(clip_frames, out / kind / f"{first + j:04d}.gif", FPS)
                    images += [clip_frames[round(i * (len(clip_frames) - 1) / max(1, GRID_FRAMES - 1))] for i in range(GRID_FRAMES)]
            else:
                images = [to_pil(x) for x in pipe.decode(x0)]
                for j, img in enumerate(images):
                    save_png(img, out / kind / f"{first + j:04d}.png")
            rows[kind] += images[: max(0, GRID_ROWS * per_row - len(rows[kind]))]
    blocks = {f"base: plain CFG, scale {args.guidance_scale:g}": _rows(rows["base"], per_row),
              "npo: negative " + (f"theta + {args.alpha:g} eta" if args.pos_ckpt else "theta")
              + (f" + {args.beta:g} delta" if args.neg_ckpt else ""): _rows(rows["npo"], per_row)}
    stride = 1 if pipe.video else per_row  # a grid row is one clip's frames, or per_row samples of one prompt
    labels = [prompts[r * stride] for r in range(len(blocks[next(iter(blocks))]))]
    title = (f"{args.model}: {args.solver} {args.steps} steps, seed {args.seed}+i"
             + (f", neg {Path(args.neg_ckpt).name}" if args.neg_ckpt else "") + (f", pos {Path(args.pos_ckpt).name}" if args.pos_ckpt else ""))
    save_png(labelled_grid(blocks, labels, title), out / "grid.png")
    cli.write_args(out / "args.json", args, SCRIPT)
    print(f"wrote {2 * len(prompts)} {'clips' if pipe.video else 'images'} under {out}/base and {out}/npo, and {out / 'grid.png'} "
          f"(left plain CFG, right NPO, guidance scale {args.guidance_scale:g}, beta {args.beta:g}; same noise per position)")
    return files


def _rows(images: list, per_row: int) -> list[list]:
    return [images[i : i + per_row] for i in range(0, len(images), per_row)]


if __name__ == "__main__":
    cli.run(main)
