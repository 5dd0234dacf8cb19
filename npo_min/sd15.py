"""Stable Diffusion 1.5 end to end: load a checkpoint, encode prompts, read NPO offsets, train, sample.

Checkpoint layouts read here (the models themselves live in unet.py, vae.py, clip.py):

  single file (`v1-5-pruned-emaonly.safetensors` / `.ckpt`, the original CompVis / LDM names)
      model.diffusion_model.*            UNet  -> `ldm_unet_to_diffusers` (this file)
      first_stage_model.*                VAE   -> `vae.ldm_vae_to_diffusers`
      cond_stage_model.transformer.*     CLIP text encoder (transformers names already)
      no tokenizer inside: pass `tokenizer=DIR`, or keep a `tokenizer/` folder next to the file
  diffusers folder (`stable-diffusion-v1-5/stable-diffusion-v1-5`)
      unet/ vae/ text_encoder/ (each `*.safetensors`, maybe sharded, + config.json), tokenizer/

Offsets for theta_neg = theta + alpha * eta + beta * delta (Diffusion-NPO Eq. 10) all become dicts
over the UNet's own keys (`load_offset`): our `delta.safetensors`, a LoRA (the authors' released
`sd15_beta500_2kiter.safetensors` is saved by their DPO-DPO-NPO/train_sd15.py in diffusers naming,
`unet.<module>.lora.down/up.weight`, no alpha; PEFT, old attention-processor and kohya-ss namings are
read too), or a full fine-tuned UNet (offset = weights - base).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm

from . import training
from .prompts import read_prompts
from .checkpoint import CheckpointError, atomic_write, build_loaded, check_writable, load_into, load_state_dict, read_metadata
from .clip import PRESETS as CLIP_PRESETS, CLIPTextConfig, CLIPTextModel, load_text_encoder, to_official_keys
from .clip_tokenizer import CLIPTokenizer, load_tokenizer
from .delta import FORMAT as DELTA_FORMAT, load_delta
from .guidance import compose_negative, guided_denoiser, negative_model, offset
from .schedule import NoiseSchedule
from .solvers import sample
from .unet import (PRESETS as UNET_PRESETS, UNET_PREFIX, UNet2DConditionModel, UNetConfig, _keys, _read_json, load_unet,
                   read_unet_weights, unet_config_from_diffusers)
from .vae import PRESETS as VAE_PRESETS, AutoencoderKL, VAEConfig, decode_latents, ldm_vae_to_diffusers, load_vae

VAE_PREFIX, CLIP_PREFIX = "first_stage_model.", "cond_stage_model.transformer."
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SD15Config:
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig


PRESETS = {
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


@dataclass
class SD15:
    """A loaded pipeline: eps-prediction UNet, VAE, CLIP text encoder (frozen) and tokenizer."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    config: SD15Config



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



def load_sd15(path: str | os.PathLike, dtype: torch.dtype = torch.float32, config: str | SD15Config | None = None,
              tokenizer: str | os.PathLike | None = None) -> SD15:
    """Load UNet, VAE, text encoder and tokenizer from an SD single file or a diffusers folder.

    Args:
        path: `v1-5-pruned-emaonly.safetensors` (or `.ckpt`, read with torch.load(weights_only=True)) or
            a diffusers folder with unet/ vae/ text_encoder/ tokenizer/.
        dtype: parameter dtype of every model (float32, float16, bfloat16).
        config: a PRESETS name or SD15Config. None: "sd15" for a single file; for a folder, what its
            config.json files say (a given config is checked against them instead).
        tokenizer: a folder with CLIP's vocab.json and merges.txt. Default: the folder's tokenizer/, or a
            `tokenizer/` folder next to a single file (a single file holds no vocabulary).
    Raises:
        CheckpointError: missing path, missing / unexpected / misshapen weights, config mismatch.
        FileNotFoundError: no tokenizer found.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Pass an SD1.5 single file or diffusers folder (big files go under weights/).")
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
    return SD15(unet, vae.requires_grad_(False), text_encoder.requires_grad_(False), load_tokenizer(tok_dir), cfg)


@torch.no_grad()
def encode_prompts(bundle: SD15, prompts: str | list[str]) -> torch.Tensor:
    """Prompts -> CLIP last hidden states `(B, 77, width)` (768 for SD1.5); "" gives the c' of CFG."""
    device = next(bundle.text_encoder.parameters()).device
    return bundle.text_encoder(bundle.tokenizer(prompts).to(device))


