"""Preference pairs for Diffusion-DPO / DPO-NPO: a JSON-lines file, read with the standard library.

One pair per line (blank lines are skipped):

    {"prompt": "a cat on a sofa", "chosen": "img/0001_a.png", "rejected": "img/0001_b.png"}
    {"prompt": "a red car", "chosen": "img/0002_b.png", "rejected": "img/0002_a.png", "tie": true}

prompt: the text (digits: the class name "0".."9"); chosen: the preferred image; rejected: the other one;
tie (optional, default false): no preference, dropped. Relative paths resolve from the file's folder. Both
images of a pair must have the same size (they were generated from the same prompt at the same size).
Video models (CogVideoX): chosen / rejected are clips, an animated .gif / .webp or a folder of .png / .jpg
frames (npo_min.data.read_frames), each with at least --num-frames frames; their frame size is checked.

Every check is made before any training: a missing / unreadable image, a pair whose images differ in size,
a bad line or an empty file raise one-line errors (ValueError / FileNotFoundError) naming the file and line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image, UnidentifiedImageError

from .data import IMAGE_SUFFIXES, MappedBatches, shuffled_batches


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: Path
    rejected: Path
    line: int


def read_pairs(path: str | os.PathLike) -> tuple[list[Pair], int]:
    """The non-tie pairs of a pairs file and the number of ties dropped.

    Raises:
        FileNotFoundError: no such file, or a pair's image is missing (file and line named).
        ValueError: an empty file, a line that is not a JSON object with prompt / chosen / rejected, or no
            pair left after dropping ties.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--pairs {path} not found: pass a JSON-lines file of {{prompt, chosen, rejected}} pairs.")
    pairs, ties, lines = [], 0, 0
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        lines += 1
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n} is not JSON ({e.msg}): each line must be one {{prompt, chosen, rejected}} object.") from None
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path} line {n} lacks {missing} (strings): each line needs prompt, chosen, rejected.")
        if row.get("tie", False):
            ties += 1
            continue
        chosen, rejected = (path.parent / row[k] for k in ("chosen", "rejected"))
        for image in (chosen, rejected):
            if not (image.is_file() or image.is_dir()):  # a folder: a clip's frames (video models)
                raise FileNotFoundError(f"{path} line {n}: image {image} not found.")
        pairs.append(Pair(row["prompt"], chosen, rejected, n))
    if lines == 0:
        raise ValueError(f"--pairs {path} is empty: it needs one JSON pair per line.")
    if not pairs:
        raise ValueError(f"--pairs {path}: all {ties} pairs are ties; ties carry no preference and are dropped.")
    return pairs, ties


def image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) of an image file, of a clip (.gif / .webp: its first frame) or of a frame folder (its
    first frame in name order); ValueError naming it if pillow cannot read it."""
    if path.is_dir():
        frames = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not frames:
            raise ValueError(f"{where}: folder {path} holds no .png / .jpg frames: a clip folder needs its frames.")
        path = frames[0]
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot read image {path} ({type(e).__name__}): replace or remove the pair.") from None


def check_pair_images(pairs: list[Pair], source: str) -> None:
    """Every image readable, the two images of each pair the same size (ValueError naming the pair otherwise)."""
    for p in pairs:
        where = f"{source} line {p.line}"
        a, b = image_size(p.chosen, where), image_size(p.rejected, where)
        if a != b:
            raise ValueError(f"{where}: chosen {p.chosen.name} is {a[0]}x{a[1]} but rejected {p.rejected.name} is "
                             f"{b[0]}x{b[1]}: both images of a pair must have the same size.")


def preference_batches(pipe, path: str | os.PathLike, batch_size: int, generator: torch.Generator,
                       resolution: int | tuple[int, int] | None = None, log: Callable[[str], None] = print,
                       num_frames: int | None = None) -> Iterator[tuple]:
    """Endless `(x_w (B, C, h, w), x_l, cond)` batches of the pairs in `path`, encoded once by the pipeline;
    resumable (the data order: `state_dict` / `load_state_dict`).

    pipe: a Pipeline with `load_pixels(path, resolution) -> (C, H, W)` in [-1, 1], `encode_pixels(pixels)
    -> (mean, std)` of its data distribution (video: `load_pixels(path, resolution, num_frames) -> (C, F, H, W)`
    and latents `(B, F', C, h, w)`; num_frames is passed only when given) (std 0 for pixel-space models) and `encode(prompts)`. Each batch
    draws fresh latents mean + std * N(0, I), as Diffusion-DPO's `latent_dist.sample()` per step.
    Raises: as read_pairs / check_pair_images; ValueError if batch_size exceeds the number of pairs.
    """
    pairs, ties = read_pairs(path)
    check_pair_images(pairs, str(path))
    if batch_size > len(pairs):
        raise ValueError(f"--batch-size {batch_size} exceeds the {len(pairs)} pairs in {path}.")
    log(f"{len(pairs)} preference pairs from {path} ({ties} ties dropped)")
    stats = {"w": [], "l": []}
    contexts = []
    with torch.no_grad():
        for i in range(0, len(pairs), 8):
            chunk = pairs[i : i + 8]
            for key, attr in (("w", "chosen"), ("l", "rejected")):
                frames = {} if num_frames is None else {"num_frames": num_frames}
                pixels = torch.stack([pipe.load_pixels(getattr(p, attr), resolution, **frames) for p in chunk])
                stats[key].append(tuple(t.cpu() for t in pipe.encode_pixels(pixels)))
            contexts.append(_to_cpu(pipe.encode([p.prompt for p in chunk])))
    (mw, sw), (ml, sl) = ((torch.cat([m for m, _ in stats[k]]), torch.cat([s for _, s in stats[k]])) for k in ("w", "l"))
    context = _cat(contexts)
    device = next(pipe.denoiser.parameters()).device
    return _pair_batches(mw, sw, ml, sl, context, batch_size, generator, device)


def _to_cpu(cond):
    return {k: v.cpu() for k, v in cond.items()} if isinstance(cond, dict) else cond.cpu()


def _cat(conds):
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def _index(cond, idx, device):
    return {k: v[idx].to(device) for k, v in cond.items()} if isinstance(cond, dict) else cond[idx].to(device)


def _pair_batches(mw, sw, ml, sl, context, batch_size, generator, device) -> MappedBatches:
    """Resumable (`state_dict` / `load_state_dict`: the data order); the draws are those of a plain loop over
    shuffled_batches: the index batch, then x_w's and x_l's posterior noise, from `generator`."""
    def batch(idx):
        draw = lambda m, s: m[idx] + s[idx] * torch.randn(m[idx].shape, generator=generator)  # noqa: E731
        return draw(mw, sw).to(device), draw(ml, sl).to(device), _index(context, idx, device)
    return MappedBatches(shuffled_batches(len(mw), batch_size, generator), batch)
