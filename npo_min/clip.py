"""CLIP text encoder (SD1.5, SDXL, the scorers' text tower) and the CLIP checkpoint key maps.

The modules are named after transformers' `CLIPTextModel` checkpoint layout, so a diffusers
`text_encoder/model.safetensors` loads strictly:

    text_model.embeddings.{token_embedding, position_embedding}.weight
    text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    text_model.encoder.layers.{i}.{layer_norm1, layer_norm2}.{weight,bias}
    text_model.encoder.layers.{i}.mlp.{fc1, fc2}.{weight,bias}
    text_model.final_layer_norm.{weight,bias}
    text_projection.weight                      (only with projection_dim > 0, e.g. SDXL text_encoder_2)

The model is a pre-LayerNorm transformer with a causal mask (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision"). `CLIPAttention`, `CLIPMLP`,
`CLIPEncoderLayer` and `CLIPEncoder` take plain sizes and a `causal` flag and are shared with the
image tower (clip_vision.py).

The image tower and the two-tower `CLIPModel` (the scorers') are in `npo_min/clip_vision.py`.

OpenCLIP's own layout (HPSv2.1's `.pt`, and SDXL's bigG text tower in `sd_xl_base_1.0.safetensors`
under `conditioner.embedders.1.model.`) maps onto these names with `open_clip_to_hf` (fused `in_proj`
split into q/k/v, `text_projection` used as `x @ P` transposed into a Linear). The scorers' two-tower
checkpoints load through `eval/t2i/clip_checkpoints.py`.

The BPE tokenizer is in `npo_min/clip_tokenizer.py`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from npo_min.checkpoint import CheckpointError, build_loaded, load_state_dict

# ----------------------------------------------------------------------------------------------
# Config

# our field name -> transformers config.json key
HF_TEXT_NAMES = dict(vocab_size="vocab_size", width="hidden_size", layers="num_hidden_layers",
                     heads="num_attention_heads", mlp_width="intermediate_size",
                     max_positions="max_position_embeddings", act="hidden_act", layer_norm_eps="layer_norm_eps")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Sizes of a CLIP text tower. Field names follow the transformers config.json in brackets."""

    vocab_size: int = 49408  # [vocab_size]
    width: int = 768  # [hidden_size]
    layers: int = 12  # [num_hidden_layers]
    heads: int = 12  # [num_attention_heads]
    mlp_width: int = 3072  # [intermediate_size]
    max_positions: int = 77  # [max_position_embeddings]
    act: str = "quick_gelu"  # [hidden_act]: "quick_gelu" (OpenAI weights) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5  # [layer_norm_eps]
    projection_dim: int = 0  # [projection_dim] of CLIPTextModelWithProjection; 0 = no text_projection

    @classmethod
    def from_hf(cls, cfg: dict, with_projection: bool = False) -> "CLIPTextConfig":
        """Read a transformers `text_encoder/config.json` dict (missing keys keep our defaults)."""
        kw = {ours: cfg[theirs] for ours, theirs in HF_TEXT_NAMES.items() if theirs in cfg}
        if with_projection:
            kw["projection_dim"] = cfg.get("projection_dim", 512)
        return cls(**kw)


