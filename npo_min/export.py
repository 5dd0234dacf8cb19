"""Export any offset (our delta, a LoRA, a fine-tuned model minus its base) as a LoRA file others load.

    python -m npo_min.export out/self-npo/delta.safetensors --rank 8 --out npo_lora.safetensors
    python -m npo_min.export out/dpo-npo --rank 8 --format kohya --out npo_kohya.safetensors   # ComfyUI / A1111
    python -m npo_min.export DELTA --model sd15 --weights v1-5-pruned-emaonly.safetensors --rank 64 --out F

Every matrix-shaped offset (Linear `(out, in)`, conv `(out, in, kh, kw)` as `(out, in * kh * kw)`) is replaced
by its best rank-r approximation, the truncated SVD M ~ U_r S_r V_r^T (Eckart-Young), split evenly:
up (B) = U_r sqrt(S_r) `(out, r)`, down (A) = sqrt(S_r) V_r^T `(r, in)` (conv: `(r, in, kh, kw)` and
`(out, r, 1, 1)`). Layers whose smaller side is below r get zero-padded factors, so every layer has rank r
and scale alpha / r = 1 (alpha = r is written). Offsets of vectors (biases, norms) have no LoRA form and
are dropped. Printed: the relative Frobenius error ||M - M_r|| / ||M|| per layer and overall (over every
tensor of the offset, the dropped ones included).

Names: "peft" = diffusers / PEFT (`<prefix>.<layer>.lora_A.weight`, `.lora_B.weight`, with the
`lora_adapter_metadata` header diffusers' `load_lora_weights` reads; prefix = the denoiser's component in the
diffusers pipeline, `Pipeline.lora_prefix`: `unet` for the UNet families, `transformer` for CogVideoX); "kohya" = kohya-ss
(`lora_unet_<layer with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`), what ComfyUI and A1111 load.
Layer names are the denoiser's diffusers module names (the project's own), except kohya SDXL: the LDM
(original) module paths kohya-ss uses for SDXL (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .checkpoint import fingerprint, save_safetensors
from .offsets import LORA_FORMAT, Offset


def low_rank(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of a weight offset: (up `(out, rank)`, down `(rank, in * kh * kw)`, relative error).

    m: `(out, in)` or `(out, in, kh, kw)` (flattened to `(out, in * kh * kw)`). Factors are float32,
    zero-padded to `rank` where the matrix is smaller; up @ down is the best rank-`rank` approximation.
    """
    mat = m.double().flatten(1)  # (out, in, kh, kw) -> (out, in * kh * kw)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = torch.zeros(mat.shape[0], rank, dtype=torch.float64)
    down = torch.zeros(rank, mat.shape[1], dtype=torch.float64)
    up[:, :r], down[:r] = u[:, :r] * root, root[:, None] * vh[:r]
    norm = mat.norm().item()
    err = (mat - up @ down).norm().item() / norm if norm > 0 else 0.0
    return up.float(), down.float(), err


def to_lora(offset: Offset, rank: int, fmt: str = "peft", names: dict[str, str] | None = None,
            prefix: str = "unet") -> tuple[dict[str, torch.Tensor], dict]:
    """An offset over a denoiser's state-dict keys -> (LoRA tensors in `fmt` names, report).

    names: for "kohya", the module path written for a layer (default: the layer's own, diffusers, name);
    kohya_names gives the LDM paths kohya-ss uses for SDXL. prefix: the PEFT names' component ("unet",
    "transformer").

    report: {"layers": {layer: relative error}, "dropped": [keys without a LoRA form], "overall": relative
    error over the whole offset, "rank": rank}. Zero tensors are skipped (a LoRA-shaped offset touches few
    layers). Raises ValueError: rank < 1, unknown fmt, or no matrix-shaped offset to export.
    """
    if rank < 1:
        raise ValueError(f"--rank must be >= 1; got {rank}.")
    if fmt not in ("peft", "kohya"):
        raise ValueError(f"--format must be peft or kohya; got {fmt!r}.")
    tensors, layers, dropped = {}, {}, []
    total = residual = 0.0
    for key in sorted(offset):
        v = offset[key].float()
        sq = v.double().pow(2).sum().item()
        total += sq
        if sq == 0:
            continue
        if not key.endswith(".weight") or v.ndim not in (2, 4):
            dropped.append(key)
            residual += sq
            continue
        layer = key[: -len(".weight")]
        up, down, err = low_rank(v, rank)
        layers[layer] = err
        residual += (err ** 2) * sq
        if v.ndim == 4:  # conv: down keeps the kernel, up is 1x1
            down, up = down.reshape(rank, *v.shape[1:]), up.reshape(v.shape[0], rank, 1, 1)  # (r, in, kh, kw), (out, r, 1, 1)
        if fmt == "peft":
            tensors[f"{prefix}.{layer}.lora_A.weight"], tensors[f"{prefix}.{layer}.lora_B.weight"] = down, up
        else:
            name = "lora_unet_" + (names or {}).get(layer, layer).replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    if not layers:
        raise ValueError("the offset has no matrix-shaped (Linear / conv) weight offsets to export as a LoRA.")
    overall = (residual / total) ** 0.5 if total > 0 else 0.0
    return tensors, {"layers": layers, "dropped": dropped, "overall": overall, "rank": rank}


