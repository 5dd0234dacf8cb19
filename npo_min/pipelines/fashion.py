"""The fashion family: the digits pipeline (class-conditional UNet in pixel space, c' = the null class) at the
UNet preset "fashion", 28x28 Fashion-MNIST images. Prompts are the class names (npo_min.fashion.CLASS_NAMES,
e.g. "Sneaker"); the Self-NPO data is the 60,000-image train split (the test split never enters training).
"""

from __future__ import annotations

import os

import torch

from ..fashion import CLASS_NAMES, build_fashion_model, fashion_config_json, load_fashion, load_fashion_model
from ..digits import NULL_CLASS
from .digits import DigitsPipeline


class FashionPipeline(DigitsPipeline):
    class_names = CLASS_NAMES
    family = "fashion"

    @staticmethod
    def train_split():
        return load_fashion("train")


def load(weights: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32, config: str | None = None,
         tokenizer: str | None = None) -> FashionPipeline:
    """The fashion model from a folder or `model.safetensors` (keys unet.*, class_embedding.*).

    Raises:
        CheckpointError: missing file or keys that do not fit. ValueError: config / tokenizer given (they do not apply).
    """
    if config is not None or tokenizer is not None:
        raise ValueError("--config / --tokenizer do not apply to --model fashion (its architecture and classes are fixed).")
    unet, embed, _ = load_fashion_model(weights)
    return FashionPipeline(unet, embed, f"fashion:{weights}").to(device, dtype)


def pretraining_setup():
    """`train.py --model fashion --method pretrain`: (unet, class_embedding, images, labels, null_class, config_json).

    The 60,000-image train split only; the models are freshly initialised from torch's global RNG (seeded by the caller).
    """
    images, labels = load_fashion("train")
    unet, embed = build_fashion_model()
    return unet, embed, images, labels, NULL_CLASS, fashion_config_json()
