"""Stable Diffusion XL (base 1.0): its configuration, its two text encoders' prompt encoding, the micro-
conditioning time ids, and both official checkpoint layouts. The modules are the project's own:

    UNet        npo_min/unet.py   preset "sdxl" (3 levels, depth (1, 2, 10), linear projections, text_time)
    VAE         npo_min/vae.py    preset "sdxl" (SD's AutoencoderKL, scaling factor 0.13025)
    text        npo_min/clip.py   preset "sdxl_l" (OpenAI CLIP ViT-L/14, quick_gelu)
    text_2      npo_min/clip.py   preset "sdxl_g" (OpenCLIP ViT-bigG/14, gelu, with text_projection)

Layouts (Podell et al. 2023, "SDXL"; stabilityai/stable-diffusion-xl-base-1.0):

  single file `sd_xl_base_1.0.safetensors` (the generative-models / LDM names)
      model.diffusion_model.*              UNet    -> unet_ldm.ldm_unet_to_diffusers (label_emb.0 -> add_embedding)
      first_stage_model.*                  VAE     -> vae.ldm_vae_to_diffusers
      conditioner.embedders.0.transformer.*  CLIP-L  (transformers names already)
      conditioner.embedders.1.model.*      bigG in OpenCLIP's layout -> clip.open_clip_to_hf (fused in_proj
                                           split into q/k/v; text_projection used as x @ P, transposed)
      no tokenizer inside: pass `tokenizer=DIR`, or keep tokenizer/ (+ tokenizer_2/) next to the file
  diffusers folder: unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/

Prompt encoding (diffusers StableDiffusionXLPipeline.encode_prompt, clip_skip None): each encoder's
penultimate hidden state (no final LayerNorm), concatenated -> (B, 77, 768 + 1280 = 2048); the pooled vector
is bigG's final LayerNorm at the EOS token through text_projection -> (B, 1280). The unconditional input
is zeros for both (`force_zeros_for_empty_prompt`, the authors' SDXL scripts).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, build_loaded, checkpoint_keys, load_state_dict
from .clip import PRESETS as CLIP_PRESETS, CLIPTextConfig, CLIPTextModel, load_text_encoder, open_clip_to_hf, to_official_keys
from .unet import PRESETS as UNET_PRESETS, UNet2DConditionModel, UNetConfig, _read_json, load_unet, unet_config_from_diffusers
from .unet_ldm import ldm_unet_to_diffusers
from .vae import PRESETS as VAE_PRESETS, AutoencoderKL, VAEConfig, ldm_vae_to_diffusers, load_vae

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIX, TEXT_2_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


@dataclass(frozen=True)
class SDXLConfig:
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig    # CLIP-L: its width + text_2's width = unet.cross_attention_dim
    text_2: CLIPTextConfig  # bigG: projection_dim + 6 * addition_time_embed_dim = unet.projection_input_dim

    def __post_init__(self):
        u = self.unet
        if u.addition_embed_type != "text_time":
            raise ValueError("an SDXL UNet needs addition_embed_type='text_time'.")
        if self.text.width + self.text_2.width != u.cross_attention_dim:
            raise ValueError(f"text widths {self.text.width} + {self.text_2.width} != UNet cross_attention_dim {u.cross_attention_dim}.")
        if not self.text_2.projection_dim or self.text_2.projection_dim + 6 * u.addition_time_embed_dim != u.projection_input_dim:
            raise ValueError(f"pooled width {self.text_2.projection_dim} + 6 x {u.addition_time_embed_dim} != UNet "
                             f"projection_input_dim {u.projection_input_dim}.")


PRESETS = {
    # stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/, text_encoder_2/ config.json
    "sdxl": SDXLConfig(UNET_PRESETS["sdxl"], VAE_PRESETS["sdxl"], CLIP_PRESETS["sdxl_l"], CLIP_PRESETS["sdxl_g"]),
    # The SDXL block structure at toy widths, for tests and smoke runs (heads 1/2 of width 16; text 16 + 32 = 48;
    # pooled 32 + 6 time ids x 8 = 80); about 5M parameters, most of them the two token tables.
    "tiny": SDXLConfig(
        UNetConfig(block_out_channels=(32, 32, 64), cross_attn=(False, True, True), num_heads=(1, 2, 4), cross_attention_dim=48,
                   norm_num_groups=8, sample_size=8, transformer_depth=(1, 1, 2), use_linear_projection=True,
                   addition_embed_type="text_time", addition_time_embed_dim=8, projection_input_dim=32 + 6 * 8),
        VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.13025),
        CLIPTextConfig(width=16, layers=2, heads=2, mlp_width=32),
        CLIPTextConfig(width=32, layers=3, heads=2, mlp_width=64, act="gelu", projection_dim=32),
    ),
}


def get_config(config: str | SDXLConfig) -> SDXLConfig:
    """A PRESETS name or an SDXLConfig passed through. Raises ValueError on an unknown name."""
    if not isinstance(config, SDXLConfig) and config not in PRESETS:
        raise ValueError(f"unknown SDXL config {config!r}: choose one of {sorted(PRESETS)}.")
    return config if isinstance(config, SDXLConfig) else PRESETS[config]


# ----------------------------------------------------------------------------- conditioning


@torch.no_grad()
def encode_prompt(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModel, ids: torch.Tensor,
                  ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of both tokenizers `(B, 77)` -> (text states `(B, 77, w1 + w2)`, pooled `(B, projection_dim)`).

    Each encoder's penultimate hidden state without final LayerNorm (StableDiffusionXLPipeline with
    clip_skip None reads `hidden_states[-2]`), concatenated CLIP-L first; pooled = bigG's
    `text_projection(final_layer_norm(last layer)[EOS])`. Raises ValueError on bad ids (clip.check_input_ids).
    """
    hidden = text_encoder(ids, clip_skip=1, final_norm=False)
    hidden_2, pooled = text_encoder_2.encode(ids_2, clip_skip=1, final_norm=False)
    return torch.cat([hidden, hidden_2], dim=-1), pooled  # (B, 77, w1) | (B, 77, w2) -> (B, 77, w1 + w2)


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int],
             n: int = 1) -> torch.Tensor:
    """SDXL micro-conditioning `(n, 6)` float32: (orig h, orig w, crop top, crop left, target h, target w), pixels.

    Sampling (diffusers' default): original = target = the generated (height, width), crop (0, 0).
    Training (the authors' train_xl.py): original = target = (resolution, resolution), crop = where the
    training image was cropped. Source: SDXL paper Sec. 2.2; diffusers `_get_add_time_ids`.
    """
    row = torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
    return row.expand(n, 6).clone()


