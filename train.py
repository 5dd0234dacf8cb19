"""Self-NPO (truncated diffusion fine-tuning) of a diffusion model; writes delta.safetensors.

    python train.py                                  # digits model, K = 5, about 5 min on 2 CPU cores
    python train.py --k 25 --start noise             # the paper's full-simulation baseline
    python train.py --method pretrain --out weights/digits --overwrite   # remake the shipped base model
    python train.py --model sd15 --weights v1-5-pruned-emaonly.safetensors --data DIR --k 5
    python train.py --model cogvideox --weights CogVideoX-2b --data CLIPS --k 5 --dtype bf16 --gradient-checkpointing
    torchrun --nproc_per_node 8 train.py --model sd15 ... --batch-size 10 --grad-accum 1   # batch 80 on 8 GPUs
    python train.py --model sd15 --weights W --method dpo-npo --pairs pairs.jsonl        # Diffusion-NPO Eq. 8 (LoRA)
    python train.py --model sd15 --weights W --method reward-npo --reward pickscore --prompts P.txt   # Eq. 7

Diffusion-NPO trainers (npo_min/diffusion_npo.py): dpo-npo (reversed Diffusion-DPO; --no-reverse = DPO, the eta
of Eq. 10), reward-npo (R_npo = 1 - R, gradients through the last --reward-k steps), guided-reward-npo (the
authors' video variant: the negative branch trained to raise the guided sample's reward). Their defaults are
the MODELS table's `npo` row (authors' recipe for sd15: LoRA rank 8, beta 500, lr 5e-6, batch 64).
Every model reads the same way: the family's pipeline (npo_min/pipelines/) gives the denoiser, the
unconditional c' and the real-data batches; npo_min/training.py runs the Self-NPO loop (Eq. 13-17);
npo_min/offsets.py writes delta = trained - base. Per-model defaults: npo_min.pipelines.MODELS.
Outputs under --out: delta.safetensors (or model.safetensors for --method pretrain), loss.csv,
args.json. Existing outputs are never overwritten without --overwrite (checked before any work).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import sys
import time
from pathlib import Path

import torch
from einops import rearrange

from npo_min import cli, diffusion_npo, distributed, training
from npo_min.checkpoint import atomic_write, fingerprint, save_safetensors
from npo_min.data import clip_caption_pairs, image_caption_pairs
from npo_min.lora import LORA_FILE, add_lora, parse_targets, save_lora
from npo_min.offsets import save_delta
from npo_min.pairs import preference_batches
from npo_min.pipelines import DTYPES, MODELS, default_weights, load_pipeline
from npo_min.prompts import read_prompts
from npo_min.schedule import NoiseSchedule
from npo_min.self_npo import SelfNPOConfig

SCRIPT, RESUME = "train.py", "resume.pt"
NPO_METHODS = ("dpo-npo", "reward-npo", "guided-reward-npo")
PER_MODEL = {"steps": None, "batch_size": None, "grad_accum": 1, "lr": None, "weight_decay": 1e-3,  # flag: fallback
             "rollout_w": -1.0, "resolution": 512, "num_frames": None}


def _defaults_help() -> str:
    rows = [f"{name}: " + ", ".join(f"{k} {v}" for k, v in spec.train.items()) for name, spec in MODELS.items()]
    rows += [f"{name} --method dpo-npo/reward-npo/guided-reward-npo: " + ", ".join(f"{k} {v}" for k, v in spec.npo.items())
             for name, spec in MODELS.items() if spec.npo]
    rows += [f"{name} --method pretrain: " + ", ".join(f"{k} {v}" for k, v in spec.pretrain.items())
             for name, spec in MODELS.items() if spec.pretrain]
    return "per-model defaults (npo_min/pipelines/__init__.py MODELS):\n  " + "\n  ".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=_defaults_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", choices=sorted(MODELS), help="model family (default: digits)")
    p.add_argument("--method", default="self-npo", choices=["self-npo", *NPO_METHODS, "pretrain"],
                   help="self-npo: TDFT fine-tuning -> delta; dpo-npo / reward-npo / guided-reward-npo: Diffusion-NPO "
                        "trainers; pretrain: plain diffusion training of a small model (default: self-npo)")
    p.add_argument("--weights", default=None, help="base checkpoint (digits: weights/digits; sd15: single file or diffusers folder)")
    p.add_argument("--data", default=None, help="text-to-image models: folder of images with same-name .txt captions; "
                   "cogvideox: folder of clips (.gif / .webp / frame folders) with same-name .txt captions")
    p.add_argument("--out", default=None, help="output folder (default: out/METHOD, e.g. out/self-npo)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    g = p.add_argument_group("Self-NPO recipe (Self-NPO Eq. 13-17; defaults = the authors')")
    g.add_argument("--k", type=int, default=5, help="K: truncated DDIM steps per rollout, 1..N (default: 5)")
    g.add_argument("--num-grid", type=int, default=25, help="N: DDIM grid size over T = 1000 (default: 25)")
    g.add_argument("--rollout-w", type=float, default=None, help="guidance weight w inside the rollout; -1 = unconditional "
                   "(default: per model: -1; sdxl -5 as the authors' train_xl.sh)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA rate of the target model (default: 0.999)")
    g.add_argument("--start", default="data", choices=["data", "noise"], help="rollout start: real data noised (Eq. 14) or pure noise (Eq. 13) (default: data)")
    g.add_argument("--renoise", default="eq16", choices=["eq16", "eq15"], help="eq16 = TDFT; eq15 = naive truncation ablation (default: eq16)")
    g.add_argument("--loss", default="huber", choices=["huber", "l2"], help="pseudo-Huber or L2 on x0 (default: huber)")
    g.add_argument("--huber-c", type=float, default=0.001, help="pseudo-Huber c (default: 0.001)")
    g.add_argument("--cond-drop", type=float, default=0.0, help="probability the student is trained on c' instead of c (default: 0)")
    d = p.add_argument_group("Diffusion-NPO trainers (Diffusion-NPO Eq. 7, 8; unset = the MODELS npo defaults)")
    d.add_argument("--pairs", default=None, help="dpo-npo: JSON-lines preference pairs {prompt, chosen, rejected, tie?} (npo_min/pairs.py)")
    d.add_argument("--dpo-beta", type=float, default=None, help="dpo-npo: Diffusion-DPO beta (authors: 500 SD1.5, 2000 SDXL)")
    d.add_argument("--no-reverse", action="store_true", help="dpo-npo: keep the pairs' order = ordinary Diffusion-DPO (the eta of Eq. 10)")
    d.add_argument("--reward", default=None, help="reward-npo: reward name (eval/rewards.py: digits-margin, pickscore, hpsv21, aesthetic, ...)")
    d.add_argument("--reward-weights", default=None, help="reward-npo: folder of the scorers' weights (default: weights/)")
    d.add_argument("--prompts", default=None, help="reward-npo, text-to-image: prompt file (.txt / .jsonl / .csv); digits: the class names")
    d.add_argument("--reward-k", type=int, default=None, help="reward-npo: K, denoising steps the gradient flows through (DRaFT-K)")
    d.add_argument("--sample-steps", type=int, default=None, help="reward-npo: DDIM steps of each training sample")
    d.add_argument("--guidance-scale", type=float, default=None, help="reward-npo: CFG scale of each training sample")
    lo = p.add_argument_group("LoRA training mode (npo_min/lora.py; the saved file is the LoRA, pytorch_lora_weights.safetensors)")
    lo.add_argument("--lora-rank", type=int, default=None,
                    help="train a LoRA of this rank instead of every weight; 0 = full fine-tuning "
                         "(default: 0 for self-npo, the MODELS recipe's rank for the Diffusion-NPO trainers)")
    lo.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; scale = alpha / rank (default: = rank)")
    lo.add_argument("--lora-targets", default=None,
                    help="comma-separated module names (PEFT target_modules rule) (default: to_q,to_k,to_v,to_out.0)")
    o = p.add_argument_group("optimisation (unset = the per-model default listed below)")
    o.add_argument("--steps", type=int, default=None, help="optimizer steps")
    o.add_argument("--batch-size", type=int, default=None, help="batch per micro-step (per rank under torchrun)")
    o.add_argument("--grad-accum", type=int, default=None, help="micro-steps per optimizer step (batch = batch-size x grad-accum x ranks)")
    o.add_argument("--lr", type=float, default=None, help="AdamW learning rate, constant")
    o.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    o.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (default: 1.0)")
    o.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    o.add_argument("--save-every", type=int, default=100, help="write --out/resume.pt every N steps; 0 = never (default: 100)")
    o.add_argument("--resume", action="store_true", help="continue the killed run in --out from its resume.pt (same flags)")
    m = p.add_argument_group("model loading and memory")
    m.add_argument("--config", default=None, help="architecture preset of the family (default: the checkpoint's own / the full model)")
    m.add_argument("--tokenizer", default=None, help="tokenizer folder for single-file weights (vocab.json, merges.txt)")
    m.add_argument("--resolution", default=None, help="training resolution in pixels: N (square) or HxW (video); default per model: 512; sdxl 1024; cogvideox 480x720")
    m.add_argument("--num-frames", type=int, default=None, help="video models: frames per training clip, 4k + 1 (cogvideox default: 49)")
    m.add_argument("--text-dtype", default=None, choices=sorted(DTYPES), help="text encoder weights dtype if not fp32 (cogvideox: bf16 halves T5-XXL's 19 GB)")
    m.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype; weights stay fp32 (default: fp32)")
    m.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if present)")
    args = p.parse_args(argv)
    spec = MODELS[args.model]
    if args.method == "pretrain" and spec.pretrain is None:
        p.error(f"--method pretrain is for the small models ({', '.join(n for n, s in MODELS.items() if s.pretrain)}); "
                f"{args.model} checkpoints come pretrained.")
    if args.method == "pretrain":  # before the defaults below fill the unset flags
        cli.refuse_changed(args, {d: p.get_default(d) for d in SELF_NPO_ONLY},
                           "they set the Self-NPO run, not --method pretrain (its recipe is fixed).")
    if args.method in NPO_METHODS and not spec.npo:
        p.error(f"--method {args.method} has no defaults for --model {args.model} yet (MODELS[{args.model!r}].npo).")
    defaults = spec.pretrain if args.method == "pretrain" else spec.npo if args.method in NPO_METHODS else spec.train
    for key, fallback in PER_MODEL.items():
        if getattr(args, key) is None:
            setattr(args, key, defaults.get(key, fallback))
    if args.out is None:
        args.out = f"out/{args.method}"
    if args.method in NPO_METHODS:
        for key in ("dpo_beta", "reward", "reward_k", "sample_steps", "guidance_scale", "lora_rank"):
            if getattr(args, key) is None:
                setattr(args, key, defaults.get(key))
        if args.method == "dpo-npo" and args.pairs is None:
            p.error("--method dpo-npo needs --pairs FILE (JSON lines {prompt, chosen, rejected}; see README).")
        if args.method != "dpo-npo" and args.pairs is not None:
            p.error(f"--pairs is for --method dpo-npo, not {args.method}.")
    if args.weights is None and args.method != "pretrain":
        args.weights = default_weights(args.model)
    for key in ("steps", "batch_size", "grad_accum"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1 (got {getattr(args, key)}).")
    if not args.lr > 0:
        p.error(f"--lr must be > 0 (got {args.lr}).")
    try:
        args.resolution = parse_resolution(args.resolution)
    except ValueError as e:
        p.error(str(e))
    if args.num_frames is not None and (args.num_frames < 1 or (args.num_frames - 1) % 4):
        p.error(f"--num-frames {args.num_frames} is not 4k + 1 (e.g. 9, 13, 49): the video VAE compresses time by 4.")
    if args.lora_rank is None:
        args.lora_rank = 0
    if args.lora_rank < 0 or (args.lora_rank and args.method == "pretrain"):
        p.error(f"--lora-rank must be >= 0 and does not apply to --method pretrain (got {args.lora_rank}).")
    if args.lora_rank == 0 and (args.lora_alpha is not None or args.lora_targets is not None):
        p.error("--lora-alpha / --lora-targets need --lora-rank > 0.")
    return args


def parse_resolution(value) -> int | tuple[int, int]:
    """"512" -> 512 (square images); "480x720" -> (480, 720) (height x width, video). Raises ValueError."""
    parts = str(value).lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--resolution must be N or HxW in pixels (e.g. 512, 480x720); got {value!r}.")
    return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


RUN_CONTROL = {"steps", "resume", "overwrite", "no_progress", "save_every", "device"}  # may change on --resume


def check_args(args) -> None:
    """Refuse flag values that have no meaning (NaN, a Huber c <= 0, ...) and flags that do not apply to the
    chosen model or method, before any work. Raises ValueError naming the flag."""
    cli.check_finite_flags(args, ["rollout_w", "ema", "huber_c", "cond_drop", "lr", "weight_decay", "grad_clip", "lora_alpha"])
    cli.check_range(args, "huber_c", 0, low_open=True)
    cli.check_range(args, "ema", 0, 1)
    cli.check_range(args, "cond_drop", 0, 1)
    cli.check_range(args, "grad_clip", 0, low_open=True)
    cli.check_range(args, "weight_decay", 0)
    cli.check_range(args, "save_every", 0)
    spec = MODELS[args.model]
    if args.method != "pretrain" and args.weights is None:
        raise ValueError(f"--model {args.model} needs --weights PATH: its base checkpoint (a single .safetensors / "
                         ".ckpt file or a diffusers folder; weights/README.md says where to get it).")
    if spec.pretrain is not None:  # the small models train on their vendored data at their own size
        cli.refuse_changed(args, {"data": None, "resolution": 512, "tokenizer": None},
                           f"--model {args.model} trains on its vendored data at its own size.")
    video = "num_frames" in spec.train  # the video families (their defaults name a frame count) train on clips
    if not video and (args.num_frames is not None or isinstance(args.resolution, tuple)):
        raise ValueError(f"--num-frames and --resolution HxW are for video models; --model {args.model} takes --resolution N.")
    if args.data is not None:  # a missing folder / captions are refused before the weights load
        (clip_caption_pairs if video else image_caption_pairs)(args.data)
    elif args.method == "self-npo" and spec.pretrain is None:  # before the weights load, not after
        raise ValueError(f"--model {args.model} needs --data DIR: the folder of training "
                         f"{'clips' if video else 'images'} with same-name .txt captions that Self-NPO's rollouts start from (Eq. 14).")


# flags that set the Self-NPO run only: refused with --method pretrain (its recipe is fixed, see training.pretrain)
SELF_NPO_ONLY = ("weights", "k", "num_grid", "rollout_w", "ema", "start", "renoise", "loss", "huber_c", "cond_drop",
                 "grad_accum", "weight_decay", "grad_clip", "dtype", "gradient_checkpointing", "config", "resume")


def output_file(args) -> str:
    """The trained weights' file name under --out: the model, the LoRA or the delta."""
    if args.method == "pretrain":
        return "model.safetensors"
    return LORA_FILE if args.lora_rank else "delta.safetensors"