# ----------------------------------------------------------------------------- NPO / positive offsets

# LoRA key forms, matched after removing a leading `unet.` / `base_model.model.`; group 1 = the layer.
LORA_FORMS = [
    (r"(.+)\.lora_A\.weight", "down"), (r"(.+)\.lora_B\.weight", "up"),  # PEFT (get_peft_model_state_dict)
    (r"(.+)\.lora(?:_linear_layer)?\.down\.weight", "down"),  # diffusers (convert_state_dict_to_diffusers):
    (r"(.+)\.lora(?:_linear_layer)?\.up\.weight", "up"),  # the authors' sd15_beta500_2kiter.safetensors
    (r"lora_unet_(\w+)\.lora_down\.weight", "down"), (r"lora_unet_(\w+)\.lora_up\.weight", "up"),  # kohya-ss
    (r"(?:lora_unet_)?(.+)\.alpha", "alpha"),  # kohya-ss / some PEFT exports
]


def _metadata_alpha(meta: dict) -> float | None:
    """lora_alpha from the `lora_adapter_metadata` that recent diffusers write into a LoRA's header."""
    raw = json.loads(meta.get("lora_adapter_metadata") or "{}")
    raw = {k.removeprefix("unet."): v for k, v in raw.items()}
    if raw.get("use_dora") or raw.get("use_rslora"):
        raise CheckpointError("DoRA / rsLoRA adapters are not supported: fuse them into a full UNet first.")
    return raw.get("lora_alpha")


