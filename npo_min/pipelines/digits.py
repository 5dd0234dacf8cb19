"""The digits family: the class-conditional UNet of npo_min/digits.py, pixels in [-1, 1], no VAE.

Prompts are class names "0".."9"; c' is the null class. The Self-NPO data is the vendored train split
(the held-out split never enters training), so `--data` does not apply.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checkpoint import load_state_dict
from ..data import MappedBatches, shuffled_batches
from ..digits import NULL_CLASS, NUM_CLASSES, ClassEmbedding, build_digits_model, digits_config_json, load_digits, load_digits_model
from ..schedule import NoiseSchedule
from . import Pipeline


class DigitsPipeline(Pipeline):
    class_names = [str(i) for i in range(NUM_CLASSES)]
    latent_scale = 1
    family = "digits"

    def __init__(self, unet: torch.nn.Module, class_embedding: ClassEmbedding, name: str):
        self.denoiser, self.class_embedding, self.name = unet, class_embedding, name
        self.schedule = NoiseSchedule.sd()

    def labels(self, prompts: list[str]) -> torch.Tensor:
        """Class names (digits: "0".."9") -> labels `(B,)`, the index in class_names. Raises ValueError for any other prompt."""
        bad = [p for p in prompts if p.strip() not in self.class_names]
        if bad:
            names = "0..9" if self.family == "digits" else ", ".join(self.class_names)
            raise ValueError(f"the {self.family} model takes class names {names} as prompts; got {bad[:3]}.")
        return torch.tensor([self.class_names.index(p.strip()) for p in prompts])

    @torch.no_grad()
    def encode(self, prompts):
        return self.class_embedding(self.labels(prompts))  # (B, 4, 64) class tokens

    @torch.no_grad()
    def null_cond(self, n):
        return self.class_embedding(torch.full((n,), NULL_CLASS))

    def decode(self, x0):
        return x0.clamp(-1, 1)  # pixel space

    @staticmethod
    def train_split() -> tuple[torch.Tensor, torch.Tensor]:
        """(images (N, 1, h, w) in [-1, 1], labels (N,)) of the family's train split."""
        return load_digits("train")

    def load_pixels(self, path, resolution=None):
        """An S x S greyscale PNG (as sample.py writes; S = 8 digits, 28 fashion) -> `(1, S, S)` in [-1, 1];
        ValueError for another size."""
        side = self.denoiser.cfg.sample_size
        with Image.open(path) as im:
            if im.size != (side, side):
                raise ValueError(f"{path} is {im.size[0]}x{im.size[1]}: the {self.family} model takes {side}x{side} images.")
            x = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32).copy())
        return (x / 127.5 - 1.0)[None]  # (S, S) -> (1, S, S), the inverse of images.to_pil

    def encode_pixels(self, pixels):
        return pixels.float(), torch.zeros_like(pixels, dtype=torch.float32)

    def decode_with_grad(self, x0):
        return x0

    def read_weights(self, path):
        path = Path(path)
        return load_state_dict(path / "model.safetensors" if path.is_dir() else path, prefix="unet.")

    def self_npo_batches(self, data, batch_size, generator, resolution=None):
        if data is not None:
            raise ValueError(f"--data does not apply to --model {self.family}: its Self-NPO data is its own train split.")
        images, labels = self.train_split()  # the held-out split never enters training
        with torch.no_grad():
            contexts = self.class_embedding(labels)
        return MappedBatches(shuffled_batches(len(images), batch_size, generator), lambda idx: (images[idx], contexts[idx]))


def load(weights: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32, config: str | None = None,
         tokenizer: str | None = None) -> DigitsPipeline:
    """The digits model from a folder or `model.safetensors` (keys unet.*, class_embedding.*).

    Raises:
        CheckpointError: missing file or keys that do not fit. ValueError: config / tokenizer given (they do not apply).
    """
    if config is not None or tokenizer is not None:
        raise ValueError("--config / --tokenizer do not apply to --model digits (its architecture and classes are fixed).")
    unet, embed, _ = load_digits_model(weights)
    return DigitsPipeline(unet, embed, f"digits:{weights}").to(device, dtype)


def pretraining_setup():
    """`train.py --method pretrain`: (unet, class_embedding, images, labels, null_class, config_json).

    The train split only; the models are freshly initialised from torch's global RNG (seeded by the caller).
    """
    images, labels = load_digits("train")
    unet, embed = build_digits_model()
    return unet, embed, images, labels, NULL_CLASS, digits_config_json()
