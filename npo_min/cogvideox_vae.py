"""CogVideoX's causal 3D VAE (AutoencoderKLCogVideoX), in plain PyTorch.

Yang et al. 2024, "CogVideoX" (arXiv 2408.06072), Sec. 2.1 "3D causal VAE". Modules are named after
diffusers' `AutoencoderKLCogVideoX` (the `vae/` folder of THUDM/CogVideoX-2b / -5b), so it loads with no
key map:

    encoder.conv_in.conv, encoder.down_blocks.{i}.resnets.{j}.{norm1, conv1.conv, norm2, conv2.conv, conv_shortcut},
    encoder.down_blocks.{i}.downsamplers.0.conv, encoder.mid_block.resnets.{0,1}, encoder.norm_out, encoder.conv_out.conv
    decoder.conv_in.conv, decoder.mid_block.resnets.{0,1}, decoder.up_blocks.{i}.resnets.{j}, decoder.up_blocks.{i}.upsamplers.0.conv,
    decoder.norm_out.{norm_layer, conv_y.conv, conv_b.conv}, decoder.conv_out.conv
    (decoder norms are SpatialNorm3D: norm1/norm2.{norm_layer, conv_y.conv, conv_b.conv}); no quant convs.

Video layout in the VAE: (B, C, F, H, W), pixels in [-1, 1]. F = 4k + 1 frames <-> k + 1 latent frames
(the first frame is kept alone by every temporal down/upsampling: an image is a 1-frame video), spatial /8,
16 latent channels; latents are multiplied by `scaling_factor` (1.15258426 for 2B, 0.7 for 5B) before the
transformer, which wants (B, F, C, H, W).

Causal conv3d (kernel 3): time is padded on the left only, with 2 copies of the first frame (no zeros),
so frame f sees frames <= f; height and width are zero-padded by 1.

Chunked encode / decode, as diffusers does it (the results depend on it, so it is part of the model):
the encoder runs on chunks of 8 pixel frames (the first chunk takes the F mod 8 remainder: 49 = 9 + 5 x 8),
the decoder on chunks of 2 latent frames (13 = 3 + 5 x 2). Between chunks, every causal conv carries the
last 2 frames of its padded input over to the next chunk (instead of first-frame padding), so the convs
see the whole past. GroupNorm statistics, however, are computed per chunk (over the chunk's frames),
and the temporal down/upsampling keeps the first frame of every odd-length chunk alone: the output is
not what one pass over all frames would give, and matching diffusers means chunking the same way.
Spatial tiling (diffusers' enable_tiling) is not implemented: it only saves memory, and results with
tiling differ from results without (diffusers' pipeline does not enable it by default). diffusers'
CogVideoXSafeConv3d, which splits a conv input over 2 GiB into overlapping time slices, is also left out:
the split is exact (same result), and at 49 frames 480 x 720 the largest conv input of a chunk is
128 x 9 x 480 x 720 (0.74 GiB in bf16), under its threshold.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from npo_min.checkpoint import CheckpointError, build_loaded, load_state_dict


@dataclass(frozen=True)
class CogVideoXVAEConfig:
    """Sizes of AutoencoderKLCogVideoX. Field names are diffusers' config.json keys."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    scaling_factor: float = 1.15258426

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# config.json keys supported only at one value; keys read but irrelevant here (tiling size, upcast hint).
FIXED_FIELDS = dict(act_fn="silu", use_quant_conv=False, use_post_quant_conv=False, shift_factor=None,
                    latents_mean=None, latents_std=None, invert_scale_latents=False)
IRRELEVANT_FIELDS = ("sample_height", "sample_width", "force_upcast")


def config_from_json(cfg: dict, where: str = "config.json") -> CogVideoXVAEConfig:
    """Read a diffusers `vae/config.json` dict.

    Raises:
        CheckpointError: an unknown field, or a field at a value this module does not implement, named.
    """
    ours = {f.name for f in fields(CogVideoXVAEConfig)}
    kw = {}
    for key, value in cfg.items():
        if key.startswith("_") or key in IRRELEVANT_FIELDS:
            continue
        if key in ("down_block_types", "up_block_types"):
            want = "CogVideoXDownBlock3D" if key.startswith("down") else "CogVideoXUpBlock3D"
            if any(v != want for v in value):
                raise CheckpointError(f"{where}: {key}={value} is not supported (only {want}).")
        elif key in ours:
            kw[key] = tuple(value) if isinstance(value, list) else value
        elif key in FIXED_FIELDS:
            if value != FIXED_FIELDS[key]:
                raise CheckpointError(f"{where}: {key}={value!r} is not supported (only {FIXED_FIELDS[key]!r}).")
        else:
            raise CheckpointError(f"{where}: unknown field {key!r}; not a CogVideoX VAE config.")
    return CogVideoXVAEConfig(**kw)