def lora_to_delta(lora: dict[str, torch.Tensor], base: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A UNet LoRA -> weight offsets `delta[layer.weight] = scale * up @ down` (float32, base's shapes).

    down (A): `(r, in)` or conv `(r, in, kh, kw)`; up (B): `(out, r)` or `(out, r, 1, 1)`; the product
    `(out, in * kh * kw)` is reshaped to the layer's weight. scale = alpha / r with a stored `.alpha`
    (else the `alpha` argument, from the file's metadata), or 1 without any alpha (the diffusers/PEFT
    convention lora_alpha = r, which the authors' NPO LoRA uses). Keys name layers in any LORA_FORMS.

    Raises CheckpointError: a key names no layer of `base`, a text-encoder or DoRA LoRA, a layer with only
    one of down / up, or a product whose size differs from the layer's weight.
    """
    layers = {k[: -len(".weight")] for k in base if k.endswith(".weight")}
    underscored = {name.replace(".", "_"): name for name in layers}  # kohya-ss writes module paths with `_`
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in lora.items():
        if key.startswith(("text_encoder", "lora_te")) or "dora_scale" in key or "magnitude_vector" in key:
            raise CheckpointError(f"{key}: only UNet LoRAs without DoRA are supported (this one changes more).")
        k = re.sub(r"^(unet\.|base_model\.model\.)", "", key)
        # old diffusers attention processors: attn1.processor.to_q_lora.down -> attn1.to_q.lora.down
        k = re.sub(r"\.processor\.(to_[qkv]|to_out)_lora\.", lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora.", k)
        match = next(((m[1], part) for pattern, part in LORA_FORMS if (m := re.fullmatch(pattern, k))), None)
        layer = match and (match[0] if match[0] in layers else underscored.get(match[0]))
        if not layer:
            unknown.append(key)
            continue
        parts.setdefault(layer, {})[match[1]] = value
    if unknown or not parts:
        raise CheckpointError(f"{len(unknown)} of {len(lora)} LoRA keys name no layer of this UNet, e.g. {unknown[:3]}: "
                              "a LoRA for another model, or an unsupported naming?")
    delta = {}
    for layer, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise CheckpointError(f"LoRA layer {layer} has {sorted(p)}, but needs both down (A) and up (B).")
        down, up, weight = p["down"].float(), p["up"].float(), base[layer + ".weight"]
        a = p["alpha"].item() if "alpha" in p else alpha
        scale = 1.0 if a is None else a / down.shape[0]
        product = scale * (up.flatten(1) @ down.flatten(1))  # (out, r) @ (r, in * kh * kw)
        if product.numel() != weight.numel():
            raise CheckpointError(f"LoRA layer {layer}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit weight {tuple(weight.shape)}.")
        delta[layer + ".weight"] = product.reshape(weight.shape)
    return delta


def load_offset(path: str | os.PathLike, base: dict[str, torch.Tensor], cfg: UNetConfig = UNET_PRESETS["sd15"],
                check_fingerprint: bool = True) -> dict[str, torch.Tensor]:
    """An offset over the UNet keys of `base` (the base UNet's state dict), float32, from any of:

    - our `delta.safetensors` (or its folder): read as is, its base fingerprint checked (npo_min.delta);
    - a LoRA `.safetensors` / `.bin` (or a folder holding `pytorch_lora_weights.safetensors`): see lora_to_delta;
    - a full fine-tuned UNet (diffusers folder or file, SD single file, LDM UNet file; e.g. the Self-NPO
      authors' `unet.save_pretrained` output or a DPO UNet for --pos-ckpt): weights - base (guidance.offset).
    `cfg` is needed only to rename an LDM-layout full UNet. The same function gives delta (--neg-ckpt) and eta.

    Raises CheckpointError (missing / unreadable file, a LoRA or delta that does not fit, a delta made for
    another base) or ValueError (a full UNet of another architecture).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"offset checkpoint not found: {path}.")
    if path.is_dir():
        for name in ("delta.safetensors", "pytorch_lora_weights.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
    if path.is_file():
        meta = read_metadata(path) if path.suffix == ".safetensors" else {}
        if meta.get("format") == DELTA_FORMAT:
            return load_delta(path, base, check_fingerprint)[0]
        if any("lora" in k for k in _keys(path)):
            return lora_to_delta(load_state_dict(path), base, _metadata_alpha(meta))
    return offset(read_unet_weights(path, cfg), base)


load_npo_delta = load_offset  # the NPO delta (Diffusion-NPO Eq. 10): any of the forms load_offset reads


# ----------------------------------------------------------------------------- Self-NPO data (train.py)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def image_caption_pairs(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """Images in `folder` (sorted by name) with the text of their same-name `.txt` caption.

    Raises FileNotFoundError (no folder; images without a caption, listed) or ValueError (no images).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder} is not a folder of images with .txt captions.")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images in {folder} have no same-name .txt caption, e.g. {missing[:5]}.")
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]


def load_image(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """An RGB image -> `(3, resolution, resolution)` float32 in [-1, 1].

    Shortest side resized to `resolution` (LANCZOS), then a centre crop: the authors' Self-NPO
    transform (torchvision Resize + CenterCrop + Normalize(0.5, 0.5)), done with pillow.
    """
    img = Image.open(path).convert("RGB")
    scale = resolution / min(img.size)
    img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))), Image.LANCZOS)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (H, W, 3) -> (3, H, W)


