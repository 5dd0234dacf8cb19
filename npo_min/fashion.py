"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, MIT licence): 70,000 grey 28x28 images of 10 clothing classes.

Not vendored (30 MB): the Debian package `dataset-fashion-mnist` installs the four original IDX files
under /usr/share/datasets/fashion-mnist/ (`apt-get install -y dataset-fashion-mnist`); set
NPO_FASHION_DIR to read them from another folder. The split is the dataset's own: "train" = the
60,000 training images, "test" = the 10,000 test images, held out: no training ever sees them (not
the diffusion model, not Self-NPO, not the judging classifier); they are only the Frechet reference.

The model is the digits model's code (npo_min/digits.py: the SD UNet + a class-token table) at the
UNet preset "fashion", so the digits pipeline, sampler and benchmark apply unchanged.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .digits import ClassEmbedding, build_digits_model, digits_config_json, load_digits_model
from .unet import PRESETS, UNet2DConditionModel

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SIZES = {"train": 60000, "test": 10000}
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "fashion"
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (LeCun's MNIST format; `.gz` read transparently) -> numpy array of its shape and dtype.

    Layout: 2 zero bytes, a dtype byte (0x08 = uint8, ...), a rank byte, rank big-endian uint32 sizes, data.

    Raises:
        FileNotFoundError: no file. ValueError: not an IDX file, or its size disagrees with its header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4].hex()}): expected e.g. train-images-idx3-ubyte.")
    dtype, rank = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=rank, offset=4))
    body = raw[4 + 4 * rank:]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: header says shape {shape} ({int(np.prod(shape)) * dtype.itemsize} bytes), "
                         f"the file holds {len(body)}: truncated or corrupt, reinstall dataset-fashion-mnist.")
    return np.frombuffer(body, dtype).reshape(shape)


def data_dir() -> Path:
    return Path(os.environ.get("NPO_FASHION_DIR", DEFAULT_DIR))


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {folder}: install it with "
                            "`apt-get install -y dataset-fashion-mnist`, or set NPO_FASHION_DIR to a folder holding the IDX files.")


def load_fashion(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(images, labels)` of split "train" (60,000) or "test" (10,000, held out).

    images: float32 `(N, 1, 28, 28)`, pixels in [-1, 1] (0..255 mapped linearly, 0 = black background);
    labels: int64 `(N,)` in 0..9 (CLASS_NAMES).

    Raises:
        ValueError: unknown split, or files whose shapes are not Fashion-MNIST's.
        FileNotFoundError: the dataset is not installed (the message gives the command).
    """
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'.")
    folder = data_dir()
    images = read_idx(_find(folder, FILES[split][0]))
    labels = read_idx(_find(folder, FILES[split][1]))
    if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1] or images.dtype != np.uint8:
        raise ValueError(f"{folder}: {split} images {images.shape} / labels {labels.shape} are not Fashion-MNIST's "
                         "(N, 28, 28) uint8 / (N,).")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{folder}: {split} labels go up to {labels.max()}, Fashion-MNIST has 10 classes (0..9).")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]  # (N, 28, 28) -> (N, 1, 28, 28)
    return x, torch.from_numpy(labels.astype(np.int64))


def build_fashion_model() -> tuple[UNet2DConditionModel, ClassEmbedding]:
    """A fresh (randomly initialised from torch's global RNG) fashion UNet and class table."""
    return build_digits_model(PRESETS["fashion"])


def load_fashion_model(path: str | Path = DEFAULT_WEIGHTS) -> tuple[UNet2DConditionModel, ClassEmbedding, dict]:
    """Load a fashion `model.safetensors` (keys `unet.*`, `class_embedding.*`) from a folder or file.

    Returns (unet, class_embedding, metadata) in eval mode. Raises CheckpointError: missing file / keys that do not fit.
    """
    return load_digits_model(path, preset="fashion")


def fashion_config_json() -> str:
    return digits_config_json(PRESETS["fashion"])