def trainable(unet, args) -> dict:
    """Make `unet` trainable as args say (all weights, or a LoRA on --lora-targets); returns the base state dict."""
    unet.requires_grad_(True).gradient_checkpointing = args.gradient_checkpointing
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    if args.lora_rank:
        layers = add_lora(unet, args.lora_rank, args.lora_alpha, parse_targets(args.lora_targets))
        print(f"LoRA rank {args.lora_rank} on {len(layers)} layers "
              f"({sum(p.numel() for p in unet.parameters() if p.requires_grad)} trainable parameters)")
    return base


def save_offset(unet, base: dict, args, out: Path, meta: dict, lora_prefix: str = "unet") -> Path:
    """Write what was trained: the LoRA (with its rank / alpha / targets; PEFT names prefixed with the family's
    `Pipeline.lora_prefix`) or delta = trained - base."""
    path = out / output_file(args)
    if args.lora_rank:
        return save_lora(unet, base, path, meta, overwrite=args.overwrite, prefix=lora_prefix)
    return save_delta(unet.state_dict(), base, path, meta, overwrite=args.overwrite)


def write_log(log: list[dict], path: Path) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(log[0]))
            w.writeheader()
            w.writerows(log)
    atomic_write(path, write)


PRETRAIN_OUTPUTS = ["model.safetensors", "config.json", "loss.csv", "args.json"]


