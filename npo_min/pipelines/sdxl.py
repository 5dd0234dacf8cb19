"""The Stable Diffusion XL family on the Pipeline interface: UNet with micro-conditioning (unet.py, preset
"sdxl"), VAE (vae.py), CLIP-L + OpenCLIP bigG text encoders (clip.py) and their tokenizers, from the single
file `sd_xl_base_1.0.safetensors` or the diffusers folder (npo_min/sdxl.py has both layouts).

The conditioning is a dict (guidance.Cond):
    encoder_hidden_states (B, 77, 2048)   CLIP-L | bigG penultimate hidden states
    text_embeds           (B, 1280)       pooled bigG text embedding
    time_ids              (B, 6)          (orig h, orig w, crop top, crop left, target h, target w) in pixels
c' (`null_cond`) is zeros for the text states and the pooled vector (`force_zeros_for_empty_prompt`, as the
authors' SDXL scripts) and omits time_ids, which both CFG branches share (guidance.share_cond).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from ..checkpoint import CheckpointError
from ..clip import CLIPTextModel
from ..clip_tokenizer import CLIPTokenizer, load_tokenizer
from ..data import MappedBatches, image_caption_pairs, load_image_random_crop, shuffled_batches
from ..sdxl import SDXLConfig, config_from_folder, encode_prompt, get_config, load_parts, time_ids
from ..unet import UNet2DConditionModel, checkpoint_family, read_unet_weights
from .latent import LatentImagePipeline


class SDXLPipeline(LatentImagePipeline):
    """UNet (trainable), VAE and both text encoders (frozen), both tokenizers.

    `image_size` (height, width) is what encode() writes into the time ids as original and target size
    (crop (0, 0), diffusers' default); sample.py sets it with set_image_size, the default is the model's
    native size (8 x unet.sample_size = 1024).
    """

    latent_scale = 8

    def __init__(self, unet: UNet2DConditionModel, vae, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModel,
                 tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, config: SDXLConfig, name: str):
        super().__init__(unet, vae, config, name)
        self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2 = text_encoder, text_encoder_2, tokenizer, tokenizer_2
        side = config.unet.sample_size * self.latent_scale
        self.image_size = (side, side)

    def set_image_size(self, height, width):
        self.image_size = (height, width)

    def _text(self, prompts):
        device = next(self.text_encoder.parameters()).device
        return encode_prompt(self.text_encoder, self.text_encoder_2, self.tokenizer(prompts).to(device),
                             self.tokenizer_2(prompts).to(device))

    @torch.no_grad()
    def encode(self, prompts):
        """Prompts -> {encoder_hidden_states (B, 77, 2048), text_embeds (B, 1280), time_ids (B, 6)} (SDXL widths)."""
        hidden, pooled = self._text(prompts)
        ids = time_ids(self.image_size, (0, 0), self.image_size, len(prompts)).to(hidden.device)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": ids}

    def null_cond(self, n):
        """Zeros for the text states and the pooled vector (force_zeros_for_empty_prompt); time ids shared with c."""
        p = next(self.text_encoder.parameters())
        width = self.text_encoder.cfg.width + self.text_encoder_2.cfg.width
        return {"encoder_hidden_states": torch.zeros(n, self.tokenizer.max_length, width, device=p.device, dtype=p.dtype),
                "text_embeds": torch.zeros(n, self.text_encoder_2.cfg.projection_dim, device=p.device, dtype=p.dtype)}

    def to(self, device, dtype=None):
        """As Pipeline.to, except that float16 leaves the VAE in float32: the stock SDXL VAE overflows in float16
        (diffusers' `force_upcast`); bfloat16 keeps float32's range and is used as is."""
        super().to(device, dtype)
        if dtype == torch.float16:
            self.vae.to(torch.float32)
        return self

    def read_weights(self, path):
        if checkpoint_family(path) == "sd15":
            raise CheckpointError(f"{path} is an SD1.5 checkpoint, not an SDXL one: use it with --model sd15.")
        return read_unet_weights(path, self.config.unet)

    def self_npo_batches(self, data, batch_size, generator, resolution=1024):
        """Self-NPO training batches with SDXL's random-crop micro-conditioning (the authors' train_xl.py).

        Captions are encoded once with both text encoders. Each draw (a batch of indices, reshuffled every
        epoch with `generator`) loads its images again, resizes the short side to `resolution` and crops at a
        random (top, left) (data.load_image_random_crop, drawn with `generator`), encodes the crops with the
        frozen VAE and draws latents `scaling_factor * (mean + std * eps)` (eps from `generator` too, after
        the crops). Time ids: ((resolution, resolution), (crop top, crop left), (resolution, resolution)),
        the same for both branches. Batches `(latents (B, 4, R/8, R/8), cond)` come forever, on the
        denoiser's device; runs are reproducible from the seed and `--resume` continues them exactly (the
        crops come from the saved generator).

        Trade-off: encoding per draw (rather than caching one latent per image) costs one VAE encoder pass per
        image per step (in chunks of 4, no grad) and keeps the VAE on its device for the run. That is exact
        (the VAE sees exactly the cropped pixels, crops at 1-pixel steps, as the authors' script) and about
        +5% compute at 1024 px (VAE encoder 4.9 TFLOP per image; a Self-NPO step 2 (K + 1) guided UNet
        forwards of 6.8 TFLOP plus the student's forward and backward; FLOPs counted, README); a latent cache would need one encoding
        per possible crop or crops quantised to 8 px with VAE edge effects. Under torchrun every rank draws
        and encodes the global batch (ShardedBatches keeps its rows).

        Raises: FileNotFoundError / ValueError for a bad folder or unreadable image (npo_min.data), ValueError
        for a batch larger than the data or a resolution that is not a multiple of 8.
        """
        if data is None:
            raise ValueError("--model sdxl needs --data DIR: a folder of images with same-name .txt captions.")
        pairs = image_caption_pairs(data)
        if batch_size > len(pairs):
            raise ValueError(f"--batch-size {batch_size} exceeds the {len(pairs)} images in {data}.")
        if resolution % self.vae.downscale:
            raise ValueError(f"--resolution must be a multiple of {self.vae.downscale}; got {resolution}.")
        for path, _ in pairs:  # files that are no image fail now (header only), not at a later step
            try:
                Image.open(path).close()
            except (OSError, ValueError) as e:
                raise ValueError(f"{path} is not a readable image ({e}): remove or replace it.") from None
        conds = []
        with torch.no_grad():
            for i in range(0, len(pairs), 8):
                hidden, pooled = self._text([caption for _, caption in pairs[i : i + 8]])
                conds.append({"encoder_hidden_states": hidden.cpu(), "text_embeds": pooled.cpu()})
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        print(f"encoded {len(pairs)} captions; images are cropped at random and VAE-encoded at {resolution} px per step")
        return _crop_batches([p for p, _ in pairs], cond, self.vae, resolution, batch_size, generator,
                             next(self.denoiser.parameters()).device)


def _crop_batches(paths, cond, vae, resolution, batch_size, generator, device):
    # a module-level function, so the batches hold the VAE and the encoded captions but not the text encoders;
    # MappedBatches: the data order can be saved and resumed (train.py --resume)
    sf, p = vae.cfg.scaling_factor, next(vae.parameters())

    def batch(idx):
        crops = [load_image_random_crop(paths[i], resolution, generator) for i in idx.tolist()]
        pixels = torch.stack([x for x, _ in crops])  # (B, 3, R, R)
        means, stds = [], []
        with torch.no_grad():
            for chunk in pixels.split(4):
                mean, logvar = vae.encode(chunk.to(p.device, p.dtype))  # (b, 4, R/8, R/8) each
                means.append(mean.float().cpu())
                stds.append(torch.exp(0.5 * logvar).float().cpu())
        mean, std = torch.cat(means), torch.cat(stds)
        eps = torch.randn(mean.shape, generator=generator)
        ids = torch.cat([time_ids((resolution, resolution), top_left, (resolution, resolution)) for _, top_left in crops])
        return (sf * (mean + std * eps)).to(device), {**{k: v[idx].to(device) for k, v in cond.items()}, "time_ids": ids.to(device)}
    return MappedBatches(shuffled_batches(len(paths), batch_size, generator), batch)


def _tokenizers(tok_dir: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """tokenizer/ + tokenizer_2/ of a folder, or one vocabulary folder for both (the second padded with "!",
    as SDXL's tokenizer_2). Raises FileNotFoundError: no vocab.json + merges.txt found."""
    first, second = tok_dir / "tokenizer", tok_dir / "tokenizer_2"
    if (first / "vocab.json").is_file():
        return load_tokenizer(first), (load_tokenizer(second) if (second / "vocab.json").is_file() else load_tokenizer(first, pad_token="!"))
    if (tok_dir / "vocab.json").is_file():
        return load_tokenizer(tok_dir), load_tokenizer(tok_dir, pad_token="!")
    raise FileNotFoundError(
        f"no CLIP tokenizer at {tok_dir} (vocab.json + merges.txt, or tokenizer/ and tokenizer_2/ folders). A single-file "
        "checkpoint holds no vocabulary: pass --tokenizer DIR (e.g. the stable-diffusion-xl-base-1.0 folder) or put "
        "tokenizer/ and tokenizer_2/ folders next to it.")


def load(weights: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
         config: str | SDXLConfig | None = None, tokenizer: str | os.PathLike | None = None) -> SDXLPipeline:
    """Load UNet, VAE, both text encoders and tokenizers from `sd_xl_base_1.0.safetensors` or a diffusers folder.

    Args:
        weights: the single file (or `.ckpt`, read with torch.load(weights_only=True)) or a diffusers folder with
            unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/.
        device, dtype: where every module goes and its parameter dtype (float16 keeps the VAE in float32).
        config: a PRESETS name of npo_min.sdxl or an SDXLConfig. None: "sdxl" for a single file; for a folder,
            what its config.json files describe.
        tokenizer: a folder with tokenizer/ + tokenizer_2/ or one vocab.json + merges.txt (default: the
            folder itself, or the single file's folder).
    Raises:
        CheckpointError: missing path; an SD1.5 / SD2 checkpoint (named, with the --model to use); a missing
            part (e.g. text_encoder_2/); missing / unexpected / misshapen weights; config mismatch.
        FileNotFoundError: no tokenizer found.
    """
    if weights is None:
        raise CheckpointError("--model sdxl needs --weights: sd_xl_base_1.0.safetensors or the diffusers folder (see weights/README.md).")
    path = Path(weights)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Pass an SDXL single file or diffusers folder (big files go under weights/).")
    family = checkpoint_family(path)
    if family in ("sd15", "sd2"):
        what = "SD1.5 (CLIP-L only, no text_encoder_2)" if family == "sd15" else "SD2 (OpenCLIP-H only)"
        raise CheckpointError(f"{path} is an {what} checkpoint, not SDXL: use --model sd15 for SD1.5, or pass an SDXL checkpoint.")
    if path.is_dir():
        cfg = config_from_folder(path) if config is None else get_config(config)
    else:
        cfg = get_config(config or "sdxl")
    unet, vae, text, text_2 = load_parts(path, cfg, dtype)
    tok_1, tok_2 = _tokenizers(Path(tokenizer) if tokenizer else (path if path.is_dir() else path.parent))
    pipe = SDXLPipeline(unet, vae.requires_grad_(False), text, text_2, tok_1, tok_2, cfg, f"sdxl:{weights}")
    return pipe.to(device)
