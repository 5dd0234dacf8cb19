"""The CogVideoX 1.0 video diffusion transformer (2B and 5B), in plain PyTorch.

Yang et al. 2024, "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer" (arXiv 2408.06072).
Modules are named after diffusers' `CogVideoXTransformer3DModel` (the `transformer/` folder of
THUDM/CogVideoX-2b and -5b), so the folder loads with no key map:

    patch_embed.proj           Conv2d(C, D, 2, stride 2) applied to every latent frame
    patch_embed.text_proj      Linear(4096 -> D) on the T5 states
    time_embedding.linear_{1,2}   sinusoid(t) (D) -> 512 -> 512, SiLU between
    transformer_blocks.{i}.norm1 / norm2    LayerNormZero: LayerNorm(D) + Linear(512 -> 6 D)
    transformer_blocks.{i}.attn1.{to_q, to_k, to_v, to_out.0, norm_q, norm_k}
    transformer_blocks.{i}.ff.net.{0.proj, 2}   GELU-tanh FFN, 4 D wide
    norm_final, norm_out.{linear, norm}, proj_out   LayerNorm, AdaLayerNorm, Linear(D -> 4 C)

Data flow, x (B, F, C, H, W) latents (F latent frames = (frames - 1) / 4 + 1), t (B,), context (B, 226, 4096):

    video = patch conv per frame -> (B, F * H/2 * W/2, D), [text (226), video] attend jointly;
    2B: + fixed 3D sin-cos position embedding on the video tokens (not in the state dict);
    5B: 3D RoPE on the video tokens' q and k in every block;
    block: "expert" adaptive LayerNorm = one LayerNorm, separate (shift, scale, gate) for video
           and text tokens from the time embedding; joint attention with LayerNorm on q and k;
           FFN on the joint sequence; gated residuals;
    final LayerNorm, AdaLayerNorm(time), proj_out, unpatchify -> v prediction (B, F, C, H, W).

The model predicts v = alpha_t eps - sigma_t x0 (v-prediction; conversions in npo_min/schedule.py).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from npo_min.checkpoint import CheckpointError, build_loaded, load_state_dict
from npo_min.unet import TimestepEmbedding, timestep_embedding

# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class CogVideoXConfig:
    """Sizes of a CogVideoX 1.0 transformer. Field names are diffusers' config.json keys."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 30
    sample_width: int = 90  # latent width the fixed position embedding / RoPE crop is built for (720 px / 8)
    sample_height: int = 60  # latent height (480 px / 8)
    sample_frames: int = 49  # pixel frames (diffusers: "incorrectly" 49, i.e. 13 latent frames)
    patch_size: int = 2
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False  # False: 2B (sin-cos); True: 5B (3D RoPE)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def __post_init__(self):
        if self.inner_dim % 16:
            raise ValueError(f"heads x head_dim = {self.inner_dim} must be a multiple of 16 (3D sin-cos embedding).")
        if self.use_rotary_positional_embeddings and self.attention_head_dim % 16:
            raise ValueError(f"attention_head_dim {self.attention_head_dim} must be a multiple of 16 for the 3D RoPE split.")


# config.json keys diffusers accepts that this implementation supports only at one value.
FIXED_FIELDS = dict(flip_sin_to_cos=True, freq_shift=0, activation_fn="gelu-approximate", timestep_activation_fn="silu",
                    attention_bias=True, norm_elementwise_affine=True, dropout=0.0, patch_size_t=None,
                    ofs_embed_dim=None, use_learned_positional_embeddings=False, patch_bias=True)


def config_from_json(cfg: dict, where: str = "config.json") -> CogVideoXConfig:
    """Read a diffusers `transformer/config.json` dict.

    Raises:
        CheckpointError: an unknown field, or a supported field at an unsupported value (e.g.
            CogVideoX 1.5's patch_size_t, the I2V model's learned positional embeddings), named.
    """
    ours = {f.name for f in fields(CogVideoXConfig)}
    kw = {}
    for key, value in cfg.items():
        if key.startswith("_"):  # diffusers' metadata: _class_name, _diffusers_version, _name_or_path, ...
            continue
        if key in ours:
            kw[key] = value
        elif key in FIXED_FIELDS:
            if value != FIXED_FIELDS[key]:
                raise CheckpointError(f"{where}: {key}={value!r} is not supported (only {FIXED_FIELDS[key]!r}: "
                                      "CogVideoX 1.0 text-to-video 2B / 5B).")
        else:
            raise CheckpointError(f"{where}: unknown field {key!r}; not a CogVideoX 1.0 transformer config.")
    return CogVideoXConfig(**kw)