def snapshot_dirs(args, out: Path) -> dict[int, Path]:
    """{step: folder} of the per-model pretraining snapshots (MODELS[...].pretrain["snapshots"], fractions of
    --steps): OUT-10pct/ for 0.1, ... Each holds a full model like OUT/ (the weak models of autoguidance)."""
    fractions = MODELS[args.model].pretrain.get("snapshots", ())
    return {max(1, round(f * args.steps)): out.with_name(f"{out.name}-{round(100 * f)}pct") for f in fractions}


def save_pretrained(args, folder: Path, ema: dict, log: list[dict], steps: int, seconds: float, config_json: str) -> Path:
    """model.safetensors (+ metadata), config.json, loss.csv and args.json of a pretrained model in folder."""
    extra = {k: v for k, v in MODELS[args.model].pretrain.items() if k in ("ema_rate", "threads")}  # only where set
    meta = {"model": args.model, "method": "pretrain", "steps": steps, "batch_size": args.batch_size, "lr": args.lr,
            **extra, **({"of_run_steps": args.steps} if steps != args.steps else {}),
            "seed": args.seed, "train_seconds": f"{seconds:.0f}", "command": " ".join(sys.argv),
            "unet_fingerprint": fingerprint({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})}
    model_file = save_safetensors(ema, folder / "model.safetensors", meta, overwrite=args.overwrite)
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(config_json))
    write_log(log, folder / "loss.csv")
    if folder != Path(args.out):  # OUT/args.json is written by main() after the run
        cli.write_args(folder / "args.json", argparse.Namespace(**vars(args), snapshot_of=str(args.out), snapshot_step=steps), SCRIPT)
    return model_file


