"""The UCI optdigits data: 1797 real handwritten digits, 8x8, 10 classes (CC BY 4.0).

Vendored as `npo_min/datasets/optdigits.csv.gz` (see `npo_min/datasets/ATTRIBUTION.md`): each row is 64
pixel counts in 0..16 followed by the label. The split is fixed (seeded permutation, 20% held
out) and the held-out part never enters any training: not the diffusion model, not Self-NPO,
not the reward classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from .checkpoint import CheckpointError, load_into, load_state_dict, read_metadata
from .unet import PRESETS, UNet2DConditionModel, UNetConfig

DATA_FILE = Path(__file__).parent / "datasets" / "optdigits.csv.gz"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the "unconditional" label, index 10 of the class-embedding table
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(images, labels)` for split "train", "test" or "all".

    images: float32 `(N, 1, 8, 8)`, pixels in [-1, 1] (count 0..16 mapped linearly);
    labels: int64 `(N,)` in 0..9. Train has 1438 images, test 359.

    Raises:
        ValueError: unknown split name.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}: use 'train', 'test' or 'all'.")
    rows = np.loadtxt(DATA_FILE, delimiter=",", dtype=np.int64)  # (1797, 65)
    pixels, labels = rows[:, :64], rows[:, 64]
    images = pixels.reshape(-1, 1, 8, 8).astype(np.float32) / 8.0 - 1.0  # (N, 64) -> (N, 1, 8, 8)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    n_test = int(round(TEST_FRACTION * len(rows)))
    idx = {"test": order[:n_test], "train": order[n_test:], "all": np.arange(len(rows))}[split]
    return torch.from_numpy(images[idx]), torch.from_numpy(labels[idx])


# ---- the digits diffusion model: the SD1.5 UNet code at the "digits" preset + a class table ----

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "digits"


class ClassEmbedding(nn.Module):
    """The digits model's "text encoder": label (B,) in 0..10 -> context (B, tokens, dim).

    A learned table with one row per class plus the null class 10 (trained with 10% label
    dropout so CFG has an unconditional branch); the UNet reads it through cross-attention.
    """

    def __init__(self, tokens: int = 4, dim: int = 64):
        super().__init__()
        self.tokens = tokens
        self.embedding = nn.Embedding(NUM_CLASSES + 1, tokens * dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.min() < 0 or labels.max() > NULL_CLASS:
            raise ValueError(f"digit labels must be in 0..{NULL_CLASS} ({NULL_CLASS} = null); got {labels.tolist()}.")
        return rearrange(self.embedding(labels), "b (l d) -> b l d", l=self.tokens)  # (B, L*D) -> (B, L, D)


def build_digits_model(cfg: UNetConfig = PRESETS["digits"]) -> tuple[UNet2DConditionModel, ClassEmbedding]:
    return UNet2DConditionModel(cfg), ClassEmbedding(tokens=4, dim=cfg.cross_attention_dim)


def load_digits_model(path: str | Path = DEFAULT_WEIGHTS, preset: str = "digits") -> tuple[UNet2DConditionModel, ClassEmbedding, dict]:
    """Load `model.safetensors` (keys `unet.*`, `class_embedding.*`) from a folder or file.

    preset: the UNet preset ("digits"; "fashion" for the Fashion-MNIST model, same layout).
    Returns (unet, class_embedding, metadata), both modules in eval mode, float32.

    Raises:
        CheckpointError: missing file, or keys/shapes that do not fit the preset's architecture.
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(
            f"{preset} model not found at {file}: use the shipped weights/{preset}, or make one with "
            f"`python train.py --model {preset} --method pretrain --out DIR`."
        )
    unet, embed = build_digits_model(PRESETS[preset])
    load_into(unet, load_state_dict(file, prefix="unet."), f"the {preset} UNet")
    load_into(embed, load_state_dict(file, prefix="class_embedding."), f"the {preset} class embedding")
    return unet.eval(), embed.eval(), read_metadata(file)


def digits_config_json(cfg: UNetConfig = PRESETS["digits"]) -> str:
    return json.dumps({"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
                       "class_embedding": {"tokens": 4, "dim": cfg.cross_attention_dim, "null_class": NULL_CLASS},
                       "schedule": "scaled_linear 0.00085-0.012, T=1000", "prediction_type": "epsilon"}, indent=2)


@torch.no_grad()
def sample_digits(
    pos_unet, neg_unet, embed: ClassEmbedding, labels: torch.Tensor, noise: torch.Tensor,
    guidance_scale: float, steps: int = 25, solver: str = "ddim", spacing: str = "trailing", batch_size: int = 500,
    neg_embed: ClassEmbedding | None = None,
) -> torch.Tensor:
    """Class-conditional samples with CFG, negative branch = `neg_unet` at the null class.

    labels: (B,) in 0..9; noise: (B, 1, S, S) standard normal, S = 8 digits / 28 fashion (fix it to
    compare methods seed for seed). neg_embed: autoguidance (Karras et al. 2024, Eq. 2): the negative
    branch is `neg_unet` (a weaker model) at the *same* class, through its own class table `neg_embed`,
    instead of the null class. Returns (B, 1, S, S) pixels clamped to [-1, 1].
    """
    from .guidance import guided_denoiser
    from .schedule import NoiseSchedule
    from .solvers import sample

    null = embed(torch.tensor([NULL_CLASS]))
    out = []
    for i in range(0, len(labels), batch_size):
        neg_cond = null if neg_embed is None else neg_embed(labels[i : i + batch_size])
        denoise = guided_denoiser(pos_unet, neg_unet, embed(labels[i : i + batch_size]), neg_cond, guidance_scale)
        out.append(sample(denoise, noise[i : i + batch_size], steps, NoiseSchedule.sd(), solver, spacing))
    return torch.cat(out).clamp(-1, 1)


def to_uint8_grid(images: torch.Tensor, nrow: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """(B, 1, 8, 8) in [-1, 1] -> uint8 (H, W) grid, nrow images per row, nearest upscaling."""
    b = images.shape[0]
    ncol = (b + nrow - 1) // nrow
    pix = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 8, 8)
    pix = pix.repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # (B, 8s, 8s)
    side = pix.shape[-1] + pad
    grid = torch.full((ncol * side + pad, nrow * side + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * side : (r + 1) * side, pad + c * side : (c + 1) * side] = pix[i]
    return grid.numpy()