PRESETS: dict[str, CogVideoXConfig] = {
    # THUDM/CogVideoX-2b transformer/config.json (diffusers' defaults): 30 layers, 30 heads x 64 = 1920,
    # sin-cos positions. 1,693,783,872 parameters (diffusers' model on the meta device: the same).
    "cogvideox-2b": CogVideoXConfig(),
    # THUDM/CogVideoX-5b transformer/config.json: 42 layers, 48 heads x 64 = 3072, 3D RoPE.
    # 5,570,283,072 parameters (diffusers' model on the meta device: the same).
    "cogvideox-5b": CogVideoXConfig(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
    # Tiny random models for the tests (same code paths; 16-wide heads for the RoPE t/h/w split 4/6/6).
    "tiny-2b": CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                               time_embed_dim=24, text_embed_dim=40, num_layers=2, sample_width=12, sample_height=8,
                               sample_frames=9, max_text_seq_length=7),
    "tiny-5b": CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                               time_embed_dim=24, text_embed_dim=40, num_layers=2, sample_width=12, sample_height=8,
                               sample_frames=9, max_text_seq_length=7, use_rotary_positional_embeddings=True),
}


def get_config(preset: str | CogVideoXConfig) -> CogVideoXConfig:
    """A preset name from PRESETS or a config passed through. Raises ValueError on an unknown name."""
    if isinstance(preset, CogVideoXConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown CogVideoX preset {preset!r}: choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------------
# Position information


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """`[sin(p w), cos(p w)]`, w_i = 10000^(-i / (dim/2)); pos (M,) -> (M, dim) float64 (Vaswani et al. 2017)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = torch.outer(pos.double(), omega)  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_3d(cfg: CogVideoXConfig, frames: int, gh: int, gw: int, device=None) -> torch.Tensor:
    """The 2B model's fixed position embedding of the video tokens, `(frames * gh * gw, D)` float64.

    Channels: [temporal D/4 | spatial-w 3D/8 | spatial-h 3D/8], each a 1-D sin-cos table of the
    position divided by its interpolation scale (spatial 1.875, temporal 1.0). Tokens in (f, h, w)
    order. Built for the actual grid of every input (diffusers recomputes it whenever the input
    differs from sample_frames / sample_height / sample_width, so there is no crop or resize of a
    stored table: positions always start at 0, and 1.875 stays the spacing at every size).
    """
    D = cfg.inner_dim
    s = cfg.spatial_interpolation_scale
    w = sincos_1d(3 * D // 8, torch.arange(gw, dtype=torch.float32, device=device) / s)  # (gw, 3D/8)
    h = sincos_1d(3 * D // 8, torch.arange(gh, dtype=torch.float32, device=device) / s)  # (gh, 3D/8)
    t = sincos_1d(D // 4, torch.arange(frames, dtype=torch.float32, device=device) / cfg.temporal_interpolation_scale)
    emb = torch.cat([t[:, None, None].expand(-1, gh, gw, -1), w[None, None].expand(frames, gh, -1, -1),
                     h[None, :, None].expand(frames, -1, gw, -1)], dim=-1)  # (F, gh, gw, D)
    return rearrange(emb, "f h w d -> (f h w) d")


def resize_crop_region(gh: int, gw: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """CogVideoX pipeline's RoPE region: fit the (gh, gw) grid's aspect ratio into the (base_h, base_w)
    training grid (30 x 45 for 480 x 720), centred. Returns ((top, left), (bottom, right))."""
    if gh / gw > base_h / base_w:
        rh, rw = base_h, int(round(base_h / gh * gw))
    else:
        rh, rw = int(round(base_w / gw * gh)), base_w
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_3d(cfg: CogVideoXConfig, frames: int, gh: int, gw: int, device=None, theta: float = 10000.0):
    """The 5B model's 3D RoPE tables `(cos, sin)`, each `(frames * gh * gw, head_dim)` float32.

    The head is split t / h / w = hd/4, 3hd/8, 3hd/8 (16 / 24 / 24 for hd 64); each axis rotates
    interleaved pairs (x_{2i}, x_{2i+1}) by pos * theta^(-2i/dim). Spatial positions span the crop
    region of `resize_crop_region` with gh (gw) evenly spaced points from top to bottom * (gh-1)/gh,
    i.e. integer steps 0..29 / 0..44 at the 480 x 720 training size and fractional steps otherwise,
    exactly as diffusers' CogVideoX pipeline computes them (float32, torch.linspace).
    """
    hd = cfg.attention_head_dim
    base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
    (top, left), (bottom, right) = resize_crop_region(gh, gw, base_h, base_w)
    pos_h = torch.linspace(top, bottom * (gh - 1) / gh, gh, dtype=torch.float32, device=device)
    pos_w = torch.linspace(left, right * (gw - 1) / gw, gw, dtype=torch.float32, device=device)
    pos_t = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32, device=device)

    def angles(dim, pos):  # (M,) -> (M, dim/2)
        return torch.outer(pos, 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))

    at, ah, aw = angles(hd // 4, pos_t), angles(hd // 8 * 3, pos_h), angles(hd // 8 * 3, pos_w)
    ang = torch.cat([at[:, None, None].expand(-1, gh, gw, -1), ah[None, :, None].expand(frames, -1, gw, -1),
                     aw[None, None].expand(frames, gh, -1, -1)], dim=-1)  # (F, gh, gw, hd/2)
    ang = rearrange(ang, "f h w d -> (f h w) d").repeat_interleave(2, dim=-1)  # (N, hd): pair i -> dims 2i, 2i+1
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); x (B, h, N, hd), in fp32."""
    x0, x1 = rearrange(x, "... (d two) -> two ... d", two=2)
    rotated = rearrange(torch.stack([-x1, x0]), "two ... d -> ... (d two)")  # (B, h, N, hd)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Blocks


class CogVideoXPatchEmbed(nn.Module):
    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size)
        self.text_proj = nn.Linear(cfg.text_embed_dim, cfg.inner_dim)


