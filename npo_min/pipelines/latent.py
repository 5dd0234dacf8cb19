"""The pipeline base of the latent-diffusion image families (SD1.5, SDXL): the AutoencoderKL between pixels and
latents (vae.py), shared so that each family file holds only what is its own."""

from __future__ import annotations

import torch

from ..data import load_image
from ..schedule import NoiseSchedule
from ..vae import AutoencoderKL, decode_latents
from . import Pipeline


class LatentImagePipeline(Pipeline):
    """What the SD1.5 and SDXL pipelines share: the AutoencoderKL between pixels `(B, 3, H, W)` in [-1, 1] and
    scaled latents `(B, 4, H/8, W/8)` (decode for sampling; load / encode / differentiable decode for the
    Diffusion-NPO trainers, npo_min/pairs.py and npo_min/diffusion_npo.py)."""

    vae: AutoencoderKL

    def __init__(self, unet: torch.nn.Module, vae: AutoencoderKL, config, name: str):
        """The shared part: the UNet, its VAE, the SD scaled-linear schedule (SD1.5 and SDXL use the same betas)."""
        self.denoiser, self.vae, self.config, self.name = unet, vae, config, name
        self.schedule = NoiseSchedule.sd()
        self.latent_scale = vae.downscale

    @torch.no_grad()
    def decode(self, x0):
        return self.decode_with_grad(x0).clamp(-1, 1)

    def load_pixels(self, path, resolution):
        """One image `(3, resolution, resolution)` in [-1, 1] (short side resized, centre crop).

        Raises ValueError: a resolution the VAE cannot encode (not a multiple of its downscale)."""
        if resolution % self.vae.downscale:
            raise ValueError(f"--resolution must be a multiple of {self.vae.downscale}; got {resolution}.")
        return load_image(path, resolution)

    @torch.no_grad()
    def encode_pixels(self, pixels):
        """Pixels -> the scaled VAE posterior (scaling_factor * mean, scaling_factor * std), `(B, 4, H/8, W/8)` each."""
        vae, sf = self.vae, self.vae.cfg.scaling_factor
        mean, logvar = vae.encode(pixels.to(next(vae.parameters()).device, next(vae.parameters()).dtype))
        return (sf * mean).float(), (sf * torch.exp(0.5 * logvar)).float()

    def decode_with_grad(self, x0):
        """Latents `(B, 4, h, w)` -> pixels `(B, 3, 8h, 8w)`, float32, not clamped, differentiable (reward trainers)."""
        return decode_latents(self.vae, x0.to(next(self.vae.parameters()).dtype)).float()