PRESETS: dict[str, CogVideoXVAEConfig] = {
    # THUDM/CogVideoX-2b vae/config.json (diffusers' defaults). 215,583,907 parameters (= diffusers on meta).
    "cogvideox-2b": CogVideoXVAEConfig(),
    # THUDM/CogVideoX-5b vae/config.json: the same network, latents scaled by 0.7.
    "cogvideox-5b": CogVideoXVAEConfig(scaling_factor=0.7),
    # Tiny random model for the tests: 4 levels (spatial / 8, time / 4) like the real one.
    "tiny": CogVideoXVAEConfig(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4),
}


def get_config(preset: str | CogVideoXVAEConfig) -> CogVideoXVAEConfig:
    if isinstance(preset, CogVideoXVAEConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown CogVideoX VAE preset {preset!r}: choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------------
# Layers. `cache` is a dict {causal conv module: last 2 frames of its padded input} shared by one
# encode or decode call across its chunks; an empty dict means "first chunk".


class CausalConv3d(nn.Module):
    """Conv3d (k, k, k), stride 1: left time padding of k - 1 frames (the first frame repeated, or the
    previous chunk's last frames from `cache`), zero padding k // 2 in height and width."""

    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__()
        self.k = k
        self.conv = nn.Conv3d(cin, cout, k, padding=(0, k // 2, k // 2))

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        if self.k > 1:
            past = cache.get(self)
            if past is None:
                past = x[:, :, :1].expand(-1, -1, self.k - 1, -1, -1)  # (B, C, k-1, H, W): frame 0 repeated
            x = torch.cat([past, x], dim=2)  # (B, C, k-1 + F, H, W)
            cache[self] = x[:, :, -(self.k - 1):].clone()
        return self.conv(x)


class SpatialNorm3D(nn.Module):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq = latents resized (nearest) to f's size
    (Zheng et al. 2022, "MoVQ", Eq. 5). For an odd frame count > 1 the first latent frame is resized
    alone to the first frame and the rest to the rest (causal time layout)."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, f_channels, eps=1e-6)
        self.conv_y = CausalConv3d(zq_channels, f_channels, k=1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, k=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor, cache: dict) -> torch.Tensor:
        T = f.shape[2]
        if T > 1 and T % 2 == 1:
            zq = torch.cat([F.interpolate(zq[:, :, :1], size=(1, *f.shape[-2:])),
                            F.interpolate(zq[:, :, 1:], size=(T - 1, *f.shape[-2:]))], dim=2)
        else:
            zq = F.interpolate(zq, size=f.shape[-3:])
        return self.norm_layer(f) * self.conv_y(zq, cache) + self.conv_b(zq, cache)


class ResnetBlock3D(nn.Module):
    """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), 1x1x1 shortcut when channels change; norms are
    GroupNorm (encoder) or SpatialNorm3D on the latents (decoder)."""

    def __init__(self, cin: int, cout: int, cfg: CogVideoXVAEConfig, zq_channels: int | None = None):
        super().__init__()
        g = cfg.norm_num_groups
        if zq_channels is None:
            self.norm1, self.norm2 = nn.GroupNorm(g, cin, eps=cfg.norm_eps), nn.GroupNorm(g, cout, eps=cfg.norm_eps)
        else:
            self.norm1, self.norm2 = SpatialNorm3D(cin, zq_channels, g), SpatialNorm3D(cout, zq_channels, g)
        self.conv1 = CausalConv3d(cin, cout)
        self.conv2 = CausalConv3d(cout, cout)
        if cin != cout:
            self.conv_shortcut = nn.Conv3d(cin, cout, 1)

    def _norm(self, norm, x, zq, cache):
        return norm(x, zq, cache) if zq is not None else norm(x)

    def forward(self, x: torch.Tensor, cache: dict, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, zq, cache)), cache)
        h = self.conv2(F.silu(self._norm(self.norm2, h, zq, cache)), cache)
        return h + (self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x)


class Downsample3D(nn.Module):
    """Optional time /2 (average of frame pairs, an odd count keeps frame 0 alone), then per frame
    zero-pad right/bottom by 1 and Conv2d(3, stride 2): (B, C, T, H, W) -> (B, C, T', H/2, W/2)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        if self.compress_time:
            first, rest = (x[:, :, :1], x[:, :, 1:]) if x.shape[2] % 2 else (x[:, :, :0], x)
            rest = rearrange(rest, "b c (t two) h w -> b c t two h w", two=2).mean(dim=3)  # (B, C, T/2, H, W)
            x = torch.cat([first, rest], dim=2)
        x = rearrange(F.pad(x, (0, 1, 0, 1)), "b c t h w -> (b t) c h w")
        return rearrange(self.conv(x), "(b t) c h w -> b c t h w", b=B)


class Upsample3D(nn.Module):
    """Nearest x2 in space, and in time when compress_time (an odd count > 1 keeps frame 0 single:
    T -> 2T - 1), then per-frame Conv2d(3, padding 1)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[0], x.shape[2]
        if self.compress_time and T > 1:
            if T % 2:
                first = F.interpolate(x[:, :, 0], scale_factor=2.0)[:, :, None]  # (B, C, 1, 2H, 2W)
                x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)  # (B, C, 2T - 1, 2H, 2W)
            else:
                x = F.interpolate(x, scale_factor=2.0)  # (B, C, 2T, 2H, 2W)
        else:
            x = rearrange(F.interpolate(rearrange(x, "b c t h w -> (b t) c h w"), scale_factor=2.0),
                          "(b t) c h w -> b c t h w", b=B)
        x = self.conv(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(x, "(b t) c h w -> b c t h w", b=B)


class DownBlock3D(nn.Module):
    def __init__(self, cin, cout, cfg, add_downsample: bool, compress_time: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(cin if j == 0 else cout, cout, cfg) for j in range(cfg.layers_per_block)])
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample3D(cout, compress_time)])

    def forward(self, x, cache):
        for r in self.resnets:
            x = r(x, cache)
        return self.downsamplers[0](x) if hasattr(self, "downsamplers") else x