def setup_self_npo(args, gen: torch.Generator):
    """(unet, batches, null_context, base_name, autocast_dtype) for `train.py --model sd15`.

    Reads args.weights (+ optional args.tokenizer, args.sd15_config), args.data, args.resolution,
    args.batch_size, args.dtype, args.gradient_checkpointing, args.device. Every image is encoded once
    with the frozen VAE and its caption with the frozen CLIP; both are then freed, only the UNet trains
    (weights fp32; args.dtype "fp16"/"bf16" is the autocast dtype). Each batch draws fresh latents
    `scaling_factor * (mean + std * eps)` from the stored posterior, as the authors' `latent_dist.sample()`
    per step does; batches `(latents (B, 4, R/8, R/8), context (B, 77, 768))` come forever, reshuffled
    every epoch with `gen`. null_context = CLIP("") `(1, 77, 768)`.
    """
    device = torch.device(args.device)
    bundle = load_sd15(args.weights, torch.float32, getattr(args, "sd15_config", None), getattr(args, "tokenizer", None))
    pairs = image_caption_pairs(args.data)
    if args.batch_size > len(pairs):
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(pairs)} images in {args.data}.")
    vae, sf = bundle.vae.to(device), bundle.vae.cfg.scaling_factor
    if args.resolution % vae.downscale:
        raise ValueError(f"--resolution must be a multiple of {vae.downscale}; got {args.resolution}.")
    bundle.text_encoder.to(device)
    means, stds, contexts = [], [], []
    with torch.no_grad():
        for i in range(0, len(pairs), 8):
            chunk = pairs[i : i + 8]
            mean, logvar = vae.encode(torch.stack([load_image(p, args.resolution) for p, _ in chunk]).to(device))
            means.append((sf * mean).cpu())
            stds.append((sf * torch.exp(0.5 * logvar)).cpu())
            contexts.append(encode_prompts(bundle, [caption for _, caption in chunk]).cpu())
        null = encode_prompts(bundle, [""])
    mean, std, context = torch.cat(means), torch.cat(stds), torch.cat(contexts)
    print(f"encoded {len(pairs)} images at {args.resolution} px -> latents {tuple(mean.shape[1:])}")
    unet = bundle.unet.to(device).requires_grad_(True)
    unet.gradient_checkpointing = bool(args.gradient_checkpointing)
    del bundle, vae  # the VAE and text encoder are not needed any more

    def batches():
        for idx in training.shuffled_batches(len(mean), args.batch_size, gen):
            eps = torch.randn(mean[idx].shape, generator=gen)
            yield (mean[idx] + std[idx] * eps).to(device), context[idx].to(device)

    return unet, batches(), null, f"sd15:{args.weights}", None if args.dtype == "fp32" else DTYPES[args.dtype]


# ----------------------------------------------------------------------------- sampling (sample.py)

GRID_ROWS = 16  # grid.png shows the first prompts only: 500 rows of 512 px would be an unusable image


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """`(3, H, W)` in about [-1, 1] -> an RGB image (clamped, x -> round(127.5 (x + 1)))."""
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())  # (3, H, W) -> (H, W, 3)


def save_png(img: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))  # tmp ends in .tmp: name the format


