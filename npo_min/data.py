"""Training data: a folder of images with same-name `.txt` captions (the Self-NPO data of the text-to-image
families; the authors used LAION images with their captions), and the shuffled batch order every loop uses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


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
