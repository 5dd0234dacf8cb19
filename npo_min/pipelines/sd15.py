"""The Stable Diffusion 1.5 family: eps-prediction UNet (unet.py), VAE (vae.py), CLIP ViT-L/14 text encoder
(clip.py) and its BPE tokenizer (clip_tokenizer.py), loaded from either official layout:

  single file (`v1-5-pruned-emaonly.safetensors` / `.ckpt`, the original CompVis / LDM names)
      model.diffusion_model.*            UNet  -> unet_ldm.ldm_unet_to_diffusers
      first_stage_model.*                VAE   -> vae.ldm_vae_to_diffusers
      cond_stage_model.transformer.*     CLIP text encoder (transformers names already)
      no tokenizer inside: pass `tokenizer=DIR`, or keep a `tokenizer/` folder next to the file
  diffusers folder (`stable-diffusion-v1-5/stable-diffusion-v1-5`)
      unet/ vae/ text_encoder/ (each `*.safetensors`, maybe sharded, + config.json), tokenizer/
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, build_loaded, load_state_dict
from ..clip import PRESETS as CLIP_PRESETS, CLIPTextConfig, CLIPTextModel, load_text_encoder, to_official_keys
from ..clip_tokenizer import CLIPTokenizer, load_tokenizer
from ..data import MappedBatches, image_caption_pairs, load_image, shuffled_batches
from ..unet import PRESETS as UNET_PRESETS, UNet2DConditionModel, UNetConfig, _read_json, checkpoint_family, load_unet, read_unet_weights, unet_config_from_diffusers
from ..vae import PRESETS as VAE_PRESETS, AutoencoderKL, VAEConfig, ldm_vae_to_diffusers, load_vae
from .latent import LatentImagePipeline

VAE_PREFIX, CLIP_PREFIX = "first_stage_model.", "cond_stage_model.transformer."


@dataclass(frozen=True)
class SD15Config:
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig


PRESETS = {
    # runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json
    "sd15": SD15Config(UNET_PRESETS["sd15"], VAE_PRESETS["sd15"], CLIP_PRESETS["sd15"]),
    # The SD1.5 block structure (4 levels, cross-attention on the first 3, 2 resnets per level, 8x VAE)
    # at toy widths, for tests and smoke runs; about 4M parameters, 1.6M of them the token table.
    "tiny": SD15Config(
        UNetConfig(block_out_channels=(32, 32, 64, 64), num_heads=2, cross_attention_dim=32, norm_num_groups=8, sample_size=8),
        VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
        CLIPTextConfig(width=32, layers=2, heads=2, mlp_width=64),
    ),
}


def get_config(config: str | SD15Config) -> SD15Config:
    """A PRESETS name or an SD15Config passed through. Raises ValueError on an unknown name."""
    if not isinstance(config, SD15Config) and config not in PRESETS:
        raise ValueError(f"unknown SD1.5 config {config!r}: choose one of {sorted(PRESETS)}.")
    return config if isinstance(config, SD15Config) else PRESETS[config]


def config_from_folder(folder: str | os.PathLike) -> SD15Config:
    """The architecture a diffusers folder describes in unet/, vae/, text_encoder/ config.json (SD1.5 where absent)."""
    folder, sd15 = Path(folder), PRESETS["sd15"]
    unet, vae, text = (_read_json(folder / sub / "config.json") for sub in ("unet", "vae", "text_encoder"))
    vae_cfg = sd15.vae
    if vae:
        fields = {f.name for f in dataclasses.fields(VAEConfig)}
        vae_cfg = VAEConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vae.items() if k in fields and v is not None})
    return SD15Config(unet_config_from_diffusers(unet) if unet else sd15.unet, vae_cfg,
                      CLIPTextConfig.from_hf(text) if text else sd15.text)


class SD15Pipeline(LatentImagePipeline):
    """UNet (trainable), VAE and CLIP text encoder (frozen), tokenizer. Prompts are text; c' = CLIP("")."""

    latent_scale = 8

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, config: SD15Config, name: str):
        super().__init__(unet, vae, config, name)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    @torch.no_grad()
    def encode(self, prompts):
        """Prompts -> CLIP last hidden states `(B, 77, width)` (768 for SD1.5); "" gives the c' of CFG."""
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenizer(prompts).to(device))

    def null_cond(self, n):
        return self.encode([""]).expand(n, -1, -1)

    def read_weights(self, path):
        if checkpoint_family(path) == "sdxl":
            raise CheckpointError(f"{path} is an SDXL checkpoint, not an SD1.5 one: use it with --model sdxl.")
        return read_unet_weights(path, self.config.unet)

    def self_npo_batches(self, data, batch_size, generator, resolution=512):
        """Every image of `data` encoded once with the frozen VAE, its caption once with CLIP; each batch then
        draws fresh latents `scaling_factor * (mean + std * eps)` from the stored posterior, as the authors'
        `latent_dist.sample()` per step does. Batches `(latents (B, 4, R/8, R/8), context (B, 77, 768))` come
        forever, reshuffled every epoch with `generator`, on the denoiser's device.

        Raises: FileNotFoundError / ValueError for a bad folder (npo_min.data), ValueError for a batch larger
        than the data or a resolution that is not a multiple of 8.
        """
        if data is None:
            raise ValueError("--model sd15 needs --data DIR: a folder of images with same-name .txt captions.")
        pairs = image_caption_pairs(data)
        if batch_size > len(pairs):
            raise ValueError(f"--batch-size {batch_size} exceeds the {len(pairs)} images in {data}.")
        vae, sf = self.vae, self.vae.cfg.scaling_factor
        if resolution % vae.downscale:
            raise ValueError(f"--resolution must be a multiple of {vae.downscale}; got {resolution}.")
        device = next(vae.parameters()).device
        means, stds, contexts = [], [], []
        with torch.no_grad():
            for i in range(0, len(pairs), 8):
                chunk = pairs[i : i + 8]
                mean, logvar = vae.encode(torch.stack([load_image(p, resolution) for p, _ in chunk]).to(device))
                means.append((sf * mean).cpu())
                stds.append((sf * torch.exp(0.5 * logvar)).cpu())
                contexts.append(self.encode([caption for _, caption in chunk]).cpu())
        mean, std, context = torch.cat(means), torch.cat(stds), torch.cat(contexts)
        print(f"encoded {len(pairs)} images at {resolution} px -> latents {tuple(mean.shape[1:])}")
        out = next(self.denoiser.parameters()).device
        return _latent_batches(mean, std, context, batch_size, generator, out)


