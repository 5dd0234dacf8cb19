"""The Stable Diffusion UNet (1.x and XL), in plain PyTorch; the digits model is the same code, smaller.

Module names mirror the diffusers `UNet2DConditionModel` layout (`unet/diffusion_pytorch_model.safetensors`
of `runwayml/stable-diffusion-v1-5` and `stabilityai/stable-diffusion-xl-base-1.0`), so those folders load
with no key map; the original single-file layout (`model.diffusion_model.*`) goes through one named map,
`ldm_unet_to_diffusers` (npo_min/unet_ldm.py); the diffusers config.json reader and `load_unet` are below.

    x (B, C, H, W), t (B,) in 0..999, context (B, L, D) or, for SDXL, a dict (see UNet2DConditionModel)
    time embedding (+ SDXL's `text_time` added embedding of pooled text and 6 micro-conditioning ids)
    conv_in -> down_blocks [ResNet (+ cross-attention Transformer x depth)] x layers, Downsample
            -> mid_block  ResNet, Transformer x depth, ResNet
            -> up_blocks  [concat skip, ResNet (+ Transformer x depth)] x (layers + 1), Upsample
            -> GroupNorm, SiLU, conv_out -> eps (B, C, H, W)

SD1.5 and SDXL differ only in config fields: levels and widths, which levels attend, transformer depth
and head count per level, 1x1-conv or linear proj_in/proj_out, and the added `text_time` embedding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from .checkpoint import CheckpointError, checkpoint_keys, build_loaded, load_state_dict


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    cross_attn: tuple[bool, ...] = (True, True, True, False)  # per level: CrossAttn{Down,Up}Block2D or not
    layers_per_block: int = 2
    # heads per level, one int for all (diffusers calls this `attention_head_dim` in SD configs: a misnomer)
    num_heads: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    sample_size: int = 64  # latent (or pixel) side the model was trained at
    prediction_type: str = "epsilon"
    # transformer blocks per attention per level, one int for all [transformer_layers_per_block];
    # the mid block uses the deepest level's value, the up path the reversed list (as diffusers)
    transformer_depth: int | tuple[int, ...] = 1
    use_linear_projection: bool = False  # proj_in / proj_out: 1x1 convs (SD1.x) or linears (SD2, SDXL)
    # SDXL's added conditioning [addition_embed_type "text_time"]: pooled text (B, P) and time ids (B, n)
    # with each id through an `addition_time_embed_dim` sinusoid; P + n * dim = projection_input_dim.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int = 256
    projection_input_dim: int = 2816  # [projection_class_embeddings_input_dim]

    def per_level(self, value) -> tuple[int, ...]:
        """An int-or-tuple field as one value per level (down order)."""
        n = len(self.block_out_channels)
        return (value,) * n if isinstance(value, int) else tuple(value)


PRESETS = {
    # runwayml/stable-diffusion-v1-5, unet/config.json
    "sd15": UNetConfig(),
    # The project's digits model (~1M parameters, sized for 2 CPU cores): 8x8 grey pixels,
    # levels 8x8 and 4x4, cross-attention over 4 class tokens of width 64 at 4x4 and in the middle.
    "digits": UNetConfig(
        in_channels=1, out_channels=1, block_out_channels=(32, 64), cross_attn=(False, True),
        layers_per_block=1, num_heads=4, cross_attention_dim=64, norm_num_groups=8, sample_size=8,
    ),
    # The project's Fashion-MNIST model (0.99M parameters, sized for 2 CPU cores): 28x28 grey pixels,
    # levels 28, 14 and 7, cross-attention over the digits model's 4 class tokens at 7x7 and in the middle.
    "fashion": UNetConfig(
        in_channels=1, out_channels=1, block_out_channels=(16, 32, 64), cross_attn=(False, False, True),
        layers_per_block=1, num_heads=4, cross_attention_dim=64, norm_num_groups=8, sample_size=28,
    ),
    # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json: 3 levels, no attention at the first,
    # transformer depth (1, 2, 10), heads 5/10/20 of width 64, linear projections, context 2048 = CLIP-L 768
    # + OpenCLIP bigG 1280, added embedding of pooled bigG text (1280) + 6 time ids x 256. 2,567,463,684 params.
    "sdxl": UNetConfig(
        block_out_channels=(320, 640, 1280), cross_attn=(False, True, True), num_heads=(5, 10, 20),
        cross_attention_dim=2048, sample_size=128, transformer_depth=(1, 2, 10), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_input_dim=2816,
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `[cos(t f), sin(t f)]`, f_i = max_period^(-i / (dim/2)); (B,) -> (B, dim).

    Matches diffusers `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)` as used by SD.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, out)
        self.linear_2 = nn.Linear(out, out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, cross-attention otherwise."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers: [Linear, Dropout]

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in (q, k, v))  # (B, N, C) -> (B, h, N, C/h)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))  # (B, h, N, C/h) -> (B, N, C)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])  # net.1 = Dropout

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention over the conditioning sequence, GEGLU MLP; pre-LayerNorm."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, context_dim, heads)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in, `depth` transformer blocks over the H*W tokens, proj_out, residual.

    proj_in / proj_out are 1x1 convs (SD1.x) or, with `linear`, Linear layers on the tokens (SDXL):
    the same map, with (C, C) instead of (C, C, 1, 1) weights.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, groups: int, depth: int = 1, linear: bool = False):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim, heads) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x, context):
        _, _, height, width = x.shape
        h = self.norm(x)
        if self.linear:
            h = self.proj_in(rearrange(h, "b c h w -> b (h w) c"))  # (B, C, H, W) -> (B, HW, C)
        else:
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")  # (B, C, H, W) -> (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)  # (B, HW, C) -> (B, C, H, W)
        return (h if self.linear else self.proj_out(h)) + x


class Downsample2D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, size=None):
        # `size` = the next skip's (H, W), so odd sizes round-trip as in diffusers.
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class UNetBlock(nn.Module):
    """One resolution level: `resnets`, optional `attentions`, optional `downsamplers`/`upsamplers`."""

    def __init__(self, resnets, attentions, sampler_name: str | None = None, sampler=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty for DownBlock2D / UpBlock2D (no keys)
        if sampler_name:
            setattr(self, sampler_name, nn.ModuleList([sampler]))


class UNet2DConditionModel(nn.Module):
    """eps-prediction UNet `f(x_t, t, context)` of Stable Diffusion 1.x / XL (and of the digits model).

    Args:
        x: `(B, in_channels, H, W)` noisy sample x_t (SD: latents already scaled by the VAE's scaling factor).
        t: `(B,)` or scalar timestep, integer-valued in 0..999 (float accepted).
        context: `(B, L, cross_attention_dim)` conditioning sequence for cross-attention
            (SD1.5: CLIP text hidden states, L = 77; digits: 4 class tokens); with
            `addition_embed_type="text_time"` (SDXL) a dict of
              encoder_hidden_states (B, L, cross_attention_dim)   the text sequence (CLIP-L | bigG, 2048 wide)
              text_embeds (B, P)                                  pooled bigG text embedding (P = 1280)
              time_ids (B, 6)                                     orig (h, w), crop (top, left), target (h, w), pixels
    Returns:
        `(B, out_channels, H, W)`, the predicted noise eps.
    Raises:
        ValueError: a context of the wrong kind for the config (a tensor where SDXL needs the dict, or missing keys).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        ch, n, layers = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        temb, g, ctx = 4 * ch[0], cfg.norm_num_groups, cfg.cross_attention_dim
        heads, depth = cfg.per_level(cfg.num_heads), cfg.per_level(cfg.transformer_depth)

        def attn(dim, level):
            return Transformer2DModel(dim, ctx, heads[level], g, depth[level], cfg.use_linear_projection)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        if cfg.addition_embed_type == "text_time":  # SDXL micro-conditioning (diffusers `add_embedding`)
            self.add_embedding = TimestepEmbedding(cfg.projection_input_dim, temb)
        elif cfg.addition_embed_type is not None:
            raise ValueError(f"addition_embed_type {cfg.addition_embed_type!r} is not implemented (supported: None, 'text_time').")

        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            resnets = [ResnetBlock2D(cin if j == 0 else cout, cout, temb, g) for j in range(layers)]
            attns = [attn(cout, i) for _ in range(layers)] if cfg.cross_attn[i] else []
            last = i == n - 1
            self.down_blocks.append(UNetBlock(resnets, attns, None if last else "downsamplers", Downsample2D(cout)))

        self.mid_block = UNetBlock([ResnetBlock2D(ch[-1], ch[-1], temb, g) for _ in range(2)], [attn(ch[-1], n - 1)])

        self.up_blocks = nn.ModuleList()
        rev, rev_attn = ch[::-1], cfg.cross_attn[::-1]
        prev = rev[0]
        for i, cout in enumerate(rev):
            skip_in = rev[min(i + 1, n - 1)]  # channels of the deepest skip this level consumes
            resnets = [
                ResnetBlock2D((prev if j == 0 else cout) + (skip_in if j == layers else cout), cout, temb, g)
                for j in range(layers + 1)
            ]
            attns = [attn(cout, n - 1 - i) for _ in range(layers + 1)] if rev_attn[i] else []
            last = i == n - 1
            self.up_blocks.append(UNetBlock(resnets, attns, None if last else "upsamplers", Upsample2D(cout)))
            prev = cout

        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _run(self, module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def added_embedding(self, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """SDXL `text_time`: [pooled text (B, P), sinusoid(each time id) (B, n * dim)] -> (B, 4 * C0)."""
        dim = self.cfg.addition_time_embed_dim
        time_embeds = timestep_embedding(time_ids.flatten(), dim).reshape(time_ids.shape[0], -1)  # (B * n, dim) -> (B, n * dim)
        return self.add_embedding(torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        temb = self.time_embedding(timestep_embedding(t, self.cfg.block_out_channels[0]).to(x.dtype))
        if self.cfg.addition_embed_type == "text_time":
            need = ("encoder_hidden_states", "text_embeds", "time_ids")
            if not isinstance(context, dict) or any(k not in context for k in need):
                got = sorted(context) if isinstance(context, dict) else type(context).__name__
                raise ValueError(f"this UNet (addition_embed_type 'text_time', SDXL) needs context = dict with {list(need)}; got {got}.")
            temb = temb + self.added_embedding(context["text_embeds"].to(x.dtype), context["time_ids"])
            context = context["encoder_hidden_states"]
        elif isinstance(context, dict):
            raise ValueError(f"this UNet takes a context tensor (B, L, {self.cfg.cross_attention_dim}), not a dict {sorted(context)}.")
        context = context.to(x.dtype)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                h = self._run(resnet, h, temb)
                if len(block.attentions):
                    h = self._run(block.attentions[j], h, context)
                skips.append(h)
            for down in getattr(block, "downsamplers", []):
                h = down(h)
                skips.append(h)

        mid = self.mid_block
        h = self._run(mid.resnets[0], h, temb)
        h = self._run(mid.attentions[0], h, context)
        h = self._run(mid.resnets[1], h, temb)

        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                h = self._run(resnet, torch.cat([h, skips.pop()], dim=1), temb)  # concat skip on channels
                if len(block.attentions):
                    h = self._run(block.attentions[j], h, context)
            for up in getattr(block, "upsamplers", []):
                h = up(h, skips[-1].shape[-2:])

        return self.conv_out(F.silu(self.conv_norm_out(h)))

# ----------------------------------------------------------------------------- checkpoint layouts
# The diffusers folder (`unet/config.json` + `diffusion_pytorch_model.safetensors`) loads with no key map;
# the original single file (`model.diffusion_model.*`, LDM names) goes through `ldm_unet_to_diffusers`.

UNET_PREFIX = "model.diffusion_model."  # the UNet inside an SD single-file checkpoint

# diffusers UNet2DConditionModel settings that SD1.x / SDXL never change and our UNet hard-codes. Shapes
# would not reveal most of them (e.g. flip_sin_to_cos), so a config.json that differs is refused.
UNET_FIXED = dict(
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", norm_eps=1e-5, downsample_padding=1, center_input_sample=False,
    mid_block_type="UNetMidBlock2DCrossAttn", mid_block_scale_factor=1, reverse_transformer_layers_per_block=None,
    only_cross_attention=False, dual_cross_attention=False, num_attention_heads=None,
    class_embed_type=None, num_class_embeds=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    time_embedding_type="positional", time_cond_proj_dim=None, resnet_time_scale_shift="default",
    conv_in_kernel=3, conv_out_kernel=3, attention_type="default", cross_attention_norm=None, timestep_post_act=None,
    time_embedding_act_fn=None, resnet_skip_time_act=False, resnet_out_scale_factor=1.0, class_embeddings_concat=False,
)


def _uniform(value):
    """A list with one repeated value -> that value (diffusers writes per-level lists for some settings)."""
    return value[0] if isinstance(value, list) and value and all(v == value[0] for v in value) else value


def unet_config_from_diffusers(raw: dict) -> UNetConfig:
    """A diffusers `unet/config.json` dict -> UNetConfig (missing entries keep the SD1.5 values).

    `attention_head_dim` is the number of heads in SD1.x configs (a diffusers misnomer kept for
    compatibility), hence `num_heads`; per-level lists with one repeated value become that value (so SD1.5's
    config reads back as the `sd15` preset), others a tuple (SDXL's heads (5, 10, 20), depth (1, 2, 10)).
    Raises CheckpointError for settings this UNet does not implement (class embeddings, other added
    embeddings than SDXL's `text_time`, per-level cross-attention widths, ...).
    """
    d = UNetConfig()
    bad = [f"{k}={raw[k]!r} (supported: {v!r})" for k, v in UNET_FIXED.items() if k in raw and _uniform(raw[k]) != v]
    down = raw.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    cross = tuple(t == "CrossAttnDownBlock2D" for t in down)
    mirror = [("CrossAttnUpBlock2D" if c else "UpBlock2D") for c in reversed(cross)]
    if not set(down) <= {"CrossAttnDownBlock2D", "DownBlock2D"} or raw.get("up_block_types", mirror) != mirror:
        bad.append(f"down_block_types={down}, up_block_types={raw.get('up_block_types')} (supported: "
                   "CrossAttnDownBlock2D / DownBlock2D and the mirrored up blocks)")
    heads, ctx = _uniform(raw.get("attention_head_dim", d.num_heads)), _uniform(raw.get("cross_attention_dim", d.cross_attention_dim))
    depth = _uniform(raw.get("transformer_layers_per_block", d.transformer_depth))
    if isinstance(ctx, list) or any(isinstance(v, list) and any(isinstance(e, list) for e in v) for v in (heads, depth)):
        bad.append(f"cross_attention_dim={ctx}, transformer_layers_per_block={depth} (supported: one cross_attention_dim, "
                   "one depth per level)")
    added = raw.get("addition_embed_type")
    if added not in (None, "text_time"):
        bad.append(f"addition_embed_type={added!r} (supported: None, 'text_time')")
    layers = _uniform(raw.get("layers_per_block", d.layers_per_block))
    if not (isinstance(layers, int) and layers >= 1):
        bad.append(f"layers_per_block={layers!r} (supported: one positive integer for all levels)")
    for key in ("in_channels", "out_channels", "norm_num_groups", "sample_size"):
        if key in raw and not (isinstance(raw[key], int) and raw[key] >= 1):
            bad.append(f"{key}={raw[key]!r} (supported: a positive integer)")
    channels = raw.get("block_out_channels", d.block_out_channels)
    if not (isinstance(channels, (list, tuple)) and len(channels) == len(down) and all(isinstance(c, int) for c in channels)):
        bad.append(f"block_out_channels={channels!r} (supported: one integer per down block, {len(down)} here)")
    if bad:
        raise CheckpointError("this UNet config.json describes an architecture npo_min does not implement:\n    " + "\n    ".join(bad))
    return UNetConfig(
        in_channels=raw.get("in_channels", d.in_channels), out_channels=raw.get("out_channels", d.out_channels),
        block_out_channels=tuple(raw.get("block_out_channels", d.block_out_channels)), cross_attn=cross,
        layers_per_block=layers, num_heads=_tuple(heads), cross_attention_dim=ctx,
        norm_num_groups=raw.get("norm_num_groups", d.norm_num_groups), sample_size=raw.get("sample_size", d.sample_size),
        transformer_depth=_tuple(depth), use_linear_projection=bool(raw.get("use_linear_projection", False)),
        addition_embed_type=added,
        addition_time_embed_dim=(raw.get("addition_time_embed_dim") or d.addition_time_embed_dim) if added else d.addition_time_embed_dim,
        projection_input_dim=(raw.get("projection_class_embeddings_input_dim") or d.projection_input_dim) if added else d.projection_input_dim,
    )


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None



def _unet_config(preset: str | UNetConfig) -> UNetConfig:
    if not isinstance(preset, UNetConfig) and preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}: choose one of {sorted(PRESETS)} or pass a UNetConfig.")
    return preset if isinstance(preset, UNetConfig) else PRESETS[preset]


def read_unet_weights(path: str | os.PathLike, cfg: UNetConfig = PRESETS["sd15"]) -> dict[str, torch.Tensor]:
    """A UNet state dict in diffusers names from a single file (of a `.safetensors`, only `model.diffusion_model.*`
    is read), a diffusers folder / file, or an LDM UNet file. Raises CheckpointError: missing / unreadable path."""
    path = Path(path)
    if path.is_dir() and (path / "unet").is_dir():
        path = path / "unet"
    if path.is_file() and path.suffix == ".safetensors" and any(k.startswith(UNET_PREFIX) for k in checkpoint_keys(path)):
        sd = load_state_dict(path, UNET_PREFIX)
    else:
        sd = load_state_dict(path)
        if any(k.startswith(UNET_PREFIX) for k in sd):  # a pickled single file
            sd = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in sd):
        from .unet_ldm import ldm_unet_to_diffusers  # the key map module imports this one (UNetConfig)

        sd = ldm_unet_to_diffusers(sd, cfg)
    return sd


def load_unet(path: str | os.PathLike, preset: str | UNetConfig = "sd15", dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """Build the UNet of `preset` and strictly load it, in eval mode (parameters still trainable).

    Args:
        path: an SD single file, a diffusers pipeline folder or its `unet/` folder (maybe sharded), or a
            UNet-only `.safetensors` / `.ckpt` in diffusers or LDM names.
        preset: a PRESETS name ("sd15", "sdxl", "digits") or a UNetConfig.
        dtype: float32, float16 or bfloat16.
    Raises:
        CheckpointError: missing path; missing / unexpected keys or wrong shapes (listed by name); a
            folder config.json describing another architecture than `preset`.
        ValueError: unknown preset name.
    """
    cfg, path = _unet_config(preset), Path(path)
    if path.is_dir() and (path / "unet").is_dir():
        path = path / "unet"
    raw = _read_json(path / "config.json") if path.is_dir() else None
    if raw is not None:
        found = unet_config_from_diffusers(raw)
        diff = [f"{f.name}: config.json {getattr(found, f.name)!r} vs preset {getattr(cfg, f.name)!r}"
                for f in dataclasses.fields(UNetConfig) if getattr(found, f.name) != getattr(cfg, f.name) and f.name != "prediction_type"]
        if diff:
            raise CheckpointError(f"{path / 'config.json'} does not match the UNet preset:\n    " + "\n    ".join(diff))
    what = f"UNet2DConditionModel ({preset if isinstance(preset, str) else 'custom config'}) from {path}"
    return build_loaded(UNet2DConditionModel, cfg, read_unet_weights(path, cfg), dtype, what)


def checkpoint_family(path: str | os.PathLike) -> str | None:
    """Which Stable Diffusion family a single file or diffusers folder holds: "sdxl", "sd15", "sd2" or None.

    Single file, by its tensor names: `conditioner.embedders.` or `model.diffusion_model.label_emb.` -> sdxl;
    `cond_stage_model.transformer.` -> sd15 (CLIP-L); `cond_stage_model.model.` -> sd2 (OpenCLIP-H).
    Folder: text_encoder_2/ or a unet/config.json with addition_embed_type "text_time" -> sdxl; a unet/ with
    text_encoder/ only -> sd15 (SD2 folders are told apart by the UNet's config check). None: unknown.
    """
    path = Path(path)
    if path.is_dir():
        unet = _read_json(path / "unet" / "config.json") or {}
        if (path / "text_encoder_2").is_dir() or unet.get("addition_embed_type") == "text_time":
            return "sdxl"
        return "sd15" if (path / "unet").is_dir() and (path / "text_encoder").is_dir() else None
    if not path.is_file():
        return None
    try:
        keys = checkpoint_keys(path)
    except (CheckpointError, OSError, RuntimeError):
        return None
    if any(k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.")) for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    return None