class UpBlock3D(nn.Module):
    def __init__(self, cin, cout, cfg, add_upsample: bool, compress_time: bool):
        super().__init__()
        z = cfg.latent_channels
        self.resnets = nn.ModuleList([ResnetBlock3D(cin if j == 0 else cout, cout, cfg, z) for j in range(cfg.layers_per_block + 1)])
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample3D(cout, compress_time)])

    def forward(self, x, cache, zq):
        for r in self.resnets:
            x = r(x, cache, zq)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class MidBlock3D(nn.Module):
    def __init__(self, ch, cfg, zq_channels=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(ch, ch, cfg, zq_channels) for _ in range(2)])

    def forward(self, x, cache, zq=None):
        for r in self.resnets:
            x = r(x, cache, zq)
        return x


class Encoder3D(nn.Module):
    def __init__(self, cfg: CogVideoXVAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        n_time = int(math.log2(cfg.temporal_compression_ratio))  # the first n_time levels also halve time
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.down_blocks = nn.ModuleList([
            DownBlock3D(ch[max(i - 1, 0)], ch[i], cfg, add_downsample=i < len(ch) - 1, compress_time=i < n_time)
            for i in range(len(ch))])
        self.mid_block = MidBlock3D(ch[-1], cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)

    def forward(self, x, cache):
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, 2 latent, T', H/8, W/8): mean, logvar


class Decoder3D(nn.Module):
    def __init__(self, cfg: CogVideoXVAEConfig):
        super().__init__()
        ch = list(reversed(cfg.block_out_channels))
        z = cfg.latent_channels
        n_time = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(z, ch[0])
        self.mid_block = MidBlock3D(ch[0], cfg, z)
        self.up_blocks = nn.ModuleList([
            UpBlock3D(ch[max(i - 1, 0)], ch[i], cfg, add_upsample=i < len(ch) - 1, compress_time=i < n_time)
            for i in range(len(ch))])
        self.norm_out = SpatialNorm3D(ch[-1], z, cfg.norm_num_groups)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def forward(self, z, cache):
        x = self.mid_block(self.conv_in(z, cache), cache, z)
        for block in self.up_blocks:
            x = block(x, cache, z)
        return self.conv_out(F.silu(self.norm_out(x, z, cache)), cache)


def frame_chunks(num_frames: int, size: int) -> list[tuple[int, int]]:
    """diffusers' frame batching: max(n // size, 1) chunks of `size`, the first one also taking the
    n mod size remainder; e.g. (49, 8) -> [0, 9), [9, 17), ..., [41, 49); (13, 2) -> [0, 3), [3, 5), ..."""
    rem = num_frames % size
    n = max(num_frames // size, 1)
    return [(size * i + (0 if i == 0 else rem), min(size * (i + 1) + rem, num_frames)) for i in range(n)]


class AutoencoderKLCogVideoX(nn.Module):
    """CogVideoX's causal 3D VAE: `encode` (B, 3, 4k+1, H, W) pixels in [-1, 1] -> (mean, logvar)
    (B, 16, k+1, H/8, W/8); `decode` (B, 16, k+1, h, w) unscaled latents -> (B, 3, 4k+1, 8h, 8w).

    Chunking: encode 8 pixel frames, decode 2 latent frames at a time (see the module docstring).

    Raises:
        ValueError: a frame count that is not 4k + 1, or H / W not multiples of 8.
    """

    sample_frames_per_chunk = 8  # diffusers: num_sample_frames_batch_size
    latent_frames_per_chunk = 2  # diffusers: num_latent_frames_batch_size

    def __init__(self, cfg: str | CogVideoXVAEConfig = "cogvideox-2b"):
        super().__init__()
        self.cfg = get_config(cfg)
        self.encoder = Encoder3D(self.cfg)
        self.decoder = Decoder3D(self.cfg)

    @property
    def scaling_factor(self) -> float:
        return self.cfg.scaling_factor

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance (clamped to [-30, 20]) of the latents, each (B, 16, k+1, H/8, W/8)."""
        r, s = self.cfg.temporal_compression_ratio, self.cfg.spatial_compression
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"video must be (B, {self.cfg.in_channels}, F, H, W); got {tuple(x.shape)}.")
        Fr, H, W = x.shape[2:]
        if (Fr - 1) % r:
            raise ValueError(f"frame count {Fr} is not {r}k + 1 (e.g. 9, 13, 49): trim the clip to {Fr - (Fr - 1) % r} frames.")
        if H % s or W % s:
            raise ValueError(f"video height and width must be multiples of {s}; got {H} x {W}.")
        cache: dict = {}
        h = torch.cat([self.encoder(x[:, :, a:b], cache) for a, b in frame_chunks(Fr, self.sample_frames_per_chunk)], dim=2)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, F, 8h, 8w), about [-1, 1] (not clamped), from unscaled latents (B, 16, n, h, w).

        F = 4(n-1) + 1 for odd n (13 latent frames -> 49). For even n every 2-frame chunk is even, no
        frame is kept single, and F = 4n (4 latent frames of a 13-frame clip decode to 16 frames):
        diffusers' behaviour, kept for parity; trim to the first 4(n-1)+1 frames if needed.
        """
        if z.ndim != 5 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"latents must be (B, {self.cfg.latent_channels}, F, h, w) (VAE layout); got {tuple(z.shape)}.")
        cache: dict = {}
        return torch.cat([self.decoder(z[:, :, a:b], cache) for a, b in frame_chunks(z.shape[2], self.latent_frames_per_chunk)], dim=2)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, I)."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise


def load_vae(path: str | os.PathLike, preset: str | CogVideoXVAEConfig | None = None,
             dtype: torch.dtype = torch.float32) -> AutoencoderKLCogVideoX:
    """Load a diffusers `vae/` folder (or one `.safetensors` file).

    Raises:
        CheckpointError: a config.json field differing from the preset (named; the 2B and 5B VAEs differ
            only in scaling_factor, so without a config.json the weights cannot tell them apart), an
            unsupported field, or missing / unexpected keys.
    """
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else None
    file_cfg = config_from_json(json.loads(cfg_file.read_text()), str(cfg_file)) if cfg_file and cfg_file.exists() else None
    if preset is None:
        if file_cfg is None:
            raise CheckpointError(f"{path}: no config.json; pass a preset ('cogvideox-2b' or 'cogvideox-5b').")
        cfg = file_cfg
    else:
        cfg = get_config(preset)
        if file_cfg is not None and file_cfg != cfg:
            diff = [f"{f.name}={getattr(file_cfg, f.name)} (preset {getattr(cfg, f.name)})" for f in fields(cfg)
                    if getattr(file_cfg, f.name) != getattr(cfg, f.name)]
            raise CheckpointError(f"{cfg_file} does not match VAE preset {preset}: {', '.join(diff)}.")
    return build_loaded(AutoencoderKLCogVideoX, cfg, load_state_dict(path), dtype, "AutoencoderKLCogVideoX")
