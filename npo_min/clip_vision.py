"""CLIP ViT image tower and the two-tower CLIPModel, in transformers' `CLIPModel` layout (the aesthetic /
PickScore / HPSv2 scorers, eval/t2i/; ViT-L/14 and ViT-H/14 presets):

    vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}
    vision_model.pre_layrnorm.{weight,bias}        (sic: transformers' spelling)
    vision_model.encoder.layers.{i}.*              (the text tower's block, npo_min/clip.py, no causal mask)
    vision_model.post_layernorm.{weight,bias}
    visual_projection.weight, text_model.*, text_projection.weight, logit_scale

Radford et al. 2021; Dosovitskiy et al. 2021 (ViT). OpenCLIP checkpoints map onto these names with
`npo_min.clip.open_clip_to_hf`; the scorers' files load through `eval/t2i/clip_checkpoints.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .clip import PRESETS, CLIPEncoder, CLIPTextConfig, CLIPTextTransformer

HF_VISION_NAMES = dict(image_size="image_size", patch_size="patch_size", width="hidden_size",
                       layers="num_hidden_layers", heads="num_attention_heads", mlp_width="intermediate_size",
                       act="hidden_act", layer_norm_eps="layer_norm_eps", channels="num_channels")


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Sizes of a CLIP ViT image tower. Field names follow the transformers config.json in brackets."""

    image_size: int = 224  # [image_size]
    patch_size: int = 14  # [patch_size]
    width: int = 1024  # [hidden_size]
    layers: int = 24  # [num_hidden_layers]
    heads: int = 16  # [num_attention_heads]
    mlp_width: int = 4096  # [intermediate_size]
    act: str = "quick_gelu"  # [hidden_act]
    layer_norm_eps: float = 1e-5  # [layer_norm_eps]
    projection_dim: int = 768  # [projection_dim] (top level of CLIPModel's config): visual_projection's output
    channels: int = 3  # [num_channels]

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")

    @property
    def num_positions(self) -> int:
        """Class token + (image_size / patch_size)^2 patches."""
        return 1 + (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, cfg: dict, projection_dim: int | None = None) -> "CLIPVisionConfig":
        """Read a transformers `vision_config` dict (missing keys keep our defaults)."""
        kw = {ours: cfg[theirs] for ours, theirs in HF_VISION_NAMES.items() if theirs in cfg}
        if projection_dim is not None:
            kw["projection_dim"] = projection_dim
        return cls(**kw)


VISION_PRESETS: dict[str, CLIPVisionConfig] = {
    # OpenAI CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14 vision_config).
    "vit_l_14": CLIPVisionConfig(),
    # OpenCLIP ViT-H/14 (open_clip ViT-H-14.json vision_cfg: width 1280, head_width 80, 32 layers).
    "vit_h_14": CLIPVisionConfig(width=1280, layers=32, heads=16, mlp_width=5120, act="gelu", projection_dim=1024),
}


@dataclass(frozen=True)
class CLIPConfig:
    """A two-tower CLIP: both towers project into the same `projection_dim`-wide embedding space."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig

    def __post_init__(self):
        if not self.text.projection_dim or self.text.projection_dim != self.vision.projection_dim:
            raise ValueError(
                f"text and vision projection_dim must be equal and > 0, got "
                f"{self.text.projection_dim} and {self.vision.projection_dim}."
            )


CLIP_PRESETS: dict[str, CLIPConfig] = {
    "vit_l_14": CLIPConfig(PRESETS["vit_l_14"], VISION_PRESETS["vit_l_14"]),  # 427,616,513 parameters
    "vit_h_14": CLIPConfig(PRESETS["vit_h_14"], VISION_PRESETS["vit_h_14"]),  # 986,109,441 parameters
}


def get_clip_config(preset: str | CLIPConfig) -> CLIPConfig:
    """A name from CLIP_PRESETS or a CLIPConfig passed through. Raises ValueError on an unknown name."""
    if isinstance(preset, CLIPConfig):
        return preset
    if preset not in CLIP_PRESETS:
        raise ValueError(f"unknown CLIP preset {preset!r}: choose one of {sorted(CLIP_PRESETS)}.")
    return CLIP_PRESETS[preset]



# ----------------------------------------------------------------------------------------------
# Vision tower and the two-tower CLIPModel


class CLIPVisionEmbeddings(nn.Module):
    """Class token + non-overlapping patches (a bias-free conv), plus a learned position embedding."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, 1 + (S / patch)^2, width), patches in row-major order."""
        patches = rearrange(self.patch_embedding(pixel_values), "b d h w -> b (h w) d")
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """`vision_model`: embeddings -> pre_layrnorm -> encoder (no mask) -> post_layernorm of the class token."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # sic, transformers' key name
        self.encoder = CLIPEncoder(cfg.layers, cfg.width, cfg.heads, cfg.mlp_width, cfg.act, cfg.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, channels, image_size, image_size) normalized pixels -> (B, width) (`pooler_output`).

        Raises:
            ValueError: pixel_values is not a float (B, channels, image_size, image_size) tensor.
        """
        cfg = self.cfg
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected or not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a float (B, {', '.join(map(str, expected))}) tensor, got "
                f"{pixel_values.dtype} {tuple(pixel_values.shape)}: preprocess images to {cfg.image_size} px first."
            )
        x = self.embeddings(pixel_values.to(self.pre_layrnorm.weight.dtype))
        x = self.encoder(self.pre_layrnorm(x), causal=False)
        return self.post_layernorm(x[:, 0])


class CLIPVisionModel(nn.Module):
    """CLIP image tower with its projection (transformers' `CLIPVisionModelWithProjection`).

    Keys `vision_model.*` and `visual_projection.weight`, the image half of a CLIPModel checkpoint,
    so it loads from a full CLIPModel file without the text tower's memory (see load_clip_vision).
    """

    def __init__(self, cfg: CLIPVisionConfig = VISION_PRESETS["vit_l_14"]):
        super().__init__()
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, projection_dim) image embeddings (not normalized)."""
        return self.visual_projection(self.vision_model(pixel_values))


class CLIPModel(nn.Module):
    """Two-tower CLIP in transformers' `CLIPModel` layout (see the module docstring).

    get_image_features / get_text_features return the projected, unnormalized embeddings;
    forward returns `logit_scale.exp() * cosine` for every (image, text) pair.
    """

    def __init__(self, cfg: str | CLIPConfig = "vit_h_14"):
        super().__init__()
        cfg = get_clip_config(cfg)
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg.text)
        self.text_projection = nn.Linear(cfg.text.width, cfg.text.projection_dim, bias=False)
        self.vision_model = CLIPVisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.vision.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized pixels -> (B, projection_dim). Raises ValueError on a wrong shape."""
        return self.visual_projection(self.vision_model(pixel_values))

    def get_text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids (one EOS = the largest id per row) -> (B, projection_dim). ValueError on bad ids."""
        return self.text_projection(self.text_model.pooled(input_ids))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """logits_per_image (B_images, B_texts) = logit_scale.exp() * cosine(image, text)."""
        img = F.normalize(self.get_image_features(pixel_values), dim=-1)
        txt = F.normalize(self.get_text_features(input_ids), dim=-1)
        return self.logit_scale.exp() * img @ txt.T
