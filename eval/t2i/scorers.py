"""Image rewards of the Diffusion-NPO / Self-NPO text-to-image evaluation: PickScore, HPSv2.1, LAION aesthetic.

Every scorer, ImageReward (imagereward.py) included, implements `Scorer`: `Cls.load(*paths, device=,
dtype=, batch_size=, preset=)` and `score(images: list[PIL.Image], prompts: list[str]) -> Tensor (N,)`,
float32 on the CPU, batched internally. All three here see 224 x 224 images normalized with CLIP's mean / std:

- PickScore (Kirstain et al. 2023): CLIP ViT-H/14 in the transformers layout
  (yuvalkirstain/PickScore_v1); shortest side -> 224 bicubic, center crop (transformers'
  CLIPImageProcessor); score = logit_scale.exp() * cosine(image, text), about 21-23 on
  Pick-a-Pic.
- HPSv2.1 (Wu et al. 2023): OpenCLIP ViT-H/14 (`HPS_v2.1_compressed.pt`, mapped with
  eval.t2i.clip_checkpoints.open_clip_to_hf); longest side -> 224 bicubic, pad to a square with black, as
  HPSv2's `ResizeMaxSize`; OpenCLIP's tokenizer (pads with id 0, HTML entities unescaped);
  score = 100 * cosine (HPSv2's own `score()` returns the cosine itself; papers print x100, ~27-30).
- Aesthetic (LAION improved-aesthetic-predictor): OpenAI CLIP ViT-L/14 image embedding,
  L2-normalised, -> RewardMLP: Linear 768-1024-128-64-16-1 without activations, the same head as
  ImageReward's (`sac+logos+ava1-l14-linearMSE.pth`, keys layers.{0,2,4,6,7}); the prompt is not used.
  Preprocessing as OpenAI CLIP's torchvision pipeline (Resize + CenterCrop, whose crop offset rounds
  where transformers' floors).

Resizing uses pillow's bicubic filter, as both reference pipelines do on PIL images, so the
preprocessed pixels match them exactly (up to float rounding). Non-RGB images are converted with
`Image.convert("RGB")` first (transformers composites RGBA onto white instead; generated images
are RGB). ftfy's text repair, which OpenCLIP applies to prompts, is not: plain-text prompts are
unaffected, curly quotes / ligatures / full-width characters may tokenize differently.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from npo_min.checkpoint import CheckpointError, load_into, load_state_dict
from eval.t2i.clip_checkpoints import load_clip, load_clip_vision
from npo_min.clip_vision import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
from npo_min.clip_tokenizer import CLIPTokenizer, load_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224

# Architecture of each scorer's CLIP (npo_min.clip.CLIP_PRESETS names; tests swap in tiny configs).
PRESETS = {"pickscore": "vit_h_14", "hpsv21": "vit_h_14", "aesthetic": "vit_l_14"}


# ----------------------------------------------------------------------------------------------
# Preprocessing


def resize_shortest_center_crop(image: Image.Image, size: int = IMAGE_SIZE, crop_rounding: str = "floor") -> Image.Image:
    """Shortest side -> size (bicubic), then the central size x size square.

    The long side becomes int(size * long / short) (truncated), as in transformers and torchvision.
    crop_rounding: how the crop offset (extra / 2) rounds when extra is odd: "floor" as transformers'
    CLIPImageProcessor (PickScore), "round" as torchvision's CenterCrop (OpenAI CLIP, the aesthetic
    predictor; Python's round-half-to-even).
    """
    if crop_rounding not in ("floor", "round"):
        raise ValueError(f"crop_rounding must be 'floor' or 'round', got {crop_rounding!r}.")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), Image.BICUBIC)

    def offset(extra: int) -> int:
        return extra // 2 if crop_rounding == "floor" else int(round(extra / 2.0))

    left, top = offset(new_w - size), offset(new_h - size)
    return image.crop((left, top, left + size, top + size))


def resize_longest_pad(image: Image.Image, size: int = IMAGE_SIZE, fill: int = 0) -> Image.Image:
    """Longest side -> size (bicubic, other side round(side * scale)), then pad to size x size with `fill`.

    The padding is centred, the odd pixel going right / bottom (HPSv2's ResizeMaxSize). HPSv2 skips
    resize and pad when the longest side is already `size`; for a non-square image that would not
    give a square input at all, so here the pad is always applied.
    """
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = round(w * scale), round(h * scale)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    canvas = Image.new(image.mode, (size, size), fill)
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def to_normalized_tensor(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, (pixel / 255 - mean) / std per channel."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def preprocess_clip(image: Image.Image, size: int = IMAGE_SIZE, crop_rounding: str = "floor") -> torch.Tensor:
    """PickScore / OpenAI CLIP input: RGB, shortest side -> size, center crop, normalize -> (3, size, size)."""
    return to_normalized_tensor(resize_shortest_center_crop(image.convert("RGB"), size, crop_rounding))


def preprocess_hps(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """HPSv2 input: RGB, longest side -> size, pad with black to a square, normalize -> (3, size, size)."""
    return to_normalized_tensor(resize_longest_pad(image.convert("RGB"), size, fill=0))


def clean_prompt_open_clip(text: str) -> str:
    """OpenCLIP's prompt cleaning minus ftfy: HTML entities unescaped twice, whitespace collapsed, stripped."""
    return " ".join(html.unescape(html.unescape(text)).split())


# ----------------------------------------------------------------------------------------------
# The scorer interface


class Scorer:
    """The interface of every text-to-image scorer: PickScore, HPSv21, Aesthetic (here), ImageReward (imagereward.py).

    Load:   `Cls.load(*paths, device="cpu", dtype=torch.float32, batch_size=16, preset=None)`; paths are the
            scorer's weight files (its load docstring names them), preset its architecture (None: the
            published one; tests pass tiny configs). The weights load strictly, in eval mode, gradients off.
    Score:  `score(images: list[PIL.Image], prompts: list[str]) -> (N,)` float32 on the CPU, one score per
            (images[i], prompts[i]) pair, computed `batch_size` pairs at a time; a pair's score does not
            depend on the batch (up to float rounding). Every scorer takes the prompts; Aesthetic ignores them.
    State:  `model` (the nn.Module that holds the weights), `batch_size`; `device` and `dtype` are the model's.

    A scorer writes `load` and `score_batch`; batching and the input checks are `score`'s.
    """

    def __init__(self, model: nn.Module, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model, self.batch_size = model, batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @classmethod
    def load(cls, *paths: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             batch_size: int = 16, preset=None) -> "Scorer":
        raise NotImplementedError

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores (B,) of one batch of pairs (any float dtype, any device)."""
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """One score per (images[i], prompts[i]) pair: (N,) float32 on the CPU; (0,) for no images.

        Raises:
            ValueError: different numbers of images and prompts, or batch_size < 1.
            TypeError: an image that is not a PIL image, or a prompt that is not a str.
        """
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts: pass one prompt per image.")
        for im in images:
            if not isinstance(im, Image.Image):
                raise TypeError(f"images must be PIL images (PIL.Image.Image), got {type(im).__name__}.")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be str, got {type(p).__name__}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        bs = self.batch_size
        out = [self.score_batch(images[i:i + bs], prompts[i:i + bs]).float().cpu() for i in range(0, len(images), bs)]
        return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------------
# CLIP image-text scorers


class CLIPScorer(Scorer):
    """scale * cosine(image embedding, prompt embedding) with a two-tower CLIPModel.

    Args:
        model: a CLIPModel (eval mode), already on its device.
        tokenizer: prompts -> (B, 77) ids.
        preprocess: PIL image -> (3, 224, 224) normalized tensor.
        scale: a number, or None for the model's own logit_scale.exp().
        clean_prompt: applied to every prompt before tokenizing (None: as is).
        batch_size: pairs per forward pass.
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, preprocess: Callable[[Image.Image], torch.Tensor],
                 scale: float | None = None, clean_prompt: Callable[[str], str] | None = None,
                 batch_size: int = 16):
        super().__init__(model, batch_size)
        self.tokenizer, self.preprocess, self.clean_prompt = tokenizer, preprocess, clean_prompt
        self.scale = float(model.logit_scale.detach().float().exp()) if scale is None else float(scale)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)  # (B, 3, 224, 224)
        texts = prompts if self.clean_prompt is None else [self.clean_prompt(p) for p in prompts]
        ids = self.tokenizer(texts).to(self.device)  # (B, 77)
        img = F.normalize(self.model.get_image_features(pixels).float(), dim=-1)
        txt = F.normalize(self.model.get_text_features(ids).float(), dim=-1)
        return self.scale * (img * txt).sum(-1)


