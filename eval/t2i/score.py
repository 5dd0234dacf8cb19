"""Paired reward report of two image folders, as the Diffusion-NPO / Self-NPO tables show them.

    python -m eval.t2i.score --a out/npo --b out/cfg --prompts pickapic_test_unique.txt
    python -m eval.t2i.score --a A --b B --prompts prompts.jsonl --scorers pickscore,hpsv21 --out report.json

Pairing: A and B must hold the same image file names (.png .jpg .jpeg .webp .bmp, not recursive);
an image without its namesake on the other side is an error naming it. Prompts come from a .txt
(one a line; trailing blank lines ignored), a .jsonl (field "prompt" or "caption" on each line) or a
.csv (column "prompt" or "caption"). Images are matched to prompts in one of two ways:
  - "index": if every file name starts with digits (00042.png, 42_seed7.png), that number is the
    0-based index of its prompt in the file (so 2.png and 10.png need no zero padding);
  - "sorted": otherwise the names sorted as strings take the prompts in order.
Either way the number of images must equal the number of prompts (cut the prompt file to evaluate
a subset).

For every scorer it prints mean A, mean B and the win rate of A over B (the share of pairs where
A's score is higher; ties count for neither, so A wins + B wins + ties = 100%), and writes
--out (JSON: the table, the mean paired difference with a bootstrap 95% interval, per-image
scores) and the same table as CSV next to it (--out with a .csv suffix). Both are written
atomically; existing files are kept unless --overwrite.

Weights (default locations under --weights-dir, as in weights/README.md; override each with its flag):
  pickscore    pickscore/                                   yuvalkirstain/PickScore_v1 (config.json,
                                                            model.safetensors) + CLIP tokenizer files
  hpsv21       hps/HPS_v2.1_compressed.pt                   xswu/HPSv2 on the Hugging Face hub
  aesthetic    aesthetic/sac+logos+ava1-l14-linearMSE.pth   christophschuhmann/improved-aesthetic-predictor
               aesthetic/clip-vit-large-patch14/            openai/clip-vit-large-patch14 (--clip-l)
  imagereward  imagereward/ (ImageReward.pt + vocab.txt)    THUDM/ImageReward, bert-base-uncased
PickScore and HPSv2.1 share CLIP's BPE tokenizer: --clip-tokenizer, else the vocab.json + merges.txt
in the PickScore folder, else clip_tokenizer/ (also takes bpe_simple_vocab_16e6.txt.gz).
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib
import io
import json
import math
import re
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from eval.metrics import bootstrap_ci, paired_win_rate
from eval.t2i import WEIGHTS_DIR
from npo_min.checkpoint import CheckpointError, atomic_write, check_writable
from npo_min.prompts import read_prompts

# name -> (title, "module:class" implementing eval.t2i.scorers.Scorer, imported only when asked for,
#          the WEIGHTS its load() takes, in order)
SCORERS = {
    "pickscore": ("PickScore", "eval.t2i.scorers:PickScore", ("pickscore", "clip_tokenizer")),
    "hpsv21": ("HPSv2.1", "eval.t2i.scorers:HPSv21", ("hps", "clip_tokenizer")),
    "imagereward": ("ImageReward", "eval.t2i.imagereward:ImageReward", ("imagereward",)),
    "aesthetic": ("Aesthetic", "eval.t2i.scorers:Aesthetic", ("aesthetic", "clip_l")),
}
TITLES = {name: title for name, (title, _, _) in SCORERS.items()}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# weight name -> (default path under --weights-dir, command-line flag, what to put there); weights/README.md
WEIGHTS = {
    "pickscore": ("pickscore", "--pickscore",
                  "the yuvalkirstain/PickScore_v1 folder (config.json + model.safetensors; + the tokenizer files "
                  "vocab.json, merges.txt of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"),
    "hps": ("hps/HPS_v2.1_compressed.pt", "--hps", "HPS_v2.1_compressed.pt from the xswu/HPSv2 hub repository"),
    "aesthetic": ("aesthetic/sac+logos+ava1-l14-linearMSE.pth", "--aesthetic",
                  "sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor"),
    "clip_l": ("aesthetic/clip-vit-large-patch14", "--clip-l",
               "the openai/clip-vit-large-patch14 folder (config.json + model.safetensors)"),
    "imagereward": ("imagereward", "--imagereward",
                    "a folder with ImageReward.pt (THUDM/ImageReward) and vocab.txt (bert-base-uncased)"),
    "clip_tokenizer": ("clip_tokenizer", "--clip-tokenizer",
                       "the vocab.json + merges.txt of a CLIP tokenizer (e.g. openai/clip-vit-large-patch14's; "
                       "the flag also takes CLIP's bpe_simple_vocab_16e6.txt.gz)"),
}


# ----------------------------------------------------------------------------------------------
# Inputs


def list_images(folder: str | Path) -> list[str]:
    """File names of the images directly in folder (sorted). FileNotFoundError / ValueError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found.")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise ValueError(f"no images ({' '.join(IMAGE_SUFFIXES)}) in {folder}.")
    return names


