"""Weight offsets: the eta and delta of theta_neg = theta + alpha * eta + beta * delta (Diffusion-NPO Eq. 10).

Whatever file it comes from, an offset becomes a dict over the denoiser's own state-dict keys
(float32, the base's shapes), checked by one function, `check_offset`. `load_offset` reads, for every
model family alike (so `--neg-ckpt` and `--pos-ckpt` accept the same things everywhere):

  - our `delta.safetensors` (or its folder): trained - base, with FORMAT and the base model's
    fingerprint in the metadata; the fingerprint must match the loaded base;
  - a LoRA `.safetensors` / `.bin` (or a folder holding `pytorch_lora_weights.safetensors`, or PEFT's
    `adapter_model.safetensors` + `adapter_config.json`) in PEFT, diffusers, attention-processor or
    kohya-ss names (`lora_unet_` + the diffusers module path, as its SD1.5 LoRAs, or + the LDM module path,
    as its SDXL ones: the UNet's key map, unet_ldm.ldm_layer_names); delta[layer.weight] = (alpha / r) B @ A,
    alpha per layer from PEFT's alpha_pattern. Text-encoder LoRA keys (`lora_te*`, `text_encoder*`) are refused.
    The authors' released `sd15_beta500_2kiter.safetensors` is in diffusers names, without alpha; the
    LoRAs train.py writes (npo_min/lora.py) carry the base's fingerprint, checked like a delta's;
  - a full fine-tuned denoiser in the family's own layout (e.g. a Diffusion-DPO UNet for --pos-ckpt):
    weights - base. The family passes its reader `read_weights(path) -> state dict` (its key map),
    so this module imports no model family (kohya-ss's LDM names use the SD UNet's key map, unet_ldm.ldm_layer_names).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError, checkpoint_keys, fingerprint, load_state_dict, read_metadata, save_safetensors

FORMAT = "npo_min.delta.v1"  # metadata["format"] of the delta files this project writes
LORA_FORMAT = "npo_min.lora.v1"  # ... and of its LoRA files (npo_min/lora.py), also checked by fingerprint
Offset = dict[str, torch.Tensor]


def check_offset(offset: Offset, base: Offset, source: str = "offset") -> None:
    """The one key / shape check: every key of `offset` names a tensor of `base` with the same shape.

    Raises:
        CheckpointError: unknown keys or shape mismatches, counted and named (the first five).
    """
    unknown = sorted(set(offset) - set(base))
    wrong = sorted(k for k in set(offset) & set(base) if tuple(offset[k].shape) != tuple(base[k].shape))
    if unknown or wrong:
        problems = []
        if unknown:
            problems.append(f"{source} has {len(unknown)} keys the base model lacks, e.g. {unknown[:3]}")
        if wrong:
            k = wrong[0]
            problems.append(f"{len(wrong)} shape mismatches, e.g. {source}[{k}] has shape {tuple(offset[k].shape)} "
                            f"but the base has {tuple(base[k].shape)}")
        raise CheckpointError(f"{source} does not fit this base model: {'; '.join(problems)}: not the same architecture. "
                              "Was it made for another --model / base checkpoint?")


def difference(weights: Offset, base: Offset, source: str = "weights") -> Offset:
    """The offset `weights - base` (float32) of a full model of the same architecture (eta or delta).

    Raises:
        CheckpointError: the key sets differ ("not the same architecture") or a shape differs.
    """
    if set(weights) != set(base):
        diff = sorted(set(weights) ^ set(base))
        raise CheckpointError(f"{source} and the base model have different keys ({len(diff)} differ, e.g. {diff[:3]}): "
                              "not the same architecture.")
    check_offset(weights, base, source)
    return {k: weights[k].float() - base[k].float() for k in base}


# ----------------------------------------------------------------------------- our delta file


def save_delta(trained: Offset, base: Offset, path: str | os.PathLike, metadata: dict, overwrite: bool = False) -> Path:
    """Write delta = trained - base (float32) with metadata {format, base_fingerprint, **metadata}, atomically."""
    delta = difference(trained, base, "the trained model")
    meta = {"format": FORMAT, "base_fingerprint": fingerprint(base), **metadata}
    return save_safetensors(delta, path, meta, overwrite=overwrite)


def read_delta(path: str | os.PathLike, base: Offset, check_fingerprint: bool = True) -> tuple[Offset, dict]:
    """Our delta for `base` (the base denoiser's state dict); returns (delta, metadata).

    Raises:
        CheckpointError: missing file, keys / shapes the base lacks, or a delta made for another base
            (fingerprint mismatch; check_fingerprint=False, the CLIs' --ignore-fingerprint, overrides).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"delta not found: {path}. Make one with `python train.py --out DIR`.")
    delta = load_state_dict(path)
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    check_offset(delta, base, str(path))
    if check_fingerprint:
        _check_fingerprint(meta, base, path)
    return {k: v.float() for k, v in delta.items()}, meta


def _check_fingerprint(meta: dict, base: Offset, path) -> None:
    """Refuse an offset whose metadata names another base (CheckpointError); no fingerprint = nothing to check."""
    want = meta.get("base_fingerprint")
    if want is not None:
        have = fingerprint(base)
        if want != have:
            raise CheckpointError(
                f"{path} was made for base model {meta.get('base', '?')} with fingerprint {want}, but the loaded base "
                f"has fingerprint {have}. Load the base it was trained from (or pass --ignore-fingerprint if you know "
                "the bases are equivalent).")


# ----------------------------------------------------------------------------- LoRA

# LoRA key forms, matched after removing a leading `unet.` / `base_model.model.`; group 1 = the layer.
LORA_FORMS = [
    (r"(.+)\.lora_A\.weight", "down"), (r"(.+)\.lora_B\.weight", "up"),  # PEFT (get_peft_model_state_dict)
    (r"(.+)\.lora(?:_linear_layer)?\.down\.weight", "down"),  # diffusers (convert_state_dict_to_diffusers):
    (r"(.+)\.lora(?:_linear_layer)?\.up\.weight", "up"),  # the authors' sd15_beta500_2kiter.safetensors
    (r"lora_unet_(\w+)\.lora_down\.weight", "down"), (r"lora_unet_(\w+)\.lora_up\.weight", "up"),  # kohya-ss
    (r"(?:lora_unet_)?(.+)\.alpha", "alpha"),  # kohya-ss / some PEFT exports
]


def lora_config(meta: dict) -> dict:
    """The scale fields of a LoRA's PEFT config as lora_to_delta's arguments {alpha, alpha_pattern, rank_pattern} (None if absent).

    `meta` is a safetensors header (its `lora_adapter_metadata`, JSON, keys maybe prefixed `unet.` as diffusers'
    `save_lora_weights` writes them) or a PEFT `adapter_config.json` dict.
    Raises CheckpointError: DoRA / rsLoRA (their scale is not alpha / r).
    """
    raw = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else dict(meta)
    raw = {k.removeprefix("unet.").removeprefix("transformer."): v for k, v in raw.items()}
    if raw.get("use_dora") or raw.get("use_rslora"):
        raise CheckpointError("DoRA / rsLoRA adapters are not supported: fuse them into a full model first.")
    return {"alpha": raw.get("lora_alpha"), "alpha_pattern": raw.get("alpha_pattern"), "rank_pattern": raw.get("rank_pattern")}


def _pattern_value(pattern: dict, layer: str):
    """PEFT's get_pattern_key rule: a pattern key matches a layer name equal to it or ending in "." + it (regex)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key.removeprefix('unet.')})$", layer):
            return value
    return None


def lora_factors(lora: Offset, base: Offset, alpha: float | None = None, alpha_pattern: dict | None = None,
                 rank_pattern: dict | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA -> per-layer factors `{layer: (up (out, r), down (r, in * kh * kw))}` (float32), the scale folded
    into up: the layer's weight offset is `(up @ down).reshape(weight.shape)` (lora_to_delta).

    down (A): `(r, in)` or conv `(r, in, kh, kw)`; up (B): `(out, r)` or `(out, r, 1, 1)`. scale = alpha / r,
    r = the layer's rank, with alpha: a stored `.alpha` tensor, else the layer's entry in `alpha_pattern`
    (PEFT's per-layer alphas, pattern keys matched as PEFT does), else the `alpha` argument (lora_alpha from
    the file's metadata), else none: scale 1 (the diffusers/PEFT convention lora_alpha = r, which the authors'
    NPO LoRA uses). `rank_pattern` (PEFT's per-layer ranks) is checked against the tensors' ranks. Keys name
    layers in any LORA_FORMS.

    Raises CheckpointError: a key names no layer of `base`, text-encoder keys (not applied), a DoRA LoRA, a layer with only
    one of down / up, a rank that contradicts rank_pattern, or a product whose size differs from the layer's weight.
    """
    layers = {k[: -len(".weight")] for k in base if k.endswith(".weight")}
    underscored = {name.replace(".", "_"): name for name in layers}  # kohya-ss writes module paths with `_`
    if any(k.startswith("lora_unet_") for k in lora):
        # kohya-ss names from the LDM (original) layout, as its SDXL LoRAs: input_blocks_4_1_... -> down_blocks.1.attentions.0...
        from .unet_ldm import ldm_layer_names  # the SD-style UNet's key map ({} for other denoisers)
        underscored |= {ldm.replace(".", "_"): name for name, ldm in ldm_layer_names(layers).items()}
    text = [k for k in lora if k.startswith(("text_encoder", "lora_te"))]
    if text:
        raise CheckpointError(f"{len(text)} of {len(lora)} LoRA keys are for a text encoder (e.g. {text[0]}): text-encoder "
                              "LoRAs are not applied, only the denoiser's; save the UNet keys (lora_unet_* / unet.*) alone to use those.")
    lycoris = [k for k in lora if re.search(r"\.(hada_|lokr_|lora_mid\.)", k)]
    if lycoris:
        raise CheckpointError(f"{lycoris[0]}: a LyCORIS adapter (LoHa / LoKr / LoCon with a Tucker mid), which is not a "
                              "plain LoRA (up @ down): merge it into the model with its own tools and pass the full model.")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in lora.items():
        if "dora_scale" in key or "magnitude_vector" in key:
            raise CheckpointError(f"{key}: DoRA LoRAs are not supported (their scale is not alpha / r): fuse it into a full model first.")
        k = re.sub(r"^(unet\.|transformer\.|base_model\.model\.)", "", key)
        # old diffusers attention processors: attn1.processor.to_q_lora.down -> attn1.to_q.lora.down
        k = re.sub(r"\.processor\.(to_[qkv]|to_out)_lora\.", lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora.", k)
        match = next(((m[1], part) for pattern, part in LORA_FORMS if (m := re.fullmatch(pattern, k))), None)
        layer = match and (match[0] if match[0] in layers else underscored.get(match[0]))
        if not layer:
            unknown.append(key)
            continue
        parts.setdefault(layer, {})[match[1]] = value
    if unknown or not parts:
        raise CheckpointError(f"{len(unknown)} of {len(lora)} LoRA keys name no layer of this model, e.g. {unknown[:3]}: "
                              "a LoRA for another model, or an unsupported naming?")
    factors = {}
    for layer, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise CheckpointError(f"LoRA layer {layer} has {sorted(p)}, but needs both down (A) and up (B).")
        down, up, weight = p["down"].float(), p["up"].float(), base[layer + ".weight"]
        declared = _pattern_value(rank_pattern, layer)
        if declared is not None and int(declared) != down.shape[0]:
            raise CheckpointError(f"LoRA layer {layer}: rank_pattern says rank {declared} but its down (A) has rank {down.shape[0]}.")
        layer_alpha = _pattern_value(alpha_pattern, layer)
        a = p["alpha"].item() if "alpha" in p else (layer_alpha if layer_alpha is not None else alpha)
        scale = 1.0 if a is None else a / down.shape[0]
        up, down = scale * up.flatten(1), down.flatten(1)  # (out, r), (r, in * kh * kw)
        if up.shape[1] != down.shape[0] or up.shape[0] != weight.shape[0] or up.shape[0] * down.shape[1] != weight.numel():
            raise CheckpointError(f"LoRA layer {layer}: up {tuple(p['up'].shape)} @ down {tuple(p['down'].shape)} "
                                  f"does not fit weight {tuple(weight.shape)}: a LoRA made for another model (e.g. SD1.5 vs SDXL)?")
        factors[layer] = (up, down)
    return factors


def lora_to_delta(lora: Offset, base: Offset, alpha: float | None = None, alpha_pattern: dict | None = None,
                  rank_pattern: dict | None = None) -> Offset:
    """A LoRA -> weight offsets `delta[layer.weight] = scale * up @ down` (float32, base's shapes); the
    arguments and errors as lora_factors."""
    return {layer + ".weight": (up @ down).reshape(base[layer + ".weight"].shape)  # (out, r) @ (r, in * kh * kw)
            for layer, (up, down) in lora_factors(lora, base, alpha, alpha_pattern, rank_pattern).items()}


def is_lora(path: str | os.PathLike) -> bool:
    """Whether `path` (a file, or a folder holding one) is a LoRA checkpoint (as load_offset decides)."""
    path = _resolve(Path(path))[0]
    if not path.is_file():
        return False
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    return meta.get("format") != FORMAT and any("lora" in k for k in checkpoint_keys(path))


def read_lora_factors(path: str | os.PathLike, base: Offset, check_fingerprint: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors (lora_factors) of the LoRA at `path` (is_lora) for `base`; our LoRA files' base fingerprint is checked.

    Raises CheckpointError as lora_factors, or a LoRA made for another base.
    """
    path, adapter_config = _resolve(Path(path))
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if meta.get("format") == LORA_FORMAT and check_fingerprint:
        _check_fingerprint(meta, base, path)
    return lora_factors(load_state_dict(path), base, **lora_config(adapter_config or meta))


def _resolve(path: Path) -> tuple[Path, dict]:
    """A folder -> (its delta / LoRA file when it holds one, its PEFT adapter_config.json or {}); a file -> (path, {})."""
    adapter_config = {}
    if path.is_dir():
        if (path / "adapter_config.json").is_file():  # PEFT's save_pretrained folder
            adapter_config = json.loads((path / "adapter_config.json").read_text())
        for name in ("delta.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
            if (path / name).is_file():
                return path / name, adapter_config
    return path, adapter_config




# ----------------------------------------------------------------------------- any offset file


def load_offset(path: str | os.PathLike, base: Offset, read_weights: Callable[[Path], Offset] | None = None,
                check_fingerprint: bool = True, trust_delta: bool = False) -> Offset:
    """An offset over the keys of `base` (the base denoiser's state dict), float32, from our delta, a LoRA
    or a full fine-tuned model (see the module docstring). The same function gives delta and eta.

    read_weights: the family's reader of a full denoiser checkpoint into module names (its key map);
        without it, a full model must already be in module names.
    A file in module names without our metadata is told apart by content: tensors about the size of
    the base's (norm ratio >= 0.5) are a full model (offset = weights - base); much smaller ones are an
    offset stripped of its metadata, refused unless trust_delta (the CLIs' --trust-delta), since its
    base cannot be checked.
    Raises:
        CheckpointError: missing / unreadable file, a LoRA or delta that does not fit, a delta made for
            another base, a full model of another architecture, an offset without metadata.
    """
    offset = _load_offset(Path(path), base, read_weights, check_fingerprint, trust_delta)
    if not any(bool(v.any()) for v in offset.values()):
        warnings.warn(f"{path} is an empty offset ({len(offset)} keys, all zero): theta_neg = theta, so NPO samples "
                      "exactly like plain CFG. Was the right file passed?", stacklevel=2)
    return offset


def _load_offset(path: Path, base: Offset, read_weights, check_fingerprint: bool, trust_delta: bool) -> Offset:
    if not path.exists():
        raise CheckpointError(f"offset checkpoint not found: {path}. Pass a delta.safetensors, a LoRA or a fine-tuned model.")
    given, path = path, _resolve(path)[0]
    if path.is_file():
        meta = read_metadata(path) if path.suffix == ".safetensors" else {}
        if meta.get("format") == FORMAT:
            return read_delta(path, base, check_fingerprint)[0]
        if is_lora(path):
            return {layer + ".weight": (up @ down).reshape(base[layer + ".weight"].shape)  # (out, r) @ (r, in * kh * kw)
                    for layer, (up, down) in read_lora_factors(given, base, check_fingerprint).items()}
    names = checkpoint_keys(path) if path.is_file() else []
    if names and set(names) & set(base):  # already in module names: a full model or a bare offset
        sd = load_state_dict(path)
        check_offset(sd, base, str(path))
        ratio = _norm(sd) / max(_norm({k: base[k] for k in sd}), 1e-12)
        if ratio >= 0.5:
            return difference(sd, base, str(path))
        if not trust_delta:
            raise CheckpointError(
                f"{path} has no npo_min delta metadata and its tensors are {ratio:.3g} of the base's size: an offset whose "
                "base cannot be checked. Pass --trust-delta to apply it as delta anyway, or re-save it with train.py.")
        return {k: v.float() for k, v in sd.items()}
    return difference(read_weights(path) if read_weights else load_state_dict(path), base, str(path))


def _norm(sd: Offset) -> float:
    return float(sum(v.float().pow(2).sum() for v in sd.values())) ** 0.5