class CogVideoXLayerNormZero(nn.Module):
    """Expert adaptive LayerNorm: one LayerNorm, separate (shift, scale, gate) for video and text tokens."""

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.time_embed_dim, 6 * cfg.inner_dim)
        self.norm = nn.LayerNorm(cfg.inner_dim, eps=cfg.norm_eps)

    def forward(self, video, text, emb):
        """video (B, N, D), text (B, L, D), emb (B, E) -> normed video, normed text, gates (B, 1, D) x 2."""
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(emb))[:, None].chunk(6, dim=-1)  # (B, 1, D)
        return (self.norm(video) * (1 + scale) + shift, self.norm(text) * (1 + t_scale) + t_shift, gate, t_gate)


class Attention(nn.Module):
    """Joint self-attention over [text, video] with LayerNorm(head_dim) on q and k; RoPE on video q/k (5B)."""

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        D, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.norm_q = nn.LayerNorm(hd, eps=1e-6)
        self.norm_k = nn.LayerNorm(hd, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])

    def forward(self, x: torch.Tensor, text_len: int, rope=None) -> torch.Tensor:
        """x (B, L + N, D) -> (B, L + N, D); rope = (cos, sin) (N, head_dim) or None."""
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads) for p in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:  # text tokens keep no position; video tokens rotate
            q = torch.cat([q[:, :, :text_len], apply_rope(q[:, :, text_len:], *rope)], dim=2)
            k = torch.cat([k[:, :, :text_len], apply_rope(k[:, :, text_len:], *rope)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L + N, d), scale 1/sqrt(d)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])  # 1 = dropout slot

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class CogVideoXBlock(nn.Module):
    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        self.norm1 = CogVideoXLayerNormZero(cfg)
        self.attn1 = Attention(cfg)
        self.norm2 = CogVideoXLayerNormZero(cfg)
        self.ff = FeedForward(cfg.inner_dim)

    def forward(self, video, text, emb, rope=None):
        """video (B, N, D), text (B, L, D), emb (B, E) -> updated (video, text)."""
        L = text.shape[1]
        nv, nt, gate, t_gate = self.norm1(video, text, emb)
        out = self.attn1(torch.cat([nt, nv], dim=1), L, rope)  # (B, L + N, D)
        video, text = video + gate * out[:, L:], text + t_gate * out[:, :L]
        nv, nt, gate, t_gate = self.norm2(video, text, emb)
        out = self.ff(torch.cat([nt, nv], dim=1))
        return video + gate * out[:, L:], text + t_gate * out[:, :L]


class AdaLayerNorm(nn.Module):
    """Final adaptive LayerNorm: LayerNorm(x) (1 + scale) + shift, (shift, scale) = Linear(SiLU(emb))."""

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.time_embed_dim, 2 * cfg.inner_dim)
        self.norm = nn.LayerNorm(cfg.inner_dim, eps=cfg.norm_eps)

    def forward(self, x, emb):
        shift, scale = self.linear(F.silu(emb))[:, None].chunk(2, dim=-1)  # (B, 1, D) each; shift first
        return self.norm(x) * (1 + scale) + shift