def sample_main(args) -> list[Path]:
    """`sample.py --model sd15`: each prompt with and without NPO from the same noise; returns the files written.

    Positive model theta_pos = theta + eta (eta from --pos-ckpt, else 0); negative model
    theta_neg = theta + alpha * eta + beta * delta (Diffusion-NPO Eq. 10; delta from --neg-ckpt).
    "npo": CFG with theta_pos on c and theta_neg on c' = "" (two passes per step, as the authors);
    "base": plain CFG with theta_pos on both. Prompt i uses noise seeded with seed + i (any --batch-size). Writes
    `base/{i:04d}.png`, `npo/{i:04d}.png` (so `eval.score --a OUT/npo --b OUT/base` pairs them) and grid.png (base | npo, first GRID_ROWS prompts) under
    --out, atomically; existing files are refused unless --overwrite, before any work.
    Offsets are composed in float32, then the models cast to --dtype. Default spacing "trailing" (999, ..., 39) is
    the nearest in solvers.py to the authors' "linspace" (999, 959, ..., 40: DPMSolverMultistep from SD1.5's config).
    """
    prompts = read_prompts(args.prompts)  # .txt (one a line), .jsonl / .csv ("prompt" or "caption")
    if not (getattr(args, "neg_ckpt", None) or getattr(args, "pos_ckpt", None)):
        raise ValueError("nothing to compare: pass --neg-ckpt (an NPO delta / LoRA / UNet) and/or --pos-ckpt.")
    height, width = getattr(args, "height", 512), getattr(args, "width", 512)
    out, overwrite = Path(args.out), getattr(args, "overwrite", False)
    names = [f"{kind}/{i:04d}.png" for i in range(len(prompts)) for kind in ("base", "npo")] + ["grid.png"]
    files = [check_writable(out / name, overwrite) for name in names]
    device, dtype = torch.device(getattr(args, "device", "cpu")), DTYPES[getattr(args, "dtype", "fp32")]

    bundle = load_sd15(args.weights, torch.float32, getattr(args, "sd15_config", None), getattr(args, "tokenizer", None))
    cfg = bundle.config.unet
    if height % bundle.vae.downscale or width % bundle.vae.downscale:
        raise ValueError(f"--height and --width must be multiples of {bundle.vae.downscale}; got {height} x {width}.")
    base = bundle.unet.state_dict()  # theta (references: neg is built before pos changes)
    check = not getattr(args, "ignore_fingerprint", False)
    eta = load_offset(args.pos_ckpt, base, cfg, check) if getattr(args, "pos_ckpt", None) else None
    delta = load_offset(args.neg_ckpt, base, cfg, check) if getattr(args, "neg_ckpt", None) else None
    alpha, beta = getattr(args, "alpha", 1.0), getattr(args, "beta", 1.0)
    neg = negative_model(bundle.unet, base, delta, eta, alpha, beta).to(device, dtype)  # a copy: theta_neg
    pos = bundle.unet
    if eta is not None:
        load_into(pos, compose_negative(base, eta=eta, alpha=1.0), "positive UNet")
    del base, eta, delta
    pos, vae = pos.to(device, dtype), bundle.vae.to(device, dtype)
    bundle.text_encoder.to(device)

    schedule, scale = NoiseSchedule.sd(), getattr(args, "guidance_scale", 7.5)
    steps, solver, seed = getattr(args, "steps", 25), getattr(args, "solver", "dpmpp_2m"), getattr(args, "seed", 0)
    spacing, batch = getattr(args, "spacing", "trailing"), getattr(args, "batch_size", 1)  # "leading" starts at t = 951
    null, (h, w) = encode_prompts(bundle, [""]).to(dtype), (height // vae.downscale, width // vae.downscale)
    pairs = []  # (base, npo) images of the first GRID_ROWS prompts
    for first in tqdm(range(0, len(prompts), batch), desc="batches", disable=getattr(args, "no_progress", False)):
        chunk = prompts[first : first + batch]
        context = encode_prompts(bundle, chunk).to(dtype)  # (B, 77, D); noise: prompt i seeded with seed + i
        noise = torch.cat([torch.randn((1, cfg.in_channels, h, w), generator=torch.Generator().manual_seed(seed + first + j))
                           for j in range(len(chunk))]).to(device, dtype)
        images = {}
        for kind, neg_model in (("base", pos), ("npo", neg)):
            latents = sample(guided_denoiser(pos, neg_model, context, null, scale), noise, steps, schedule, solver, spacing)
            with torch.no_grad():
                images[kind] = [to_pil(x) for x in decode_latents(vae, latents)]
            for j, img in enumerate(images[kind]):
                save_png(img, out / kind / f"{first + j:04d}.png")
        pairs = (pairs + list(zip(images["base"], images["npo"])))[:GRID_ROWS]
    grid = Image.new("RGB", (2 * width, len(pairs) * height))
    for r, (base_img, npo_img) in enumerate(pairs):
        grid.paste(base_img, (0, r * height))
        grid.paste(npo_img, (width, r * height))
    save_png(grid, out / "grid.png")
    print(f"wrote {2 * len(prompts)} images and {out / 'grid.png'} (columns: base | npo)")
    return files