def run_pretrain(args, out: Path) -> None:
    spec = MODELS[args.model].pretrain
    if "threads" in spec:  # the recipe's thread count: float sums in the same order, so a rerun gives the same bytes
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    family = importlib.import_module(MODELS[args.model].module)
    unet, embed, images, labels, null_class, config_json = family.pretraining_setup()
    snapshots = snapshot_dirs(args, out)
    start = time.time()

    def on_snapshot(step, ema, log):
        path = save_pretrained(args, snapshots[step], ema, log, step, time.time() - start, config_json)
        print(f"wrote {path} (snapshot at step {step} of {args.steps})")

    options = {"ema_rate": spec["ema_rate"]} if "ema_rate" in spec else {}
    ema, log = training.pretrain(unet, embed, images, labels, null_class, NoiseSchedule.sd(), args.steps,
                                 args.batch_size, args.lr, generator=gen, progress=not args.no_progress,
                                 snapshot_steps=tuple(snapshots), on_snapshot=on_snapshot, **options)
    seconds = time.time() - start
    model_file = save_pretrained(args, out, ema, log, args.steps, seconds, config_json)
    print(f"wrote {model_file} ({args.steps} steps, {seconds:.0f} s, final loss {log[-1]['loss']:.4f})")


def load_resume_for(path: Path, recipe: dict) -> dict:
    """The resume state in `path`, refused if it was saved by a run with another recipe (flags, data, seed)."""
    state = cli.load_resume(path)
    saved = state.get("recipe", {})
    changed = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {recipe.get(k)!r}" for k in changed[:5])
        raise ValueError(f"{path} was saved by a run with other flags ({diffs}): resume with the same flags, "
                         "or start over with --overwrite.")
    return state