# ----------------------------------------------------------------------------- checkpoint layouts


def text_2_from_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bigG in OpenCLIP names (`conditioner.embedders.1.model.` removed) -> CLIPTextModelWithProjection names.

    open_clip_to_hf, without `logit_scale` (CLIP's contrastive temperature, unused by a text encoder;
    diffusers' convert_open_clip_checkpoint drops it too).
    """
    return {k: v for k, v in open_clip_to_hf(sd).items() if k != "logit_scale"}


def read_single_file(path: str | os.PathLike, cfg: SDXLConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The four parts of `sd_xl_base_1.0.safetensors` (or `.ckpt`) in the modules' names:
    {"unet", "vae", "text", "text_2"}. A `.safetensors` file is read part by part (each part costs its own
    size); a pickled file is read once. Raises CheckpointError: unreadable file, or a part's prefix absent (named)."""
    path = Path(path)
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX, "text_2": TEXT_2_PREFIX}
    keys = checkpoint_keys(path) if path.suffix == ".safetensors" else None
    whole = None if keys is not None else load_state_dict(path)
    keys = keys if keys is not None else list(whole)
    parts = {}
    for name, prefix in prefixes.items():
        if not any(k.startswith(prefix) for k in keys):
            raise CheckpointError(f"{path} has no {name} weights under {prefix!r}: not an SDXL single file "
                                  f"(sd_xl_base_1.0.safetensors holds {', '.join(prefixes.values())}).")
        parts[name] = (load_state_dict(path, prefix) if whole is None
                       else {k[len(prefix):]: v for k, v in whole.items() if k.startswith(prefix)})
    parts["unet"] = ldm_unet_to_diffusers(parts["unet"], cfg.unet)
    parts["vae"] = ldm_vae_to_diffusers(parts["vae"])
    parts["text"] = to_official_keys(parts["text"])
    parts["text_2"] = text_2_from_open_clip(parts["text_2"])
    return parts


def require_folder_parts(folder: Path) -> None:
    """Raise CheckpointError naming the first of unet/ vae/ text_encoder/ text_encoder_2/ the folder lacks."""
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (folder / sub).is_dir():
            raise CheckpointError(f"{folder} has no {sub}/ folder: an SDXL diffusers folder holds unet/ vae/ text_encoder/ "
                                  "text_encoder_2/ tokenizer/ tokenizer_2/.")


def config_from_folder(folder: str | os.PathLike) -> SDXLConfig:
    """The architecture a diffusers folder describes in unet/, vae/, text_encoder/, text_encoder_2/ config.json
    (the SDXL preset's value where a file is absent). Raises CheckpointError: an architecture the UNet lacks."""
    folder, base = Path(folder), PRESETS["sdxl"]
    require_folder_parts(folder)
    unet, vae, text, text_2 = (_read_json(folder / sub / "config.json") for sub in ("unet", "vae", "text_encoder", "text_encoder_2"))
    vae_cfg = base.vae
    if vae:
        fields = {f.name for f in dataclasses.fields(VAEConfig)}
        vae_cfg = VAEConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vae.items() if k in fields and v is not None})
    return SDXLConfig(unet_config_from_diffusers(unet) if unet else base.unet, vae_cfg,
                      CLIPTextConfig.from_hf(text) if text else base.text,
                      CLIPTextConfig.from_hf(text_2, with_projection=True) if text_2 else base.text_2)


def load_parts(path: str | os.PathLike, cfg: SDXLConfig, dtype: torch.dtype = torch.float32):
    """(unet, vae, text_encoder, text_encoder_2) strictly loaded from a single file or a diffusers folder.

    Raises CheckpointError: missing part (e.g. no text_encoder_2/), missing / unexpected / misshapen keys.
    """
    path = Path(path)
    if path.is_dir():
        require_folder_parts(path)
        return (load_unet(path / "unet", cfg.unet, dtype), load_vae(path / "vae", cfg.vae, dtype),
                load_text_encoder(path / "text_encoder", cfg.text, dtype), load_text_encoder(path / "text_encoder_2", cfg.text_2, dtype))
    parts = read_single_file(path, cfg)
    return (build_loaded(UNet2DConditionModel, cfg.unet, parts["unet"], dtype, f"SDXL UNet from {path}"),
            build_loaded(AutoencoderKL, cfg.vae, parts["vae"], dtype, f"SDXL VAE from {path}"),
            build_loaded(CLIPTextModel, cfg.text, parts["text"], dtype, f"SDXL CLIP-L text encoder from {path}").requires_grad_(False),
            build_loaded(CLIPTextModel, cfg.text_2, parts["text_2"], dtype, f"SDXL bigG text encoder from {path}").requires_grad_(False))
