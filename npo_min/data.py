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
    """
    img = Image.open(path).convert("RGB")
    left, top, width, height = centre_crop_box(img.size, resolution)
    img = img.resize((width, height), Image.LANCZOS).crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (H, W, 3) -> (3, H, W)


def centre_crop_box(size: tuple[int, int], resolution: int) -> tuple[int, int, int, int]:
    """load_image's geometry for an image of `size` (width, height): (left, top) of the crop in the resized
    image, and that resized (width, height). SDXL's crop time ids are (top, left)."""
    scale = resolution / min(size)
    width, height = max(resolution, round(size[0] * scale)), max(resolution, round(size[1] * scale))
    return (width - resolution) // 2, (height - resolution) // 2, width, height


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches over range(n), reshuffled every epoch (drop_last)."""
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training examples.")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]