def argv_of(args) -> list[str]:
    """The command line, for the resume hint (sys.argv without a --resume already there)."""
    return [a for a in sys.argv[1:] if a != "--resume"]


def run_self_npo(args, out: Path, dist: distributed.Dist | None = None) -> None:
    """Self-NPO into `out`; under torchrun (`dist`) every rank trains its shard and rank 0 writes."""
    world, main_rank = (dist.world, dist.main) if dist else (1, True)
    cfg = SelfNPOConfig(num_grid=args.num_grid, k=args.k, rollout_w=args.rollout_w, ema_rate=args.ema, start=args.start,
                        renoise=args.renoise, loss=args.loss, huber_c=args.huber_c, cond_drop=args.cond_drop)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    pipe = load_pipeline(args.model, args.weights, device=args.device, config=args.config, tokenizer=args.tokenizer,
                         text_dtype=DTYPES.get(args.text_dtype))
    video = {"num_frames": args.num_frames} if pipe.video else {}
    batches = pipe.self_npo_batches(args.data, args.batch_size * world, gen, resolution=args.resolution, **video)
    if dist:  # every rank draws the global batch and keeps its rows
        batches = distributed.ShardedBatches(batches, dist.rank, dist.world)
    null, unet, schedule, base_name = pipe.null_cond(1), pipe.denoiser, pipe.schedule, pipe.name
    prediction_type, lora_prefix = pipe.prediction_type, pipe.lora_prefix
    pipe.release_text_encoder()
    del pipe  # the frozen encoders / VAE are not needed any more: the batches hold what they encoded
    base = trainable(unet, args)
    autocast = None if args.dtype == "fp32" else DTYPES[args.dtype]
    resume_file, recipe = out / RESUME, {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}
    resume = load_resume_for(resume_file, recipe) if args.resume else None
    save = (lambda state: cli.save_resume(resume_file, {**state, "recipe": recipe})) if args.save_every and main_rank else None
    start = time.time()
    try:
        log = training.self_npo(unet, batches, null, schedule, cfg, args.steps, args.lr, args.weight_decay,
                                args.grad_clip, args.grad_accum, autocast, gen, progress=not args.no_progress,
                                resume=resume, save=save, save_every=args.save_every, dist=dist,
                                prediction_type=prediction_type)
    except training.NonFiniteError as e:
        kept = f" The last good state is in {resume_file} (--resume continues from it)." if resume_file.is_file() else ""
        raise training.NonFiniteError(e.step, f"{e} Nothing was written.{kept}") from None
    except KeyboardInterrupt:
        if save is None or not resume_file.is_file():  # (ranks > 0: rank 0 says how to resume)
            raise
        step = cli.load_resume(resume_file)["step"]
        launcher = f"torchrun --nproc_per_node {dist.world}" if dist else "python"
        raise cli.Interrupted(f"saved step {step} of {args.steps} to {resume_file}; continue with: "
                              f"{launcher} train.py {' '.join(argv_of(args))} --resume") from None
    seconds = time.time() - start
    if not main_rank:
        return
    meta = {"base": base_name, "model": args.model, "k": cfg.k, "num_grid": cfg.num_grid, "rollout_w": cfg.rollout_w,
            "ema_rate": cfg.ema_rate, "start": cfg.start, "renoise": cfg.renoise, "loss": cfg.loss, "huber_c": cfg.huber_c,
            "cond_drop": cfg.cond_drop, "steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed, "train_seconds": f"{seconds:.1f}",
            "command": " ".join(sys.argv), **({"world_size": world} if dist else {})}
    delta_file = save_offset(unet, base, args, out, meta, lora_prefix)
    write_log(log, out / "loss.csv")
    resume_file.unlink(missing_ok=True)  # the run is complete: the delta is its result
    print(f"wrote {delta_file}: K={cfg.k}, {args.steps} steps in {seconds:.0f} s "
          f"({seconds / args.steps:.2f} s/step), final loss {log[-1]['loss']:.4g}")