def _as_tokenizer(tokenizer: str | os.PathLike | CLIPTokenizer, **kw) -> CLIPTokenizer:
    return tokenizer if isinstance(tokenizer, CLIPTokenizer) else load_tokenizer(tokenizer, **kw)


class PickScore(CLIPScorer):
    """PickScore_v1: logit_scale.exp() * cosine, CLIPImageProcessor-style crop, transformers tokenization.

    The tokenizer's pad token does not matter: the text tower is causal and pooled at the first EOS.
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, batch_size: int = 16):
        super().__init__(model, tokenizer, preprocess_clip, scale=None, batch_size=batch_size)

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer: str | os.PathLike | CLIPTokenizer, *,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 16,
             preset: str | CLIPConfig | None = None) -> "PickScore":
        """path: a transformers CLIPModel folder (yuvalkirstain/PickScore_v1) or file; tokenizer: a CLIP
        tokenizer folder (vocab.json + merges.txt) or CLIP's bpe_simple_vocab_16e6.txt.gz; preset: None for
        PRESETS["pickscore"]. Raises: as load_clip (CheckpointError) and load_tokenizer."""
        model = load_clip(path, PRESETS["pickscore"] if preset is None else preset, dtype).to(device)
        return cls(model, _as_tokenizer(tokenizer), batch_size)


class HPSv21(CLIPScorer):
    """HPSv2.1: 100 * cosine, longest-side resize + pad, OpenCLIP tokenization (pad id 0, HTML unescaped)."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, batch_size: int = 16):
        super().__init__(model, tokenizer, preprocess_hps, scale=100.0, clean_prompt=clean_prompt_open_clip,
                         batch_size=batch_size)

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer: str | os.PathLike | CLIPTokenizer, *,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 16,
             preset: str | CLIPConfig | None = None) -> "HPSv21":
        """path: `HPS_v2.1_compressed.pt` (OpenCLIP layout, weights under 'state_dict'); tokenizer: as
        PickScore.load (a path is loaded with pad id 0, as OpenCLIP pads); preset: None for PRESETS["hpsv21"]."""
        model = load_clip(path, PRESETS["hpsv21"] if preset is None else preset, dtype).to(device)
        return cls(model, _as_tokenizer(tokenizer, pad_id=0), batch_size)


