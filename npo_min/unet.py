"""The Stable Diffusion 1.x UNet, in plain PyTorch; the digits model is the same code, smaller.

Module names mirror the diffusers `UNet2DConditionModel` layout (`unet/diffusion_pytorch_model.safetensors`
of `runwayml/stable-diffusion-v1-5`), so that folder loads with no key map; the original
single-file layout (`model.diffusion_model.*`) goes through one named map, `ldm_unet_to_diffusers`
in `npo_min/sd15.py`.

    x (B, C, H, W), t (B,) in 0..999, context (B, L, D)
    conv_in -> down_blocks [ResNet (+ cross-attention Transformer)] x layers, Downsample
            -> mid_block  ResNet, Transformer, ResNet
            -> up_blocks  [concat skip, ResNet (+ Transformer)] x (layers + 1), Upsample
            -> GroupNorm, SiLU, conv_out -> eps (B, C, H, W)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    cross_attn: tuple[bool, ...] = (True, True, True, False)  # per level: CrossAttn{Down,Up}Block2D or not
    layers_per_block: int = 2
    num_heads: int = 8  # diffusers calls this `attention_head_dim` in SD1.x configs
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    sample_size: int = 64  # latent (or pixel) side the model was trained at
    prediction_type: str = "epsilon"


PRESETS = {
    # runwayml/stable-diffusion-v1-5, unet/config.json
    "sd15": UNetConfig(),
    # The project's digits model (~1M parameters, sized for 2 CPU cores): 8x8 grey pixels,
    # levels 8x8 and 4x4, cross-attention over 4 class tokens of width 64 at 4x4 and in the middle.
    "digits": UNetConfig(
        in_channels=1, out_channels=1, block_out_channels=(32, 64), cross_attn=(False, True),
        layers_per_block=1, num_heads=4, cross_attention_dim=64, norm_num_groups=8, sample_size=8,
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
    """GroupNorm, 1x1 conv in, transformer blocks over the H*W tokens, 1x1 conv out, residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim, heads)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x, context):
        _, _, height, width = x.shape
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")  # (B, C, H, W) -> (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)  # (B, HW, C) -> (B, C, H, W)
        return self.proj_out(h) + x


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
    """eps-prediction UNet `f(x_t, t, context)` of Stable Diffusion 1.x (and of the digits model).

    Args:
        x: `(B, in_channels, H, W)` noisy sample x_t (SD: latents already scaled by 0.18215).
        t: `(B,)` or scalar timestep, integer-valued in 0..999 (float accepted).
        context: `(B, L, cross_attention_dim)` conditioning sequence for cross-attention
            (SD1.5: CLIP text hidden states, L = 77; digits: 4 class tokens).
    Returns:
        `(B, out_channels, H, W)`, the predicted noise eps.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        ch, n, layers = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        temb, g, heads, ctx = 4 * ch[0], cfg.norm_num_groups, cfg.num_heads, cfg.cross_attention_dim

        def attn(dim):
            return Transformer2DModel(dim, ctx, heads, g)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            resnets = [ResnetBlock2D(cin if j == 0 else cout, cout, temb, g) for j in range(layers)]
            attns = [attn(cout) for _ in range(layers)] if cfg.cross_attn[i] else []
            last = i == n - 1
            self.down_blocks.append(UNetBlock(resnets, attns, None if last else "downsamplers", Downsample2D(cout)))

        self.mid_block = UNetBlock([ResnetBlock2D(ch[-1], ch[-1], temb, g) for _ in range(2)], [attn(ch[-1])])

        self.up_blocks = nn.ModuleList()
        rev, rev_attn = ch[::-1], cfg.cross_attn[::-1]
        prev = rev[0]
        for i, cout in enumerate(rev):
            skip_in = rev[min(i + 1, n - 1)]  # channels of the deepest skip this level consumes
            resnets = [
                ResnetBlock2D((prev if j == 0 else cout) + (skip_in if j == layers else cout), cout, temb, g)
                for j in range(layers + 1)
            ]
            attns = [attn(cout) for _ in range(layers + 1)] if rev_attn[i] else []
            last = i == n - 1
            self.up_blocks.append(UNetBlock(resnets, attns, None if last else "upsamplers", Upsample2D(cout)))
            prev = cout

        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _run(self, module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        temb = self.time_embedding(timestep_embedding(t, self.cfg.block_out_channels[0]).to(x.dtype))
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