PRESETS: dict[str, CLIPTextConfig] = {
    # OpenAI CLIP ViT-L/14 text tower: runwayml/stable-diffusion-v1-5 text_encoder/config.json
    # (= openai/clip-vit-large-patch14 text_config). 123,060,480 parameters.
    "sd15": CLIPTextConfig(),
    # SDXL's first text encoder is the same OpenAI CLIP ViT-L/14 text tower (stabilityai/stable-diffusion-xl-base-1.0
    # text_encoder/config.json); SDXL reads its penultimate hidden state (clip_skip=1, final_norm=False).
    "sdxl_l": CLIPTextConfig(),
    # OpenCLIP ViT-bigG/14 text tower with its projection: SDXL text_encoder_2 (CLIPTextModelWithProjection,
    # stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json; open_clip ViT-bigG-14.json).
    # SDXL reads its penultimate hidden state (no final LN) and, for the pooled vector, final LN + text_projection
    # at the EOS token (`CLIPTextModel.encode(ids, clip_skip=1, final_norm=False)`). 694,659,840 parameters.
    "sdxl_g": CLIPTextConfig(width=1280, layers=32, heads=20, mlp_width=5120, act="gelu", projection_dim=1280),
    # Text towers of the two-tower scorers (CLIP_PRESETS below), with their text_projection:
    # OpenAI CLIP ViT-L/14 (openai/clip-vit-large-patch14; the LAION aesthetic predictor's CLIP) ...
    "vit_l_14": CLIPTextConfig(projection_dim=768),
    # ... and OpenCLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K: PickScore_v1, HPSv2.1;
    # open_clip ViT-H-14.json text_cfg: width 1024, 16 heads, 24 layers, mlp_ratio 4, exact GELU).
    "vit_h_14": CLIPTextConfig(width=1024, layers=24, heads=16, mlp_width=4096, act="gelu", projection_dim=1024),
}


def get_config(preset: str | CLIPTextConfig) -> CLIPTextConfig:
    """A preset name from PRESETS or a config passed through. Raises ValueError on an unknown name."""
    if isinstance(preset, CLIPTextConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown CLIP text preset {preset!r}: choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------------
# Transformer blocks shared by the text tower and the vision tower


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # "gelu" is the exact (erf) GELU


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (all with bias)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}.")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D). `causal`: token i attends to tokens 0..i only (text tower)."""
        # (B, L, H*d) -> (B, H, L, d) for each of q, k, v
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # softmax(q k^T / sqrt(d)) v
        return self.out_proj(rearrange(y, "b h l d -> b l (h d)"))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}: choose one of {sorted(ACTIVATIONS)}.")
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, mlp_width, act)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """A stack of `CLIPEncoderLayer`s (`encoder.layers.{i}`)."""

    def __init__(self, layers: int, width: int, heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(width, heads, mlp_width, act, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool, num_layers: int | None = None) -> torch.Tensor:
        """Run the first `num_layers` layers (all by default). x: (B, L, D) -> (B, L, D)."""
        for layer in self.layers[:num_layers]:
            x = layer(x, causal)
        return x


# ----------------------------------------------------------------------------------------------
# Text tower


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, L) int64 -> (B, L, D)."""
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    """`text_model`: embeddings -> causal encoder -> final_layer_norm."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg.layers, cfg.width, cfg.heads, cfg.mlp_width, cfg.act, cfg.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.cfg = cfg

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, width): final_layer_norm(last layer) at the end-of-text token (`pooler_output`)."""
        check_input_ids(input_ids, self.cfg)
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids), causal=True))
        return pool_eos(x, input_ids)


def check_input_ids(ids: torch.Tensor, cfg: CLIPTextConfig) -> None:
    """Raise ValueError unless ids is a (B, L) integer tensor, L <= max_positions, ids in [0, vocab_size)."""
    if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be a (B, L) integer tensor, got {ids.dtype} {tuple(ids.shape)}.")
    if ids.shape[1] > cfg.max_positions:
        raise ValueError(f"input_ids has {ids.shape[1]} tokens, more than max_positions={cfg.max_positions}.")
    if ids.numel() and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{ids.min()}, {ids.max()}].")


def pool_eos(hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Features at the end-of-text token: (B, L, D), (B, L) -> (B, D).

    The EOS token has the largest id in CLIP's vocabulary (49407), so its position is the argmax
    of the ids (the first one if the padding is EOS too), as in CLIP, OpenCLIP, and transformers
    when config.json has the legacy `eos_token_id: 2` (SD1.5 and SDXL text encoders do).
    """
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]


