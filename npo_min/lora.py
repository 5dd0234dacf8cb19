"""LoRA as a training mode: low-rank adapters on chosen Linear layers of a denoiser, saved in PEFT names.

    W x + b  ->  W x + b + (alpha / r) B A x        A: (r, in), B: (out, r)   (Hu et al. 2021, Eq. 3)

`add_lora(model, rank, alpha, targets)` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps the
layer's own `weight` / `bias` (frozen; the state-dict names of the base stay the same) and adds the
trainable `lora_A` / `lora_B`. B starts at zero, so the adapted model starts as the base; A as PEFT's
default (Kaiming-uniform, a = sqrt(5)). Targets match module names as PEFT's `target_modules` does: a
name equal to a target or ending in "." + target (default: the attention projections to_q, to_k, to_v,
to_out.0, the Diffusion-NPO authors' choice).

`lora_state_dict(model)` gives the factors as `unet.<layer>.lora_A.weight` / `.lora_B.weight` (the names
diffusers' `save_lora_weights` writes) and `lora_metadata` the `lora_adapter_metadata` header diffusers
reads (r, lora_alpha, target_modules), so the saved file loads with diffusers' `load_lora_weights` and
with `npo_min.offsets.load_offset` (`--neg-ckpt`, `--pos-ckpt`).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from .offsets import LORA_FORMAT

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: an --out folder is a diffusers LoRA folder


class LoRALinear(nn.Linear):
    """A Linear layer `(.., in) -> (.., out)` plus `scale * lora_B(lora_A(x))`, scale = alpha / rank.

    `weight` and `bias` are the base layer's own Parameters (shared, not copied); `enabled = False`
    gives the base layer's output exactly (the frozen reference of DPO without a second model).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.alpha, self.scale, self.enabled = rank, alpha, alpha / rank, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        return out + self.scale * self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The weight offset `(out, in)` this adapter adds: scale * B @ A (float32)."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())


def parse_targets(text: str | None) -> tuple[str, ...]:
    """"to_q,to_k" -> ("to_q", "to_k"); None / "" -> DEFAULT_TARGETS."""
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else DEFAULT_TARGETS


def matches(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's target_modules rule: the module name equals a target or ends with "." + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Freeze `model` and put a trainable LoRA (rank r, scale alpha / r; alpha None = r) on every targeted
    Linear layer, in place. Returns the adapted layer names.

    Raises:
        ValueError: rank < 1, alpha <= 0, a target that matches no module, or one that matches a layer that
            is not nn.Linear (only Linear layers take a LoRA here).
    """
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1; got {rank}.")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"--lora-alpha must be > 0; got {alpha}.")
    model.requires_grad_(False)
    chosen = [(n, m) for n, m in model.named_modules() if n and matches(n, targets)]
    hit = {t for t in targets if any(matches(n, (t,)) for n, _ in chosen)}
    if set(targets) - hit:
        raise ValueError(f"--lora-targets {sorted(set(targets) - hit)} match no module of the denoiser "
                         f"(layer names look like {[n for n, _ in model.named_modules()][5:8]}).")
    bad = [n for n, m in chosen if type(m) is not nn.Linear]
    if bad:
        raise ValueError(f"--lora-targets match {len(bad)} modules that are not Linear layers, e.g. {bad[:3]}: "
                         "only nn.Linear layers take a LoRA here; name the Linear layers (e.g. to_q, to_out.0).")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(module, rank, alpha)
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            parent[int(child)] = lora
        else:
            setattr(parent, child, lora)
    return [n for n, _ in chosen]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def lora_disabled(model: nn.Module):
    """Within the block the model computes with its base weights only (every LoRA switched off)."""
    layers = list(lora_layers(model).values())
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def lora_state_dict(model: nn.Module, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The adapters in diffusers' PEFT names: `{prefix}{layer}.lora_A.weight (r, in)`, `.lora_B.weight (out, r)`."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{prefix}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu()
        out[f"{prefix}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu()
    return out


def lora_metadata(model: nn.Module, prefix: str = "unet.") -> dict[str, str]:
    """`lora_adapter_metadata` for the file header: JSON of PEFT LoraConfig fields (r, lora_alpha, target_modules,
    ...), keys prefixed as diffusers' `save_lora_weights` writes them (`unet.r`, `unet.lora_alpha`, ...)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (add_lora was not called).")
    ranks = {m.rank for m in layers.values()}
    alphas = {m.alpha for m in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"one rank and alpha for every layer expected; got ranks {ranks}, alphas {alphas}.")
    config = {"r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": sorted(layers), "lora_dropout": 0.0,
              "bias": "none", "use_dora": False, "use_rslora": False, "init_lora_weights": True}
    return {"lora_adapter_metadata": json.dumps({f"{prefix}{k}": v for k, v in config.items()}, sort_keys=True)}


def merged_offset(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as weight offsets over the model's own state-dict keys: `{layer}.weight -> scale B A`."""
    return {f"{name}.weight": m.delta_weight() for name, m in lora_layers(model).items()}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the adapters: the base's own keys (for fingerprints and offsets)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}


def save_lora(model: nn.Module, base: dict[str, torch.Tensor], path, metadata: dict, overwrite: bool = False,
              prefix: str = "unet"):
    """Write the model's adapters (PEFT names, see `lora_state_dict`) with metadata {format: LORA_FORMAT,
    base_fingerprint, lora_adapter_metadata, **metadata}, atomically; refuses NaN / Inf. Returns the path.
    prefix: the denoiser's component in diffusers' pipeline (`Pipeline.lora_prefix`: "unet", CogVideoX "transformer").

    Raises:
        ValueError: a non-finite adapter weight. FileExistsError: path exists and not overwrite.
    """
    from .checkpoint import fingerprint, save_safetensors

    tensors = lora_state_dict(model, prefix + ".")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the trained LoRA has NaN / Inf in {len(bad)} tensors, e.g. {bad[:2]}: lower --lr; nothing written.")
    meta = {"format": LORA_FORMAT, "base_fingerprint": fingerprint(base), **lora_metadata(model, prefix + "."), **metadata}
    return save_safetensors(tensors, path, meta, overwrite=overwrite)
