"""The CogVideoX 1.0 text-to-video family (2B and 5B): v-prediction transformer (cogvideox.py), causal 3D VAE
(cogvideox_vae.py), T5 v1.1 XXL encoder and its SentencePiece tokenizer (t5.py), loaded from the official
diffusers folder (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b):

    text_encoder/   config.json + model-0000N-of-0000M.safetensors (sharded T5 encoder, transformers names)
    tokenizer/      tokenizer.json (the folder ships spiece.model: convert once, see npo_min/t5.py T5Tokenizer)
    transformer/    config.json + diffusion_pytorch_model*.safetensors
    vae/            config.json + diffusion_pytorch_model.safetensors
    scheduler/      scheduler_config.json (CogVideoXDDIMScheduler: v_prediction, snr_shift_scale, zero terminal SNR)

Sampling, as diffusers' CogVideoXPipeline: x_T (B, 13, 16, 60, 90) for 49 frames at 480 x 720, CFG on v with
the negative prompt T5("") (scale 6), 50 DDIM steps, "trailing" spacing, set_alpha_to_one, then
`vae.decode(x0 / scaling_factor)`. Self-NPO trains the transformer on VAE latents of real clips (TDFT, the same
step as the image families, with v converted to x0 / eps through the schedule).

T5-XXL is 19 GB in fp32: `text_dtype=torch.bfloat16` loads it in bf16 (9.5 GB, what the official pipeline
runs), and `release_text_encoder()` frees it once the prompts are encoded (sample.py and train.py do).
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange

from ..checkpoint import CheckpointError, load_state_dict
from ..cogvideox import PRESETS as TR_PRESETS, CogVideoXConfig, CogVideoXTransformer3DModel, load_transformer
from ..cogvideox_vae import PRESETS as VAE_PRESETS, AutoencoderKLCogVideoX, CogVideoXVAEConfig, load_vae
from ..data import clip_caption_pairs, load_clip, shuffled_batches
from ..schedule import NoiseSchedule
from ..t5 import PRESETS as T5_PRESETS, T5Config, T5EncoderModel, T5Tokenizer, load_text_encoder
from . import Pipeline


@dataclass(frozen=True)
class CogVideoXFamilyConfig:
    transformer: CogVideoXConfig
    vae: CogVideoXVAEConfig
    text: T5Config
    snr_shift_scale: float  # the scheduler's SNR shift (scheduler_config.json)


PRESETS = {
    # THUDM/CogVideoX-2b: transformer/ vae/ text_encoder/ scheduler/ config files (scheduler: snr_shift_scale 3.0).
    "cogvideox-2b": CogVideoXFamilyConfig(TR_PRESETS["cogvideox-2b"], VAE_PRESETS["cogvideox-2b"], T5_PRESETS["t5-v1_1-xxl"], 3.0),
    # THUDM/CogVideoX-5b (scheduler: snr_shift_scale 1.0; VAE scaling 0.7; 3D RoPE).
    "cogvideox-5b": CogVideoXFamilyConfig(TR_PRESETS["cogvideox-5b"], VAE_PRESETS["cogvideox-5b"], T5_PRESETS["t5-v1_1-xxl"], 1.0),
}

# scheduler_config.json values this implementation reproduces (CogVideoXDDIMScheduler as released), and the
# defaults diffusers' CogVideoXDDIMScheduler fills in for absent keys (a missing prediction_type means epsilon).
SCHEDULER_FIXED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, trained_betas=None,
                       clip_sample=False)
SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon", rescale_betas_zero_snr=False, set_alpha_to_one=True, trained_betas=None,
                          clip_sample=True, snr_shift_scale=3.0)


def get_config(config: str | CogVideoXFamilyConfig) -> CogVideoXFamilyConfig:
    """A PRESETS name or a CogVideoXFamilyConfig passed through. Raises ValueError on an unknown name."""
    if isinstance(config, CogVideoXFamilyConfig):
        return config
    if config not in PRESETS:
        raise ValueError(f"unknown CogVideoX config {config!r}: choose one of {sorted(PRESETS)}.")
    return PRESETS[config]


def read_scheduler_config(folder: Path) -> float | None:
    """`snr_shift_scale` of `folder/scheduler/scheduler_config.json` (None if the file is absent).

    Absent keys take diffusers' CogVideoXDDIMScheduler defaults. The timestep spacing is not read from it:
    it is sample.py's --spacing ("trailing" by default, the released value).

    Raises:
        CheckpointError: a field this implementation does not reproduce (named, with the supported value).
    """
    file = folder / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return None
    cfg = {**SCHEDULER_DEFAULTS, **json.loads(file.read_text())}
    for key, value in SCHEDULER_FIXED.items():
        if cfg[key] != value:
            raise CheckpointError(f"{file}: {key}={cfg[key]!r} is not supported (only {value!r}, the released CogVideoX "
                                  "scheduler).")
    return float(cfg["snr_shift_scale"])


class CogVideoXPipe(Pipeline):
    """Transformer (trainable), VAE and T5 (frozen), tokenizer. Prompts are text; c' = T5("")."""

    latent_scale = 8
    prediction_type = "v_prediction"
    set_alpha_to_one = True
    lora_prefix = "transformer"  # diffusers' CogVideoXPipeline.transformer
    video = True

    def __init__(self, transformer: CogVideoXTransformer3DModel, vae: AutoencoderKLCogVideoX, text_encoder: T5EncoderModel,
                 tokenizer: T5Tokenizer, snr_shift_scale: float, name: str, text_dtype: torch.dtype | None = None):
        self.denoiser, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        self.schedule = NoiseSchedule.cogvideox(snr_shift_scale)
        self.snr_shift_scale, self.name, self.text_dtype = snr_shift_scale, name, text_dtype
        self.latent_scale = vae.cfg.spatial_compression
        self._null: torch.Tensor | None = None

    # ---- text

    @torch.no_grad()
    def encode(self, prompts):
        """Prompts -> T5 last hidden states `(B, 226, 4096)` in the transformer's dtype ("" gives c')."""
        if self.text_encoder is None:
            raise RuntimeError("the T5 encoder was released (release_text_encoder); encode every prompt before that.")
        device = next(self.text_encoder.parameters()).device
        out = self.text_encoder(self.tokenizer(prompts).to(device))
        return out.to(next(self.denoiser.parameters()).dtype)

    def null_cond(self, n):
        """T5 of the empty prompt (the CogVideoX pipeline's default negative prompt), computed once, batch n."""
        if self._null is None or self._null.dtype != next(self.denoiser.parameters()).dtype:
            self._null = self.encode([""])
        return self._null.expand(n, -1, -1)

    def release_text_encoder(self) -> None:
        """Drop T5 (19 GB fp32 / 9.5 GB bf16); c' stays cached. Later `encode` calls raise RuntimeError."""
        if self.text_encoder is not None:
            self.null_cond(1)
            self.text_encoder = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def to(self, device, dtype=None):
        """Move every module; T5 keeps `text_dtype` when one was given at load."""
        self.denoiser.to(device, dtype)
        self.vae.to(device, dtype)
        if self.text_encoder is not None:
            self.text_encoder.to(device, self.text_dtype or dtype)
        if self._null is not None:
            self._null = self._null.to(device, dtype)
        return self

    # ---- video latents

    def check_frames(self, num_frames: int) -> int:
        """Latent frames for `num_frames` pixel frames. Raises ValueError: not 4k + 1 (or < 1)."""
        r = self.vae.cfg.temporal_compression_ratio
        if num_frames < 1 or (num_frames - 1) % r:
            raise ValueError(f"--num-frames {num_frames} is not {r}k + 1: CogVideoX makes 4k + 1 frames (e.g. 9, 13, 49).")
        return (num_frames - 1) // r + 1

    def noise_shape(self, height, width, num_frames=49):
        """Shape of one x_T `(F_latent, C, h, w)`: (13, 16, 60, 90) for 49 frames at 480 x 720.

        Raises ValueError: frames not 4k + 1, or height / width not positive multiples of 16 (VAE 8 x patch 2).
        """
        frames = self.check_frames(num_frames)
        s = self.latent_scale * self.denoiser.cfg.patch_size
        if height < 1 or width < 1 or height % s or width % s:
            raise ValueError(f"--height and --width must be positive multiples of {s} for CogVideoX; got {height} x {width}.")
        return (frames, self.denoiser.cfg.in_channels, height // self.latent_scale, width // self.latent_scale)

    @torch.no_grad()
    def decode(self, x0):
        """Latents `(B, F, C, h, w)` -> clips `(B, 3, 4(F-1)+1, 8h, 8w)` in [-1, 1], one sample at a time."""
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        clips = [vae.decode(rearrange(x, "f c h w -> 1 c f h w").to(dtype) / vae.scaling_factor) for x in x0]  # (1, 3, F', H, W)
        return torch.cat(clips).float().clamp(-1, 1)

    def read_weights(self, path):
        """A full fine-tuned transformer: a diffusers folder (its transformer/ or itself) or one .safetensors."""
        path = Path(path)
        return load_state_dict(path / "transformer" if (path / "transformer").is_dir() else path)

    # ---- Diffusion-NPO data (preference pairs of clips, npo_min/pairs.py) and differentiable decoding

    def load_pixels(self, path, resolution=None, num_frames=None):
        """A clip (animated .gif / .webp or a frame folder) -> `(3, num_frames, H, W)` in [-1, 1] (npo_min.data.load_clip).

        resolution: (height, width) or one int; default the config's sample size (480 x 720). num_frames: 4k + 1,
        default the config's (49). Raises ValueError: frames not 4k + 1, a size not a multiple of 16, a short clip.
        """
        cfg = self.denoiser.cfg
        if resolution is None:
            resolution = (cfg.sample_height * self.latent_scale, cfg.sample_width * self.latent_scale)
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        num_frames = cfg.sample_frames if num_frames is None else num_frames
        self.noise_shape(height, width, num_frames)  # refuses bad frames / sizes
        return load_clip(path, num_frames, height, width)

    @torch.no_grad()
    def encode_pixels(self, pixels):
        """Clips `(B, 3, F, H, W)` -> the scaled VAE posterior (scaling_factor * mean, scaling_factor * std),
        `(B, F', 16, H/8, W/8)` each (the transformer's frame-major layout), one clip at a time."""
        vae, sf = self.vae, self.vae.scaling_factor
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        means, stds = [], []
        for clip in pixels:
            mean, logvar = vae.encode(clip[None].to(device, dtype))  # (1, C, F', h, w)
            means.append(rearrange(sf * mean.float(), "1 c f h w -> f c h w"))
            stds.append(rearrange(sf * torch.exp(0.5 * logvar.float()), "1 c f h w -> f c h w"))
        return torch.stack(means), torch.stack(stds)  # (B, F', C, h, w) each

    def decode_with_grad(self, x0):
        """Latents `(B, F, C, h, w)` -> clips `(B, 3, 4(F-1)+1, 8h, 8w)`, differentiable (reward-NPO), not clamped."""
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        clips = [vae.decode(rearrange(x, "f c h w -> 1 c f h w").to(dtype) / vae.scaling_factor) for x in x0]  # (1, 3, F', H, W)
        return torch.cat(clips).float()

    # ---- Self-NPO data

    def self_npo_batches(self, data, batch_size, generator, resolution=None, num_frames=None):
        """Every clip of `data` encoded once with the frozen VAE (its first num_frames frames, scaled to cover
        height x width and centre-cropped), its caption once with T5; each batch draws fresh latents
        `scaling_factor * (mean + std * eps)` from the stored posterior. Batches `(latents (B, F, 16, h, w),
        context (B, 226, 4096))` come forever, reshuffled every epoch with `generator`, on the denoiser's device.

        resolution: (height, width) or one int (square); default 480 x 720 (the config's sample size).
        num_frames: pixel frames per clip, 4k + 1; default the config's (49).

        Raises: FileNotFoundError / ValueError for a bad folder, an .mp4, a clip shorter than num_frames
        (npo_min.data), frames not 4k + 1, a size not a multiple of 16, a batch larger than the data.
        """
        if data is None:
            raise ValueError("--model cogvideox needs --data DIR: a folder of clips (.gif / .webp / frame folders) "
                             "with same-name .txt captions.")
        cfg = self.denoiser.cfg
        if resolution is None:
            resolution = (cfg.sample_height * self.latent_scale, cfg.sample_width * self.latent_scale)
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        num_frames = cfg.sample_frames if num_frames is None else num_frames
        self.noise_shape(height, width, num_frames)  # refuses bad frames / sizes before reading anything
        pairs = clip_caption_pairs(data)
        if batch_size > len(pairs):
            raise ValueError(f"--batch-size {batch_size} exceeds the {len(pairs)} clips in {data}.")
        vae, sf = self.vae, self.vae.scaling_factor
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        means, stds = [], []
        with torch.no_grad():
            for path, _ in pairs:
                mean, logvar = vae.encode(load_clip(path, num_frames, height, width)[None].to(device, dtype))  # (1, C, F, h, w)
                means.append(rearrange(sf * mean.float(), "1 c f h w -> f c h w").cpu())
                stds.append(rearrange(sf * torch.exp(0.5 * logvar.float()), "1 c f h w -> f c h w").cpu())
            contexts = [self.encode([caption for _, caption in pairs[i : i + 8]]).float().cpu() for i in range(0, len(pairs), 8)]
        mean, std, context = torch.stack(means), torch.stack(stds), torch.cat(contexts)
        print(f"encoded {len(pairs)} clips of {num_frames} frames at {height} x {width} -> latents {tuple(mean.shape[1:])}")
        return _posterior_batches(mean, std, context, batch_size, generator, next(self.denoiser.parameters()).device)


def _posterior_batches(mean, std, context, batch_size, generator, device):
    # a plain generator function: the batches hold the encoded tensors, not the pipeline (VAE, T5)
    for idx in shuffled_batches(len(mean), batch_size, generator):
        eps = torch.randn(mean[idx].shape, generator=generator)
        yield (mean[idx] + std[idx] * eps).to(device), context[idx].to(device)


def load(weights: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
         config: str | CogVideoXFamilyConfig | None = None, tokenizer: str | os.PathLike | None = None,
         text_dtype: torch.dtype | None = None) -> CogVideoXPipe:
    """Load transformer, VAE, T5 encoder and tokenizer from the official CogVideoX diffusers folder.

    Args:
        weights: the folder (transformer/ vae/ text_encoder/ tokenizer/ scheduler/).
        device, dtype: where every module goes, and its parameter dtype (the official weights are bf16).
        config: "cogvideox-2b" / "cogvideox-5b" / a CogVideoXFamilyConfig, checked against the folder's
            config files (2B weights with the 5B preset: one line naming both sizes); None: the folder's own.
        tokenizer: a folder (or file) with T5's tokenizer.json; default weights/tokenizer.
        text_dtype: T5's dtype if not `dtype` (torch.bfloat16 halves its 19 GB), read directly in it.
    Raises:
        CheckpointError: missing folder or part, config mismatch, missing / unexpected / misshapen weights.
        FileNotFoundError: no tokenizer.json (with the conversion command).
    """
    if weights is None:
        raise CheckpointError("--model cogvideox needs --weights: the THUDM/CogVideoX-2b or -5b diffusers folder "
                              "(transformer/ vae/ text_encoder/ tokenizer/ scheduler/).")
    path = Path(weights)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: --model cogvideox loads the diffusers folder of THUDM/CogVideoX-2b / -5b.")
    missing = [sub for sub in ("transformer", "vae", "text_encoder") if not (path / sub).is_dir()]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(m + '/' for m in missing)}: not a CogVideoX diffusers folder.")
    cfg = None if config is None else get_config(config)
    named = isinstance(config, str)  # the 2B / 5B preset names are the parts' preset names too (errors name them)
    shift = read_scheduler_config(path)
    transformer = load_transformer(path / "transformer", (config if named else cfg.transformer) if cfg else None, dtype)
    if cfg is not None and shift is not None and shift != cfg.snr_shift_scale:
        raise CheckpointError(f"{path / 'scheduler'}: snr_shift_scale={shift} but the {config} preset has {cfg.snr_shift_scale}.")
    if shift is None:  # no scheduler/: the released value of the matching size (RoPE = 5B)
        shift = cfg.snr_shift_scale if cfg else (1.0 if transformer.cfg.use_rotary_positional_embeddings else 3.0)
    vae = load_vae(path / "vae", (config if named else cfg.vae) if cfg else None, dtype)
    text_encoder = load_text_encoder(path / "text_encoder", cfg.text if cfg else None, text_dtype or dtype)
    if text_encoder.cfg.d_model != transformer.cfg.text_embed_dim:
        raise CheckpointError(f"text_encoder/ gives {text_encoder.cfg.d_model}-wide states but transformer/ takes "
                              f"{transformer.cfg.text_embed_dim}: the parts come from different models.")
    tok = T5Tokenizer(Path(tokenizer) if tokenizer else path / "tokenizer", max_length=transformer.cfg.max_text_seq_length)
    pipe = CogVideoXPipe(transformer, vae.requires_grad_(False), text_encoder.requires_grad_(False), tok, shift,
                         f"cogvideox:{weights}", text_dtype)
    return pipe.to(device)