def pair_images(dir_a: str | Path, dir_b: str | Path) -> list[str]:
    """The file names present in both folders. ValueError naming the first image without its pair."""
    a, b = set(list_images(dir_a)), set(list_images(dir_b))
    for names, others, here, there in ((a, b, dir_a, dir_b), (b, a, dir_b, dir_a)):
        missing = sorted(names - others)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"{Path(here) / missing[0]} has no pair: {Path(there) / missing[0]} does not exist{more}.")
    return sorted(a)


def match_prompts(names: list[str], prompts: list[str]) -> tuple[list[str], list[str], str]:
    """Order the images and give each its prompt (rules in the module docstring).

    Returns:
        (names in report order, their prompts, "index" or "sorted").
    Raises:
        ValueError: counts differ, an index is repeated or out of range.
    """
    if len(names) != len(prompts):
        raise ValueError(
            f"{len(names)} image pairs but {len(prompts)} prompts: the prompt file must have one prompt per image "
            "(cut it to the images you generated)."
        )
    leading = [re.match(r"\d+", Path(n).stem) for n in names]
    if not all(leading):
        names = sorted(names)
        return names, list(prompts), "sorted"
    index = {}
    for name, m in zip(names, leading):
        i = int(m.group())
        if i >= len(prompts):
            raise ValueError(f"{name}: prompt index {i} is out of range for {len(prompts)} prompts (indices start at 0).")
        if i in index:
            raise ValueError(f"{index[i]} and {name} both claim prompt index {i}.")
        index[i] = name
    order = sorted(index)
    return [index[i] for i in order], [prompts[i] for i in order], "index"


def open_image(path: Path) -> Image.Image:
    """The image at `path`, loaded. Warns on a degenerate one (a side under 8 px, or fully transparent): it
    scores, but its score says nothing about a generated image.

    Raises ValueError: not a readable image (the message names the file).
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = im.copy()
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError, truncated files
        raise ValueError(f"{path} is not a readable image ({e}): remove or replace it.") from None
    if min(im.size) < 8:
        warnings.warn(f"{path} is {im.width}x{im.height} px: a degenerate image, its score is not meaningful.", stacklevel=2)
    elif "A" in im.getbands() and im.getchannel("A").getextrema()[1] == 0:
        warnings.warn(f"{path} is fully transparent: its score is that of the hidden colour values.", stacklevel=2)
    return im


# ----------------------------------------------------------------------------------------------
# Weights and scorers


def weight_paths(args, scorers: list[str]) -> dict[str, Path]:
    """The weight files the chosen scorers need; FileNotFoundError naming a missing one and where it goes."""
    root = Path(args.weights_dir)
    paths = {}
    for scorer in scorers:
        for key in SCORERS[scorer][2]:
            if key == "clip_tokenizer":
                paths[key] = clip_tokenizer_path(args, paths)
                continue
            default, flag, what = WEIGHTS[key]
            given = getattr(args, flag[2:].replace("-", "_"))
            path = Path(given) if given else root / default
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} not found ({TITLES[scorer]} weights). Put {what} at {root / default}, "
                    f"or pass {flag} PATH."
                )
            paths[key] = path
    return paths


def clip_tokenizer_path(args, paths: dict[str, Path]) -> Path:
    """The CLIP tokenizer for PickScore / HPSv2.1: --clip-tokenizer if given, else the PickScore folder
    if it has vocab.json + merges.txt, else WEIGHTS_DIR/clip_tokenizer."""
    default, flag, what = WEIGHTS["clip_tokenizer"]
    if args.clip_tokenizer:
        candidates = [Path(args.clip_tokenizer)]
    else:
        pick = paths.get("pickscore") or Path(args.pickscore or Path(args.weights_dir) / WEIGHTS["pickscore"][0])
        candidates = [pick, Path(args.weights_dir) / default]
    for path in candidates:
        if path.is_file() or all((path / name).is_file() for name in ("vocab.json", "merges.txt")):
            return path
    raise FileNotFoundError(
        f"no CLIP tokenizer (vocab.json + merges.txt) in {' or '.join(map(str, candidates))} (needed by PickScore / "
        f"HPSv2.1). Put {what} at {Path(args.weights_dir) / default}, or pass {flag} PATH."
    )


def load_scorer(name: str, paths: dict[str, Path], device: str, dtype: torch.dtype, batch_size: int):
    """The Scorer (eval.t2i.scorers) for one name, its class imported only now (keeps `--help` fast)."""
    _, where, weights = SCORERS[name]
    module, cls = where.split(":")
    scorer_cls = getattr(importlib.import_module(module), cls)
    return scorer_cls.load(*(paths[key] for key in weights), device=device, dtype=dtype, batch_size=batch_size)


def score_pairs(scorer, name: str, dirs: tuple[Path, Path], names: list[str], prompts: list[str],
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of A's and B's images, (N,) each; images are read one batch at a time."""
    result = []
    n_batches = math.ceil(len(names) / batch_size)
    with tqdm(total=2 * n_batches, desc=TITLES[name], unit="batch", leave=False) as bar:
        for folder in dirs:
            scores = []
            for start in range(0, len(names), batch_size):
                images = [open_image(folder / n) for n in names[start:start + batch_size]]
                s = torch.as_tensor(scorer.score(images, prompts[start:start + batch_size])).flatten().float().cpu()
                if len(s) != len(images):
                    raise RuntimeError(f"{name} returned {len(s)} scores for {len(images)} images.")
                scores.append(s)
                bar.update(1)
            result.append(torch.cat(scores))
    return result[0], result[1]