def kohya_names(base: Offset) -> dict[str, str] | None:
    """The module paths kohya-ss names a LoRA of this denoiser by: SDXL's UNet (it has the `text_time` added
    embedding) in the LDM layout, as kohya's sd-scripts, ComfyUI and A1111 write and read SDXL LoRAs
    (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`); None for the rest, whose kohya LoRAs use the
    diffusers paths (SD1.5's `down_blocks.0.attentions.0...`)."""
    if "add_embedding.linear_1.weight" not in base:
        return None
    from .unet_ldm import ldm_layer_names
    return ldm_layer_names(base)


def lora_header(layers: list[str], rank: int, prefix: str = "unet") -> dict[str, str]:
    """The `lora_adapter_metadata` diffusers reads (r = lora_alpha = rank: scale 1), keys prefixed `<prefix>.`."""
    config = {"r": rank, "lora_alpha": rank, "target_modules": sorted(layers), "lora_dropout": 0.0, "bias": "none",
              "use_dora": False, "use_rslora": False, "init_lora_weights": True}
    return {"lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True)}


def export(offset: Offset, base: Offset, path: str | os.PathLike, rank: int, fmt: str = "peft", metadata: dict | None = None,
           overwrite: bool = False, prefix: str = "unet") -> dict:
    """Write `offset` as a rank-`rank` LoRA to `path` (atomically, refusing to overwrite); returns the report.
    The header carries the base's fingerprint (checked by npo_min.offsets.load_offset). prefix: the PEFT names'
    component (the family's `Pipeline.lora_prefix`: "unet", CogVideoX "transformer")."""
    tensors, report = to_lora(offset, rank, fmt, kohya_names(base) if fmt == "kohya" else None, prefix)
    meta = {"format": LORA_FORMAT, "base_fingerprint": fingerprint(base), "export_rank": rank,
            "export_overall_relative_error": f"{report['overall']:.6g}", **(metadata or {})}
    if fmt == "peft":
        meta |= lora_header(list(report["layers"]), rank, prefix)
    save_safetensors(tensors, path, meta, overwrite=overwrite)
    return report


def format_report(report: dict, limit: int = 40) -> str:
    items = sorted(report["layers"].items(), key=lambda kv: -kv[1])
    lines = [f"{'relative error':>15}  layer (rank {report['rank']}; worst first)"]
    lines += [f"{err:>15.3e}  {layer}" for layer, err in items[:limit]]
    if len(items) > limit:
        lines.append(f"{'':>15}  ... {len(items) - limit} more layers, at most {items[limit][1]:.3e}")
    if report["dropped"]:
        lines.append(f"dropped (no LoRA form: biases / norms): {len(report['dropped'])} tensors, e.g. {report['dropped'][:3]}")
    lines.append(f"overall relative error ||delta - LoRA|| / ||delta||: {report['overall']:.4e} over {len(items)} layers")
    return "\n".join(lines)


def main(argv=None):
    from . import cli
    from .offsets import load_offset
    from .pipelines import MODELS, default_weights, load_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("offset", help="our delta.safetensors / LoRA / train.py --out folder, any LoRA, or a fine-tuned model")
    p.add_argument("--out", required=True, help="the LoRA .safetensors to write")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: 8)")
    p.add_argument("--format", default="peft", choices=["peft", "kohya"], help="peft: diffusers / PEFT names; kohya: ComfyUI / A1111")
    p.add_argument("--model", default="digits", choices=sorted(MODELS), help="model family of the base (default: digits)")
    p.add_argument("--weights", default=None, help="the base checkpoint the offset belongs to (default: the family's)")
    p.add_argument("--config", default=None, help="architecture preset of the family")
    p.add_argument("--ignore-fingerprint", action="store_true", help="accept a delta made for another base")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    cli.check_out([args.out], args.overwrite, "npo_min.export")
    weights = args.weights or default_weights(args.model)
    pipe = load_pipeline(args.model, weights, config=args.config)
    base = pipe.denoiser.state_dict()
    offset = load_offset(args.offset, base, pipe.read_weights, check_fingerprint=not args.ignore_fingerprint)
    report = export(offset, base, args.out, args.rank, args.format, {"source": str(args.offset), "base": pipe.name},
                    overwrite=args.overwrite, prefix=pipe.lora_prefix)
    print(format_report(report))
    print(f"wrote {args.out} ({args.format} names, rank {args.rank})")


if __name__ == "__main__":
    from .cli import run

    run(main)