class CogVideoXTransformer3DModel(nn.Module):
    """CogVideoX 1.0 text-to-video transformer: `(x, t, context) -> v`.

    Args of forward:
        x: `(B, F, C, H, W)` scaled VAE latents at timestep t (F latent frames, H and W even).
        t: `(B,)` timesteps in 0..999 (integer or float).
        context: `(B, L, text_embed_dim)` T5 states (L = 226 in the CogVideoX pipeline; the 2B position
            embedding covers only video tokens here, so L is free, where diffusers' 2B needs L = 226).
    Returns:
        `(B, F, C_out, H, W)` v prediction (v = alpha_t eps - sigma_t x0).
    Raises:
        ValueError: wrong ranks / channels, odd H or W.
    """

    def __init__(self, cfg: str | CogVideoXConfig = "cogvideox-2b"):
        super().__init__()
        self.cfg = cfg = get_config(cfg)
        D = cfg.inner_dim
        self.patch_embed = CogVideoXPatchEmbed(cfg)
        self.time_embedding = TimestepEmbedding(D, cfg.time_embed_dim)
        self.transformer_blocks = nn.ModuleList([CogVideoXBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_final = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.norm_out = AdaLayerNorm(cfg)
        self.proj_out = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        cfg, p = self.cfg, self.cfg.patch_size
        if x.ndim != 5 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"x must be (B, F, {cfg.in_channels}, H, W) latents; got {tuple(x.shape)}.")
        B, Fr, _, H, W = x.shape
        if H % p or W % p:
            raise ValueError(f"latent height and width must be multiples of {p}; got {H} x {W}.")
        if context.ndim != 3 or context.shape[-1] != cfg.text_embed_dim:
            raise ValueError(f"context must be (B, L, {cfg.text_embed_dim}); got {tuple(context.shape)}.")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        emb = self.time_embedding(timestep_embedding(t, cfg.inner_dim).to(x.dtype))  # (B, time_embed_dim)
        text = self.patch_embed.text_proj(context)  # (B, L, D)
        video = self.patch_embed.proj(rearrange(x, "b f c h w -> (b f) c h w"))  # (B F, D, H/p, W/p)
        video = rearrange(video, "(b f) d h w -> b (f h w) d", b=B)  # (B, N, D), N = F H W / p^2
        gh, gw = H // p, W // p
        rope = None
        if cfg.use_rotary_positional_embeddings:
            rope = rope_3d(cfg, Fr, gh, gw, x.device)
        else:
            video = video + sincos_3d(cfg, Fr, gh, gw, x.device).to(video.dtype)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                video, text = torch.utils.checkpoint.checkpoint(block, video, text, emb, rope, use_reentrant=False)
            else:
                video, text = block(video, text, emb, rope)
        video = self.proj_out(self.norm_out(self.norm_final(video), emb))  # (B, N, C p p)
        return rearrange(video, "b (f h w) (c p q) -> b f c (h p) (w q)", f=Fr, h=gh, w=gw, p=p, q=p)


# ----------------------------------------------------------------------------------------------
# Loading


def _describe(cfg: CogVideoXConfig) -> str:
    return f"D={cfg.inner_dim}, {cfg.num_layers} layers"


def load_transformer(path: str | os.PathLike, preset: str | CogVideoXConfig | None = None,
                     dtype: torch.dtype = torch.float32) -> CogVideoXTransformer3DModel:
    """Load a diffusers `transformer/` folder (sharded or not) or one `.safetensors` file.

    Args:
        path: folder with config.json and diffusion_pytorch_model*.safetensors, or a file.
        preset: "cogvideox-2b" / "cogvideox-5b" / a config; None = the folder's config.json.
        dtype: float32 or bfloat16 (the official weights are bf16).

    Raises:
        CheckpointError: a config.json field differing from the preset (named), an unsupported
            config field, a checkpoint of another size (e.g. 2B weights with the 5B preset: one line
            with both sizes), or missing / unexpected keys.
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
            raise CheckpointError(f"{cfg_file} does not match preset {preset}: {', '.join(diff)}. "
                                  "Use the preset of this checkpoint.")
    sd = load_state_dict(path)
    w = sd.get("patch_embed.proj.weight")
    layers = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    if w is not None and (w.shape[0] != cfg.inner_dim or layers != cfg.num_layers):
        raise CheckpointError(f"{path} holds a transformer with D={w.shape[0]}, {layers} layers but the preset "
                              f"{preset or 'config.json'} has {_describe(cfg)}: 2B = D 1920 / 30 layers, "
                              "5B = D 3072 / 42 layers; use the matching --model preset.")
    return build_loaded(CogVideoXTransformer3DModel, cfg, sd, dtype, "CogVideoXTransformer3DModel")