# ----------------------------------------------------------------------------------------------
# Report


def summarize(scores_a: torch.Tensor, scores_b: torch.Tensor) -> dict:
    """Means, win rates (ties for neither), tie count, mean paired difference with a bootstrap 95% interval."""
    diff, lo, hi = bootstrap_ci(scores_a, scores_b)
    return dict(
        mean_a=scores_a.double().mean().item(), mean_b=scores_b.double().mean().item(),
        win_rate_a=paired_win_rate(scores_a, scores_b), win_rate_b=paired_win_rate(scores_b, scores_a),
        ties=int((scores_a == scores_b).sum()), n=len(scores_a), mean_diff=diff, mean_diff_ci95=[lo, hi],
    )


TABLE_COLUMNS = ("scorer", "mean_a", "mean_b", "win_rate_a", "win_rate_b", "ties", "n")


def format_table(summary: dict[str, dict]) -> str:
    """The paper-style table: one row per scorer."""
    lines = [f"{'scorer':<12} {'mean A':>9} {'mean B':>9} {'A wins':>8} {'B wins':>8} {'ties':>5} {'n':>6}"]
    for name, s in summary.items():
        lines.append(f"{TITLES[name]:<12} {s['mean_a']:>9.4f} {s['mean_b']:>9.4f} {100 * s['win_rate_a']:>7.1f}% "
                     f"{100 * s['win_rate_b']:>7.1f}% {s['ties']:>5d} {s['n']:>6d}")
    return "\n".join(lines)


def write_report(out: Path, csv_out: Path, report: dict) -> None:
    """JSON (everything) and CSV (the table), each atomically."""
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(TABLE_COLUMNS)
    for name, s in report["summary"].items():
        writer.writerow([name] + [s[c] for c in TABLE_COLUMNS[1:]])
    atomic_write(csv_out, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.t2i.score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--a", required=True, help="folder of method A's images")
    p.add_argument("--b", required=True, help="folder of method B's images (same file names)")
    p.add_argument("--prompts", required=True, help=".txt / .jsonl / .csv prompt file")
    p.add_argument("--scorers", default=",".join(SCORERS), help=f"comma-separated subset of {','.join(SCORERS)}")
    p.add_argument("--weights-dir", default=str(WEIGHTS_DIR),
                   help="where the default weight paths live (default: the repository's weights/)")
    for key, (default, flag, what) in WEIGHTS.items():
        p.add_argument(flag, default=None, help=f"{what} (default: WEIGHTS_DIR/{default})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", default="report.json", help="JSON report; the CSV table goes next to it (.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out files")
    return p.parse_args(argv)


def run(args) -> dict:
    """Everything main does, raising on errors. Returns the report dict."""
    scorers = [s.strip() for s in args.scorers.split(",") if s.strip()]
    unknown = [s for s in scorers if s not in SCORERS]
    if unknown or not scorers:
        raise ValueError(f"unknown scorer(s) {unknown or args.scorers!r}: choose from {','.join(SCORERS)}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}.")
    # Every check that can fail does so before any model is loaded.
    out = check_writable(args.out, args.overwrite)
    csv_out = check_writable(out.with_suffix(".csv"), args.overwrite)
    if csv_out == out:
        raise ValueError(f"--out {out} must not end in .csv: the CSV table is written next to the JSON.")
    dirs = (Path(args.a), Path(args.b))
    names, prompts, rule = match_prompts(pair_images(*dirs), read_prompts(args.prompts))
    paths = weight_paths(args, scorers)
    dtype = getattr(torch, args.dtype)

    per_scorer = {}
    for name in scorers:
        scorer = load_scorer(name, paths, args.device, dtype, args.batch_size)
        per_scorer[name] = score_pairs(scorer, name, dirs, names, prompts, args.batch_size)
        del scorer
        gc.collect()

    summary = {name: summarize(a, b) for name, (a, b) in per_scorer.items()}
    images = [dict(name=n, prompt=p, **{f"{s}_{side}": per_scorer[s][i][k].item()
                                        for s in scorers for i, side in enumerate("ab")})
              for k, (n, p) in enumerate(zip(names, prompts))]
    report = dict(a=str(dirs[0]), b=str(dirs[1]), prompts=str(args.prompts), pairing=rule, n=len(names),
                  summary=summary, images=images)
    print(f"A = {dirs[0]}   B = {dirs[1]}   {len(names)} pairs (prompt pairing: {rule})")
    print(format_table(summary))
    write_report(out, csv_out, report)
    print(f"wrote {out} and {csv_out}")
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError, CheckpointError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