def run_diffusion_npo(args, out: Path) -> None:
    """dpo-npo / reward-npo / guided-reward-npo (npo_min/diffusion_npo.py): every input is read and checked
    (pairs, images, reward) before training starts; the delta or LoRA is written only at the end. Resumable as
    Self-NPO: --out/resume.pt every --save-every steps and at Ctrl-C; --resume continues it bit for bit."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    pipe = load_pipeline(args.model, args.weights, device=args.device, config=args.config, tokenizer=args.tokenizer,
                         text_dtype=DTYPES.get(args.text_dtype))
    if hasattr(pipe, "set_image_size") and pipe.latent_scale > 1 and not pipe.video:  # SDXL: the time ids name the training size
        pipe.set_image_size(args.resolution, args.resolution)
    video = {"num_frames": args.num_frames} if pipe.video else {}
    autocast = None if args.dtype == "fp32" else DTYPES[args.dtype]
    common = dict(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                  grad_accum=args.grad_accum, autocast_dtype=autocast, generator=gen, progress=not args.no_progress,
                  prediction_type=pipe.prediction_type)
    resume_file, recipe = out / RESUME, {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}
    resume = load_resume_for(resume_file, recipe) if args.resume else None
    save = (lambda state: cli.save_resume(resume_file, {**state, "recipe": recipe})) if args.save_every else None
    common |= dict(resume=resume, save=save, save_every=args.save_every)
    meta = {"base": pipe.name, "model": args.model, "method": args.method, "steps": args.steps, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed}
    if args.method == "dpo-npo":
        batches = preference_batches(pipe, args.pairs, args.batch_size, gen, resolution=args.resolution, **video)
        pipe.release_text_encoder()  # every prompt is encoded (CogVideoX: frees T5)
        base = trainable(pipe.denoiser, args)
        meta |= {"dpo_beta": args.dpo_beta, "reverse": not args.no_reverse, "pairs": args.pairs}
        fit = lambda: diffusion_npo.dpo_npo(pipe.denoiser, batches, pipe.schedule, args.dpo_beta,  # noqa: E731
                                            reverse=not args.no_reverse, **common)
    else:
        from eval.rewards import load_reward  # the project's scorers; imported only here (keeps --help fast)

        reward = load_reward(args.reward, args.reward_weights, device=args.device)
        if args.prompts:
            prompts = read_prompts(args.prompts)
        elif pipe.class_names:
            prompts = list(pipe.class_names)
        else:
            raise ValueError(f"--method {args.method} --model {args.model} needs --prompts FILE (the prompts to sample).")
        size = MODELS[args.model].sample
        if pipe.video:  # clips: the reward is the mean over the decoded frames
            (height, width), reward = args.resolution, frame_mean_reward(reward)
        else:
            height = width = args.resolution if pipe.latent_scale > 1 else size["height"]
        base = trainable(pipe.denoiser, args)
        meta |= {"reward": args.reward, "reward_k": args.reward_k, "sample_steps": args.sample_steps,
                 "guidance_scale": args.guidance_scale, "guided": args.method == "guided-reward-npo"}
        fit = lambda: diffusion_npo.reward_npo(  # noqa: E731
            pipe.denoiser, pipe.decode_with_grad, reward, prompts, pipe.encode, pipe.null_cond(1),
            pipe.noise_shape(height, width, **video), pipe.schedule, guided=args.method == "guided-reward-npo",
            guidance_scale=args.guidance_scale, sample_steps=args.sample_steps, k=args.reward_k,
            batch_size=args.batch_size, set_alpha_to_one=pipe.set_alpha_to_one, **common)
    start = time.time()
    try:
        log = fit()
    except training.NonFiniteError as e:
        kept = f" The last good state is in {resume_file} (--resume continues from it)." if resume_file.is_file() else ""
        raise training.NonFiniteError(e.step, f"{e}{kept}") from None
    except KeyboardInterrupt:
        if save is None or not resume_file.is_file():
            raise
        step = cli.load_resume(resume_file)["step"]
        raise cli.Interrupted(f"saved step {step} of {args.steps} to {resume_file}; continue with: "
                              f"python train.py {' '.join(argv_of(args))} --resume") from None
    seconds = time.time() - start
    meta |= {"train_seconds": f"{seconds:.1f}", "command": " ".join(sys.argv)}
    path = save_offset(pipe.denoiser, base, args, out, meta, pipe.lora_prefix)
    write_log(log, out / "loss.csv")
    resume_file.unlink(missing_ok=True)  # the run is complete: the LoRA / delta is its result
    name = "dpo (--no-reverse)" if args.method == "dpo-npo" and args.no_reverse else args.method
    print(f"wrote {path}: {name}, {args.steps} steps in {seconds:.0f} s ({seconds / args.steps:.2f} s/step), "
          f"loss {log[0]['loss']:.4g} -> {log[-1]['loss']:.4g}")


def frame_mean_reward(reward):
    """An image reward `(images (B, C, H, W), prompts) -> (B,)` as a clip reward: clips `(B, C, F, H, W)` ->
    the mean over the F frames `(B,)`, each frame scored with its clip's prompt."""
    def score(clips, prompts):
        B, F = clips.shape[0], clips.shape[2]
        frames = rearrange(clips, "b c f h w -> (b f) c h w")  # (B*F, C, H, W)
        return reward(frames, [p for p in prompts for _ in range(F)]).reshape(B, F).mean(1)  # (B*F,) -> (B, F) -> (B,)
    return score