def _latent_batches(mean, std, context, batch_size, generator, device):
    # a module-level function, so the batches hold the encoded tensors but not the pipeline (VAE, CLIP);
    # MappedBatches: the data order can be saved and resumed (train.py --resume)
    def batch(idx):
        eps = torch.randn(mean[idx].shape, generator=generator)
        return (mean[idx] + std[idx] * eps).to(device), context[idx].to(device)
    return MappedBatches(shuffled_batches(len(mean), batch_size, generator), batch)


def load(weights: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
         config: str | SD15Config | None = None, tokenizer: str | os.PathLike | None = None) -> SD15Pipeline:
    """Load UNet, VAE, text encoder and tokenizer from an SD single file or a diffusers folder.

    Args:
        weights: `v1-5-pruned-emaonly.safetensors` (or `.ckpt`, read with torch.load(weights_only=True)) or
            a diffusers folder with unet/ vae/ text_encoder/ tokenizer/.
        device, dtype: where every module goes, and its parameter dtype (float32, float16, bfloat16).
        config: a PRESETS name or SD15Config. None: "sd15" for a single file; for a folder, what its
            config.json files say (a given config is checked against them instead).
        tokenizer: a folder with CLIP's vocab.json and merges.txt. Default: the folder's tokenizer/, or a
            `tokenizer/` folder next to a single file (a single file holds no vocabulary).
    Raises:
        CheckpointError: missing path, missing / unexpected / misshapen weights, config mismatch.
        FileNotFoundError: no tokenizer found.
    """
    if weights is None:
        raise CheckpointError("--model sd15 needs --weights: an SD1.5 single file or diffusers folder (see weights/README.md).")
    path = Path(weights)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Pass an SD1.5 single file or diffusers folder (big files go under weights/).")
    if checkpoint_family(path) == "sdxl":
        raise CheckpointError(f"{path} is an SDXL checkpoint (two text encoders, micro-conditioning), not SD1.5: use --model sdxl.")
    if path.is_dir():
        cfg = config_from_folder(path) if config is None else get_config(config)
        unet = load_unet(path / "unet", cfg.unet, dtype)
        vae = load_vae(path / "vae", cfg.vae, dtype)
        text_encoder = load_text_encoder(path / "text_encoder", cfg.text, dtype)
        tok_dir = Path(tokenizer) if tokenizer else path / "tokenizer"
    else:
        cfg = get_config(config or "sd15")
        unet = load_unet(path, cfg.unet, dtype)  # each part reads only its own tensors from a .safetensors
        vae = build_loaded(AutoencoderKL, cfg.vae, ldm_vae_to_diffusers(load_state_dict(path, VAE_PREFIX)), dtype, f"VAE from {path}")
        text_encoder = build_loaded(CLIPTextModel, cfg.text, to_official_keys(load_state_dict(path, CLIP_PREFIX)), dtype,
                                    f"CLIP text encoder from {path}")
        tok_dir = Path(tokenizer) if tokenizer else path.parent / "tokenizer"
    if not (tok_dir / "vocab.json").is_file():
        raise FileNotFoundError(
            f"no CLIP tokenizer at {tok_dir} (vocab.json + merges.txt). A single-file checkpoint holds no vocabulary: "
            "pass --tokenizer DIR (e.g. the tokenizer/ folder of stable-diffusion-v1-5) or put a tokenizer/ folder next to it.")
    pipe = SD15Pipeline(unet, vae.requires_grad_(False), text_encoder.requires_grad_(False), load_tokenizer(tok_dir), cfg,
                        f"sd15:{weights}")
    return pipe.to(device)