# ----------------------------------------------------------------------------------------------
# The reward MLP (LAION aesthetic predictor, ImageReward) and the aesthetic predictor


class RewardMLP(nn.Module):
    """The head of both the LAION aesthetic predictor and ImageReward v1.0 (upstream each is a class `MLP`
    with the same `layers`): Linear(in_width, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
    Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1).

    No activations (ImageReward's are commented out upstream): the head is one affine map, kept factored so
    the checkpoints' keys load as they are: `layers.{0,2,4,6,7}.{weight,bias}` in
    sac+logos+ava1-l14-linearMSE.pth, `mlp.layers.{0,2,4,6,7}.*` in ImageReward.pt (1, 3, 5 are the Dropout
    slots, which do nothing in eval mode).

    Args:
        in_width: the input feature width (768: CLIP ViT-L/14's image embedding, ImageReward's BERT [CLS]).
        widths: the four hidden widths (tests use smaller ones).
    """

    def __init__(self, in_width: int = 768, widths: tuple[int, ...] = (1024, 128, 64, 16)):
        super().__init__()
        a, b, c, d = widths
        self.layers = nn.Sequential(
            nn.Linear(in_width, a), nn.Dropout(0.2),
            nn.Linear(a, b), nn.Dropout(0.2),
            nn.Linear(b, c), nn.Dropout(0.1),
            nn.Linear(c, d),
            nn.Linear(d, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_width) features -> (B,) raw rewards."""
        return self.layers(x).squeeze(-1)


class Aesthetic(Scorer):
    """RewardMLP(normalize(CLIP ViT-L/14 image embedding)), about 1-10. Prompts are taken, as by every
    scorer, and ignored. `model` is the CLIP image tower (its device and dtype); the head stays float32."""

    def __init__(self, vision: CLIPVisionModel, head: RewardMLP, batch_size: int = 16):
        super().__init__(vision, batch_size)
        self.head = head

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([preprocess_clip(im, crop_rounding="round") for im in images])  # (B, 3, 224, 224)
        emb = self.model(pixels.to(self.device, self.dtype)).float()  # (B, 768)
        return self.head(F.normalize(emb, dim=-1))

    @classmethod
    def load(cls, path: str | os.PathLike, clip_path: str | os.PathLike, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, batch_size: int = 16,
             preset: str | CLIPVisionConfig | CLIPConfig | None = None) -> "Aesthetic":
        """path: the head `sac+logos+ava1-l14-linearMSE.pth` (read with weights_only=True); clip_path:
        OpenAI CLIP ViT-L/14, e.g. the openai/clip-vit-large-patch14 folder (only its image tower is loaded);
        preset: None for PRESETS["aesthetic"]. Raises: CheckpointError (missing file, keys or shapes)."""
        vision = load_clip_vision(clip_path, PRESETS["aesthetic"] if preset is None else preset, dtype).to(device)
        head = RewardMLP(vision.cfg.projection_dim)
        sd = {k.removeprefix("module."): v for k, v in load_state_dict(path).items()}
        load_into(head, sd, what=f"aesthetic MLP ({Path(path).name})")
        return cls(vision, head.to(device).eval().requires_grad_(False), batch_size)


__all__ = [
    "CLIP_MEAN", "CLIP_STD", "PRESETS", "Aesthetic", "CLIPScorer", "CheckpointError", "HPSv21", "PickScore",
    "RewardMLP", "Scorer", "clean_prompt_open_clip", "preprocess_clip", "preprocess_hps", "resize_longest_pad",
    "resize_shortest_center_crop", "to_normalized_tensor",
]
