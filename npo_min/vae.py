"""The Stable Diffusion VAE ("AutoencoderKL", Rombach et al. 2022, Sec. 3 and App. G), in plain PyTorch.

A KL-regularised autoencoder: pixels `(B, 3, H, W)` in [-1, 1] <-> latents `(B, 4, H/8, W/8)`.
The diffusion model works on `latents = scaling_factor * z`, scaled so they have roughly unit
variance (LDM Sec. 4.3.2: "rescale the latent by the component-wise std").

Module names mirror diffusers' `AutoencoderKL` (diffusers/models/autoencoders/autoencoder_kl.py,
autoencoders/vae.py `Encoder`/`Decoder`, unets/unet_2d_blocks.py `DownEncoderBlock2D`,
`UpDecoderBlock2D`, `UNetMidBlock2D`), so `vae/diffusion_pytorch_model.safetensors` loads
strictly with no key map. The original LDM / CompVis single-file layout (`first_stage_model.*` in
`v1-5-pruned-emaonly.safetensors`) maps onto these names through `ldm_vae_to_diffusers`.

Shape walk for SD1.5 at 512 px (block_out_channels (128, 256, 512, 512), layers_per_block 2):
  encoder: (B,3,512,512) -conv_in-> (B,128,512,512) -down_blocks-> 256, 128, 64, 64 px
           -mid_block-> (B,512,64,64) -conv_out-> (B,8,64,64) -quant_conv-> mean, logvar (B,4,64,64)
  decoder: (B,4,64,64) -post_quant_conv, conv_in-> (B,512,64,64) -mid_block, up_blocks->
           64, 128, 256, 512 px -conv_out-> (B,3,512,512)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from npo_min.checkpoint import CheckpointError, build_loaded, load_state_dict

LDM_PREFIX = "first_stage_model."  # where an SD single-file checkpoint keeps the VAE
NORM_EPS = 1e-6  # every GroupNorm in the VAE (diffusers resnet_eps=1e-6; LDM Normalize eps=1e-6)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one entry per resolution level
    layers_per_block: int = 2  # resnets per encoder level; the decoder uses layers_per_block + 1
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # latents = scaling_factor * z


PRESETS = {
    # stable-diffusion-v1-5/stable-diffusion-v1-5 vae/config.json (same as CompVis/stable-diffusion-v1-4);
    # that file has no scaling_factor entry, so it is diffusers' default 0.18215, which is
    # `scale_factor: 0.18215` in the original v1-inference.yaml.
    "sd15": VAEConfig(),
    # stabilityai/stable-diffusion-xl-base-1.0 vae/config.json: same architecture, "scaling_factor": 0.13025.
    # (That VAE overflows in float16: diffusers sets force_upcast=True. Use float32 or bfloat16.)
    "sdxl": VAEConfig(scaling_factor=0.13025),
}


# ----------------------------------------------------------------------------- building blocks


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 `conv_shortcut` when channels change.

    diffusers `ResnetBlock2D` with temb_channels=None; LDM `ResnetBlock` (its `nin_shortcut`).
    Dropout is 0 in every SD VAE, so it is left out.
    """

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual: x + to_out(softmax(qk^T/sqrt(C)) v).

    diffusers `Attention(heads=1, dim_head=C, norm_num_groups=groups, residual_connection=True)`;
    LDM `AttnBlock` stores q, k, v, proj_out as 1x1 convs, which are these Linear layers.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # "to_out.0", as diffusers names it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        t = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # (B, C, H, W) -> (B, HW, C)
        out = F.scaled_dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t))  # (B, HW, C), scale 1/sqrt(C)
        out = self.to_out[0](out)
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)  # (B, HW, C) -> (B, C, H, W)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (diffusers `UNetMidBlock2D`, LDM `mid`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one, then a 3x3 conv with stride 2 and no padding.

    The asymmetric (0, 1, 0, 1) pad is the LDM `Downsample(with_conv=True)` choice, kept by
    diffusers `Downsample2D(padding=0)`; (B, C, H, W) -> (B, C, H/2, W/2) for even H, W.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then a 3x3 conv (LDM `Upsample`, diffusers `Upsample2D`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """`n` resnets then an optional Downsample (diffusers `DownEncoderBlock2D`)."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    """`n` resnets then an optional Upsample (diffusers `UpDecoderBlock2D`)."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n)])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


# ----------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * latent_channels, H / 2^(L-1), W / 2^(L-1)): mean and logvar stacked."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, out_channels, h * 2^(L-1), w * 2^(L-1)); channels run in reverse."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The SD VAE: `encode` pixels to a diagonal Gaussian over z, `decode` z back to pixels.

    Layout (diffusers `AutoencoderKL`): encoder, quant_conv (1x1, 2z -> 2z), post_quant_conv
    (1x1, z -> z), decoder. This works on the *unscaled* z; see `encode_latents` / `decode_latents`
    for the scaled latents the diffusion model sees.
    """

    def __init__(self, cfg: VAEConfig = PRESETS["sd15"]):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def downscale(self) -> int:
        """Pixels per latent along H and W: 2^(number of levels - 1), 8 for SD."""
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z | x) = N(mean, exp(logvar)).

        Args:
            pixels: `(B, in_channels, H, W)` in [-1, 1], H and W multiples of `downscale` (8).
        Returns:
            `(mean, logvar)`, each `(B, latent_channels, H / 8, W / 8)`; logvar clamped to [-30, 20]
            (the LDM `DiagonalGaussianDistribution` clamp).
        Raises:
            ValueError: pixels is not 4-D with `in_channels` channels, or H, W are not multiples of 8.
        """
        if pixels.ndim != 4 or pixels.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected pixels (B, {self.cfg.in_channels}, H, W), got {tuple(pixels.shape)}")
        if pixels.shape[-2] % self.downscale or pixels.shape[-1] % self.downscale:
            raise ValueError(f"H and W must be multiples of {self.downscale}, got {tuple(pixels.shape[-2:])}")
        moments = self.quant_conv(self.encoder(pixels))  # (B, 2z, h, w)
        mean, logvar = moments.chunk(2, dim=1)  # (B, z, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled `z` `(B, latent_channels, h, w)` -> pixels `(B, out_channels, 8h, 8w)`, about [-1, 1] (not clamped).

        Raises:
            ValueError: z is not 4-D with `latent_channels` channels.
        """
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"expected z (B, {self.cfg.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))


def encode_latents(
    vae: AutoencoderKL, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pixels `(B, 3, H, W)` in [-1, 1] -> diffusion latents `scaling_factor * z`, `(B, 4, H/8, W/8)`.

    z is the posterior mean, or with `sample=True` a draw `mean + exp(logvar / 2) * eps`,
    eps ~ N(0, I) from `generator` (as diffusers' `latent_dist.sample(generator)`).
    Raises ValueError on a bad pixel shape (see `AutoencoderKL.encode`).
    """
    mean, logvar = vae.encode(pixels)
    z = mean
    if sample:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
    return z * vae.cfg.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents `(B, 4, h, w)` -> pixels `(B, 3, 8h, 8w)`, about [-1, 1] (not clamped).

    Computes `vae.decode(latents / scaling_factor)`. Raises ValueError on a bad latent shape.
    """
    return vae.decode(latents / vae.cfg.scaling_factor)


# ----------------------------------------------------------------------------- checkpoints

_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_vae_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original LDM / CompVis VAE state dict (prefix already removed) to the diffusers names.

    LDM (ldm/modules/diffusionmodules/model.py)    ->  diffusers / this file
      {en,de}coder.norm_out                        ->  {en,de}coder.conv_norm_out
      encoder.down.{i}.block.{j}                   ->  encoder.down_blocks.{i}.resnets.{j}
      encoder.down.{i}.downsample                  ->  encoder.down_blocks.{i}.downsamplers.0
      decoder.up.{i}.block.{j}                     ->  decoder.up_blocks.{L-1-i}.resnets.{j}
      decoder.up.{i}.upsample                      ->  decoder.up_blocks.{L-1-i}.upsamplers.0
        (LDM indexes the decoder levels by resolution, highest first; diffusers in execution order)
      *.mid.block_{1,2}                            ->  *.mid_block.resnets.{0,1}
      *.mid.attn_1.{norm,q,k,v,proj_out}           ->  *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
        (q, k, v, proj_out are 1x1 convs: weights (C, C, 1, 1) -> (C, C))
      nin_shortcut                                 ->  conv_shortcut
    Other keys pass through unchanged, so a stray key fails the strict load by name.
    """
    up_levels = {int(m[1]) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    last = max(up_levels, default=0)
    rules = [
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets."),
        (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
        (r"\.up\.(\d+)\.block\.", lambda m: f".up_blocks.{last - int(m[1])}.resnets."),
        (r"\.up\.(\d+)\.upsample\.", lambda m: f".up_blocks.{last - int(m[1])}.upsamplers.0."),
        (r"\.mid\.block_(\d+)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
        (r"\.mid\.attn_1\.(norm|q|k|v|proj_out)\.", lambda m: f".mid_block.attentions.0.{_LDM_ATTN[m[1]]}."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if ".attentions.0.to_" in key and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
        out[key] = value
    return out


def _is_ldm_layout(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.")) for k in sd)


def _check_folder_config(folder: Path, cfg: VAEConfig) -> None:
    """A diffusers folder's config.json must agree with the preset (shapes alone miss scaling_factor)."""
    file = folder / "config.json"
    if not file.exists():
        return
    found = json.loads(file.read_text())
    want = dataclasses.asdict(cfg)
    bad = [
        f"{k}: config.json {found[k]} vs preset {want[k]}"
        for k in want
        if found.get(k) is not None and (tuple(found[k]) if isinstance(found[k], list) else found[k]) != want[k]
    ]
    if bad:
        raise CheckpointError(f"{file} does not match the VAE preset:\n    " + "\n    ".join(bad))


def load_vae(
    path: str | os.PathLike, preset: str | VAEConfig = "sd15", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Build the `preset` VAE and strictly load weights from `path`, in eval mode.

    Args:
        path: a diffusers `vae/` folder (or the pipeline folder above it); a diffusers-layout
            `.safetensors` file; or an SD single-file checkpoint (`v1-5-pruned-emaonly.safetensors`,
            VAE under `first_stage_model.`, original LDM names), detected from its keys.
        preset: a `PRESETS` name ("sd15", "sdxl") or a `VAEConfig`. A single file cannot tell SD1.5
            from SDXL (same shapes, different scaling_factor): pick the preset that matches.
        dtype: parameter dtype after loading. The SDXL VAE overflows in float16.
    Raises:
        CheckpointError: path missing or unreadable; missing / unexpected keys or wrong shapes
            (listed by name); a folder's config.json disagreeing with the preset.
        ValueError: unknown preset name.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown VAE preset {preset!r}: choose one of {sorted(PRESETS)}")
        name, cfg = preset, PRESETS[preset]
    else:
        name, cfg = "custom", preset
    path = Path(path)
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    sd = load_state_dict(path)
    if any(k.startswith(LDM_PREFIX) for k in sd):  # SD single file: keep only the VAE
        sd = {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
    if _is_ldm_layout(sd):
        sd = ldm_vae_to_diffusers(sd)
    if path.is_dir():
        _check_folder_config(path, cfg)
    return build_loaded(AutoencoderKL, cfg, sd, dtype, f"AutoencoderKL (preset {name}) from {path}")
