"""The NPO offset file: `delta.safetensors` = trained UNet minus base UNet, with provenance.

Keys are the UNet's own (diffusers layout); metadata records the base model and its fingerprint
so a delta is never applied to the wrong base by accident, and the recipe that made it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError, fingerprint, load_state_dict, read_metadata, save_safetensors

FORMAT = "npo_min.delta.v1"


def save_delta(
    trained: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict,
    overwrite: bool = False,
) -> Path:
    """Write delta = trained - base (float32) with metadata {format, base_fingerprint, ...}."""
    if set(trained) != set(base):
        raise ValueError("trained and base UNets have different keys: not the same architecture.")
    delta = {k: trained[k].float() - base[k].float() for k in base}
    meta = {"format": FORMAT, "base_fingerprint": fingerprint(base), **metadata}
    return save_safetensors(delta, path, meta, overwrite=overwrite)


def load_delta(path: str | os.PathLike, base: dict[str, torch.Tensor], check_fingerprint: bool = True) -> tuple[dict, dict]:
    """Read a delta for `base` (the base UNet state dict); returns (delta, metadata).

    Raises:
        CheckpointError: the file is missing, has keys/shapes the base lacks, or was made for
            another base model (fingerprint mismatch; pass check_fingerprint=False to override).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"delta not found: {path}. Make one with `python train.py --out DIR`.")
    delta = load_state_dict(path)
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    unknown = sorted(set(delta) - set(base))
    wrong = sorted(k for k in set(delta) & set(base) if delta[k].shape != base[k].shape)
    if unknown or wrong:
        examples = (unknown + wrong)[:5]
        raise CheckpointError(
            f"{path} does not fit this base model: {len(unknown)} unknown keys, {len(wrong)} shape mismatches "
            f"(e.g. {examples}). Was it made for another --model / base checkpoint?"
        )
    want = meta.get("base_fingerprint")
    if check_fingerprint and want is not None:
        have = fingerprint(base)
        if want != have:
            raise CheckpointError(
                f"{path} was made for base model {meta.get('base', '?')} with fingerprint {want}, but the "
                f"loaded base has fingerprint {have}. Load the base it was trained from (or pass "
                "--ignore-fingerprint if you know the bases are equivalent)."
            )
    return delta, meta
