"""Training data: a folder of images with same-name `.txt` captions (the Self-NPO data of the text-to-image
families; the authors used LAION images with their captions), a folder of short clips with captions (the
video family), and the shuffled batch order every loop uses.

Clips are read with pillow only: animated `.gif` / `.webp` files, and frame folders (a folder of
`.png` / `.jpg` frames, in name order). There is no video decoder among the runtime packages, so `.mp4`
and other container files are refused with the conversion to run (ffmpeg) instead of being skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageSequence

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CLIP_SUFFIXES = (".gif", ".webp")  # animated files pillow reads frame by frame
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")  # need a decoder: refused


def image_caption_pairs(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """Images in `folder` (sorted by name) with the text of their same-name `.txt` caption.

    Raises FileNotFoundError (no folder; images without a caption, listed) or ValueError (no images).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder} is not a folder of images with .txt captions.")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images in {folder} have no same-name .txt caption, e.g. {missing[:5]}.")
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]


def resize_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Scale (LANCZOS) so the image covers height x width, keeping its aspect ratio, then centre-crop to it."""
    scale = max(height / img.height, width / img.width)
    img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))), Image.LANCZOS)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> `(3, H, W)` float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (H, W, 3) -> (3, H, W)


def load_image(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """An RGB image -> `(3, resolution, resolution)` float32 in [-1, 1].

    Shortest side resized to `resolution` (LANCZOS), then a centre crop: the authors' Self-NPO
    transform (torchvision Resize + CenterCrop + Normalize(0.5, 0.5)), done with pillow.

    Raises ValueError: not a readable image (the message names the file).
    """
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError, truncated files
        raise ValueError(f"{path} is not a readable image ({e}): remove or replace it.") from None
    left, top, width, height = centre_crop_box(img.size, resolution)
    img = img.resize((width, height), Image.LANCZOS).crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (H, W, 3) -> (3, H, W)


def load_image_random_crop(path: str | os.PathLike, resolution: int,
                           generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    """An RGB image -> `(3, resolution, resolution)` float32 in [-1, 1] and the crop's (top, left) in pixels.

    Shortest side resized to `resolution` (LANCZOS, as load_image), then a random crop: top uniform in
    [0, resized height - resolution], left in [0, resized width - resolution], drawn in that order with
    `generator` (two draws per image, also when one range is {0}). The authors' SDXL transform (train_xl.py:
    Resize + RandomCrop, whose (top, left) go into the SDXL crop time ids), done with pillow.

    Raises ValueError: not a readable image (the message names the file).
    """
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError, truncated files
        raise ValueError(f"{path} is not a readable image ({e}): remove or replace it.") from None
    _, _, width, height = centre_crop_box(img.size, resolution)
    top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    img = img.resize((width, height), Image.LANCZOS).crop((left, top, left + resolution, top + resolution))
    return to_tensor(img), (top, left)


def clip_caption_pairs(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """Clips in `folder` (sorted by name) with the text of their same-name `.txt` caption.

    A clip is an animated `.gif` / `.webp` file (`a.gif` + `a.txt`) or a frame folder (`a/` holding
    `.png` / `.jpg` frames, + `a.txt` next to it).

    Raises:
        FileNotFoundError: no folder; clips without a caption (listed).
        ValueError: no clips; a video container file (`.mp4`, ...), which pillow cannot decode (one line
            with the ffmpeg conversion to GIF or to a frame folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder} is not a folder of clips (.gif / .webp / frame folders) with .txt captions.")
    videos = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if videos:
        raise ValueError(f"{folder / videos[0]}: no video decoder here ({len(videos)} such files); pillow reads GIF, WebP and "
                         f"frame folders: convert, e.g. `ffmpeg -i {videos[0]} {Path(videos[0]).stem}.gif` or "
                         f"`ffmpeg -i {videos[0]} {Path(videos[0]).stem}/%04d.png`.")
    clips = sorted(p for p in folder.iterdir()
                   if (p.is_file() and p.suffix.lower() in CLIP_SUFFIXES)
                   or (p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())))
    if not clips:
        raise ValueError(f"no clips in {folder}: expected animated .gif / .webp files or folders of .png / .jpg frames, "
                         "each with a same-name .txt caption.")
    missing = [p.name for p in clips if not p.with_suffix(".txt").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} clips in {folder} have no same-name .txt caption, e.g. {missing[:5]}.")
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in clips]


def read_frames(path: str | os.PathLike) -> list[Image.Image]:
    """Every frame of a clip as RGB images: an animated .gif / .webp, or a frame folder in name order."""
    path = Path(path)
    if path.is_dir():
        return [Image.open(f).convert("RGB") for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    with Image.open(path) as img:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(img)]


def load_clip(path: str | os.PathLike, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The first `num_frames` frames of a clip -> `(3, num_frames, height, width)` float32 in [-1, 1].

    Each frame is scaled to cover height x width and centre-cropped (`resize_crop`), as images are.

    Raises:
        ValueError: the clip has fewer than num_frames frames (named, with both counts).
    """
    frames = read_frames(path)
    if len(frames) < num_frames:
        raise ValueError(f"clip {path} has {len(frames)} frames but {num_frames} are needed (--num-frames): "
                         "use longer clips or fewer frames (4k + 1, e.g. 9, 13, 49).")
    return torch.stack([to_tensor(resize_crop(f, height, width)) for f in frames[:num_frames]], dim=1)  # (3, F, H, W)


def centre_crop_box(size: tuple[int, int], resolution: int) -> tuple[int, int, int, int]:
    """load_image's geometry for an image of `size` (width, height): (left, top) of the crop in the resized
    image, and that resized (width, height). SDXL's crop time ids are (top, left)."""
    scale = resolution / min(size)
    width, height = max(resolution, round(size[0] * scale)), max(resolution, round(size[1] * scale))
    return (width - resolution) // 2, (height - resolution) // 2, width, height


class ShuffledBatches:
    """Endless index batches `(batch_size,)` over range(n), reshuffled every epoch with `generator` (drop_last).

    Resumable: `state_dict()` holds the epoch's permutation and the position in it; the permutations
    come from `generator`, so together with its state a restored iterator continues the same order.
    A new permutation is drawn when the previous one is used up, at the same point of the
    generator's stream as a plain generator function would draw it.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} training examples.")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        """Raises ValueError: the state is for another data size or batch size."""
        if (state["n"], state["batch_size"]) != (self.n, self.batch_size):
            raise ValueError(f"the resume checkpoint's data order is for {state['n']} examples in batches of "
                             f"{state['batch_size']}, but this run has {self.n} in batches of {self.batch_size}: "
                             "resume with the same data and --batch-size.")
        self.perm, self.pos = state["perm"], state["pos"]


class MappedBatches:
    """`fn(idx)` for every index batch of a ShuffledBatches, with its resumable state (what pipelines return)."""

    def __init__(self, index: ShuffledBatches, fn):
        self.index, self.fn = index, fn

    def __iter__(self):
        return self

    def __next__(self):
        return self.fn(next(self.index))

    def state_dict(self) -> dict:
        return self.index.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.index.load_state_dict(state)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> ShuffledBatches:
    """Endless index batches over range(n), reshuffled every epoch (drop_last); see ShuffledBatches."""
    return ShuffledBatches(n, batch_size, generator)