class CLIPTextModel(nn.Module):
    """CLIP text encoder; with `cfg.projection_dim > 0` also CLIPTextModelWithProjection's head."""

    def __init__(self, cfg: CLIPTextConfig = PRESETS["sd15"]):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def run_layers(self, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """Embeddings and the first `layers - clip_skip` encoder layers, before final_layer_norm.

        Args:
            input_ids: (B, L) int64 token ids in [0, vocab_size), L <= max_positions (77).
            clip_skip: number of final layers to skip, in [0, layers].

        Returns:
            (B, L, width) hidden states in the model's dtype (transformers' `hidden_states[-1 - clip_skip]`).

        Raises:
            ValueError: wrong ids shape / dtype / range, or clip_skip out of range.
        """
        cfg = self.cfg
        check_input_ids(input_ids, cfg)
        if not 0 <= clip_skip <= cfg.layers:
            raise ValueError(f"clip_skip must be in [0, {cfg.layers}], got {clip_skip}.")
        x = self.text_model.embeddings(input_ids)  # (B, L, D)
        return self.text_model.encoder(x, causal=True, num_layers=cfg.layers - clip_skip)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 0, final_norm: bool = True) -> torch.Tensor:
        """Per-token prompt embeddings (B, L) ids -> (B, L, width), as diffusers' pipelines compute them.

        clip_skip=0 with final_norm: the last layer + final_layer_norm (`last_hidden_state`, SD1.5).
        clip_skip=1 with final_norm: the penultimate layer's output, then final_layer_norm, exactly
        StableDiffusionPipeline's `clip_skip=1`. SDXL's pipelines take the penultimate layer without
        the norm: clip_skip=1, final_norm=False. See run_layers for ranges and errors.
        """
        x = self.run_layers(input_ids, clip_skip)
        return self.text_model.final_layer_norm(x) if final_norm else x

    pool = staticmethod(pool_eos)  # features at the end-of-text token: (B, L, D), (B, L) -> (B, D)

    def encode(
        self, input_ids: torch.Tensor, clip_skip: int = 0, final_norm: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and pooled features in one pass.

        Returns:
            hidden: (B, L, width), as `forward(input_ids, clip_skip, final_norm)`.
            pooled: (B, width) = final_layer_norm(last layer) at the EOS token (transformers'
                `pooler_output`, whatever clip_skip is), then text_projection -> (B, projection_dim)
                when the config has one (CLIPTextModelWithProjection's `text_embeds`).
        """
        x = self.run_layers(input_ids, clip_skip)
        last = x
        for layer in self.text_model.encoder.layers[self.cfg.layers - clip_skip:]:
            last = layer(last, causal=True)
        norm = self.text_model.final_layer_norm
        hidden = norm(x) if final_norm else x
        pooled = self.pool(norm(last), input_ids)
        if self.cfg.projection_dim:
            pooled = self.text_projection(pooled)
        return hidden, pooled


# ----------------------------------------------------------------------------------------------
# Loading

SINGLE_FILE_PREFIX = "cond_stage_model.transformer."  # SD1.x single-file checkpoints (.ckpt / .safetensors)


def to_official_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one key map into the transformers layout of the module docstring.

    - SD single-file checkpoint: keep only keys under `cond_stage_model.transformer.`, prefix removed.
    - transformers >= 5 saves a bare CLIPTextModel without the `text_model.` prefix: add it back.
    - drop the non-trainable `text_model.embeddings.position_ids` buffer older exports contain.
    """
    if any(k.startswith(SINGLE_FILE_PREFIX) for k in sd):
        sd = {k[len(SINGLE_FILE_PREFIX):]: v for k, v in sd.items() if k.startswith(SINGLE_FILE_PREFIX)}
    if not any(k.startswith("text_model.") for k in sd):
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k != "text_model.embeddings.position_ids"}


# OpenCLIP names (open_clip, HPSv2, the bigG text tower inside SDXL single files) -> transformers CLIPModel
# names, used by open_clip_to_hf.
OPEN_CLIP_MODULES = {  # whole modules or tensors outside the transformer blocks
    "visual.conv1": "vision_model.embeddings.patch_embedding",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre": "vision_model.pre_layrnorm",
    "visual.ln_post": "vision_model.post_layernorm",
    "token_embedding": "text_model.embeddings.token_embedding",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final": "text_model.final_layer_norm",
}
OPEN_CLIP_BLOCK = {  # inside `[visual.]transformer.resblocks.{i}.`; attn.in_proj_{weight,bias} is split
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
OPEN_CLIP_PROJECTIONS = {  # stored as (width, dim) matrices applied as x @ proj: transpose into nn.Linear
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}
_OPEN_CLIP_BLOCK_KEY = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")


def open_clip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one map from an OpenCLIP `CLIP` state dict to the transformers CLIPModel layout.

    - a `module.` prefix (checkpoints saved from a DistributedDataParallel wrapper) is removed;
    - `attn.in_proj_weight` (3 D, D) / `attn.in_proj_bias` (3 D,) of nn.MultiheadAttention are the
      q, k, v projections stacked in that order: split into q_proj / k_proj / v_proj;
    - `visual.proj` and `text_projection` (width, dim) become bias-free Linear weights (dim, width);
    - the causal `attn_mask` buffer some saves contain is dropped (our text tower builds it);
    - every other name is renamed with OPEN_CLIP_MODULES / OPEN_CLIP_BLOCK; `logit_scale` keeps its
      name. Unknown keys pass through unchanged, so a strict load reports them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key == "attn_mask" or key.endswith(".attn_mask"):
            continue
        if key in OPEN_CLIP_PROJECTIONS:
            out[OPEN_CLIP_PROJECTIONS[key]] = value.T.contiguous()
            continue
        block = _OPEN_CLIP_BLOCK_KEY.fullmatch(key)
        if block:
            visual, index, name = block.groups()
            prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{index}."
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = name.rsplit("_", 1)[1]  # weight / bias
                for proj, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{proj}_proj.{kind}"] = part.contiguous()
                continue
            out[prefix + _rename_prefix(name, OPEN_CLIP_BLOCK)] = value
            continue
        out[_rename_prefix(key, OPEN_CLIP_MODULES)] = value
    return out


def _rename_prefix(key: str, renames: dict[str, str]) -> str:
    """Replace the first `old` of renames that is the whole key or a dotted prefix of it."""
    for old, new in renames.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key


def _check_folder_config(folder: Path, cfg: CLIPTextConfig) -> None:
    """If the folder has a transformers config.json, it must describe the same architecture as cfg."""
    path = folder / "config.json"
    if not path.exists():
        return
    raw = json.loads(path.read_text())
    theirs = CLIPTextConfig.from_hf(raw, with_projection=bool(cfg.projection_dim))
    diff = {k: (v, getattr(cfg, k)) for k, v in asdict(theirs).items() if v != getattr(cfg, k)}
    if diff:
        shown = ", ".join(f"{k}: config.json {a!r} vs preset {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path} does not match the chosen preset ({shown}): pick the matching preset.")


def load_text_encoder(
    path: str | os.PathLike, preset: str | CLIPTextConfig = "sd15", dtype: torch.dtype = torch.float32
) -> CLIPTextModel:
    """Build a CLIPTextModel and strictly load its weights, in eval mode with gradients off.

    Args:
        path: a diffusers / transformers `text_encoder/` folder (maybe sharded; its config.json, if any,
            is checked against the preset), a `.safetensors` file, or an SD1.x single-file checkpoint
            (keys under `cond_stage_model.transformer.`). SDXL single files keep their second encoder
            in OpenCLIP's own layout (`conditioner.embedders.1.model.`), which this loader does not map.
        preset: a name from PRESETS or a CLIPTextConfig.
        dtype: parameter dtype (float32, float16 or bfloat16).

    Raises:
        CheckpointError: missing path, missing / unexpected keys, wrong shapes, or a config.json that
            does not match the preset.
        ValueError: unknown preset.
    """
    cfg = get_config(preset)
    if Path(path).is_dir():
        _check_folder_config(Path(path), cfg)
    sd = to_official_keys(load_state_dict(path))
    what = f"CLIPTextModel ({preset if isinstance(preset, str) else 'custom config'})"
    return build_loaded(CLIPTextModel, cfg, sd, dtype, what).requires_grad_(False)