def output_files(args) -> list[Path]:
    """Every file this run writes under --out (checked before any work)."""
    out = Path(args.out)
    if args.method == "pretrain":  # the run's folder and its snapshots' (OUT-10pct/, ...)
        return [folder / n for folder in [out, *snapshot_dirs(args, out).values()] for n in PRETRAIN_OUTPUTS]
    return [out / n for n in (output_file(args), "loss.csv", "args.json")]


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    out = Path(args.out)
    files = output_files(args)
    resume_file = out / RESUME
    if args.resume:
        cli.check_out(files, args.overwrite, SCRIPT)
        if not resume_file.is_file():
            raise FileNotFoundError(f"--resume: no {resume_file} (a run writes it every --save-every steps). "
                                    "Start without --resume.")
    else:
        if resume_file.exists() and not args.overwrite:
            raise FileExistsError(f"{resume_file} holds a stopped run: continue it with the same flags and --resume, "
                                  "or pass --overwrite to start over.")
        cli.check_out(files + ([resume_file] if args.method in ("self-npo", *NPO_METHODS) and args.save_every else []),
                      args.overwrite, SCRIPT)
    if distributed.world_size() > 1 and args.method != "self-npo":
        raise ValueError(f"--method {args.method} runs in one process: start it with python, not torchrun.")
    dist = distributed.init(args.device)  # None unless started by torchrun
    try:
        if dist:
            args.device = dist.device
        if not dist or dist.main:
            cli.clean_temp(out)  # half-written files of a killed run
        if args.method == "pretrain":
            run_pretrain(args, out)
        elif args.method in NPO_METHODS:
            run_diffusion_npo(args, out)
        else:
            run_self_npo(args, out, dist)
        if not dist or dist.main:
            cli.write_args(out / "args.json", args, SCRIPT)
    finally:
        distributed.close(dist)


if __name__ == "__main__":
    cli.run(main)
