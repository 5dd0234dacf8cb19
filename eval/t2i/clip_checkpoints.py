"""The scorers' CLIP checkpoints: transformers `CLIPModel` folders/files and OpenCLIP `.pt` files.

PickScore and the OpenAI ViT-L/14 of the aesthetic predictor ship in transformers' `CLIPModel`
layout (the one `npo_min/clip.py` mirrors); HPSv2.1's `HPS_v2.1_compressed.pt` is an OpenCLIP
checkpoint (weights under 'state_dict', fused `in_proj` attention, transposed projections), which
`npo_min.clip.open_clip_to_hf` maps onto that layout. Pickled files load only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from npo_min.checkpoint import CheckpointError, build_loaded, load_state_dict
from npo_min.clip import HF_TEXT_NAMES, CLIPTextConfig, open_clip_to_hf  # open_clip_to_hf: SDXL's bigG needs it too
from npo_min.clip_vision import HF_VISION_NAMES, VISION_PRESETS, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, get_clip_config

def to_clip_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPModel state dict in either layout -> the transformers layout of CLIPModel.

    OpenCLIP checkpoints (recognised by `visual.conv1.weight`, maybe under `module.`) go through
    open_clip_to_hf; transformers checkpoints lose the non-trainable `*.embeddings.position_ids`
    buffers older exports contain.
    """
    if any(k.removeprefix("module.") == "visual.conv1.weight" for k in sd):
        return open_clip_to_hf(sd)
    drop = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
    return {k: v for k, v in sd.items() if k not in drop}


def _read_clip_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """load_state_dict, plus transformers folders that only hold a pickled `pytorch_model.bin`."""
    path = Path(path)
    if (path.is_dir() and (path / "pytorch_model.bin").is_file()
            and not any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json"))):
        path = path / "pytorch_model.bin"
    return to_clip_keys(load_state_dict(path))


def _config_diff(raw: dict, names: dict[str, str], ours) -> list[str]:
    """Fields whose config.json value (only keys present in raw) differs from our config."""
    return [f"{theirs}: config.json {raw[theirs]!r} vs preset {getattr(ours, mine)!r}"
            for mine, theirs in names.items() if theirs in raw and raw[theirs] != getattr(ours, mine)]


def _check_clip_folder_config(folder: Path, vision: CLIPVisionConfig, text: CLIPTextConfig | None) -> None:
    """If the folder has a transformers config.json, the keys it sets must match our preset.

    Only keys present are compared: old exports omit values equal to transformers' defaults, and the
    tensor shapes are checked by the strict load anyway (heads and activation are not in the shapes).
    """
    path = folder / "config.json"
    if not path.is_file():
        return
    raw = json.loads(path.read_text())
    if "vision_config" in raw or "vision_config_dict" in raw:  # a CLIPModel config
        vision_raw = raw.get("vision_config") or raw.get("vision_config_dict") or {}
        text_raw = raw.get("text_config") or raw.get("text_config_dict") or {}
    else:  # a bare vision (CLIPVisionModelWithProjection) config
        vision_raw, text_raw = raw, {}
    diff = _config_diff(vision_raw, HF_VISION_NAMES, vision)
    if text is not None:
        diff += _config_diff(text_raw, HF_TEXT_NAMES, text)
    if "projection_dim" in raw and raw["projection_dim"] != vision.projection_dim:
        diff.append(f"projection_dim: config.json {raw['projection_dim']!r} vs preset {vision.projection_dim!r}")
    if diff:
        raise CheckpointError(f"{path} does not match the chosen preset ({', '.join(diff)}): pick the matching preset.")


def load_clip(
    path: str | os.PathLike, preset: str | CLIPConfig = "vit_h_14", dtype: torch.dtype = torch.float32
) -> CLIPModel:
    """Build a CLIPModel and strictly load its weights, in eval mode with gradients off.

    Args:
        path: a transformers CLIPModel folder (model.safetensors, maybe sharded, or pytorch_model.bin;
            its config.json, if any, is checked against the preset), a `.safetensors` file, or an
            OpenCLIP checkpoint (`.pt` / `.pth` / `.bin`, maybe under 'state_dict' and `module.`,
            e.g. HPS_v2.1_compressed.pt), mapped with open_clip_to_hf.
        preset: a name from CLIP_PRESETS ("vit_h_14": PickScore / HPSv2.1, "vit_l_14": OpenAI ViT-L/14)
            or a CLIPConfig.
        dtype: parameter dtype.

    Raises:
        CheckpointError: missing path, missing / unexpected keys, wrong shapes, or a config.json that
            does not match the preset.
        ValueError: unknown preset.
    """
    cfg = get_clip_config(preset)
    if Path(path).is_dir():
        _check_clip_folder_config(Path(path), cfg.vision, cfg.text)
    sd = _read_clip_checkpoint(path)
    what = f"CLIPModel ({preset if isinstance(preset, str) else 'custom config'})"
    return build_loaded(CLIPModel, cfg, sd, dtype, what).requires_grad_(False)


def load_clip_vision(
    path: str | os.PathLike, preset: str | CLIPVisionConfig | CLIPConfig = "vit_l_14",
    dtype: torch.dtype = torch.float32,
) -> CLIPVisionModel:
    """The image tower with its projection, from a full CLIPModel checkpoint (any layout load_clip
    reads) or a CLIPVisionModelWithProjection one; text-tower keys are ignored.

    preset: a name from VISION_PRESETS (= the CLIP_PRESETS names), a CLIPVisionConfig, or a CLIPConfig
    (its vision half). Raises: as load_clip.
    """
    if isinstance(preset, CLIPConfig):
        cfg = preset.vision
    elif isinstance(preset, CLIPVisionConfig):
        cfg = preset
    elif preset in VISION_PRESETS:
        cfg = VISION_PRESETS[preset]
    else:
        raise ValueError(f"unknown CLIP vision preset {preset!r}: choose one of {sorted(VISION_PRESETS)}.")
    if Path(path).is_dir():
        _check_clip_folder_config(Path(path), cfg, None)
    sd = _read_clip_checkpoint(path)
    sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    what = f"CLIPVisionModel ({preset if isinstance(preset, str) else 'custom config'})"
    return build_loaded(CLIPVisionModel, cfg, sd, dtype, what).requires_grad_(False)
