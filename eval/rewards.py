"""Differentiable rewards R in [0, 1] for reward-NPO (Diffusion-NPO Eq. 7: R_npo = 1 - R), over the project's scorers.

    reward = load_reward("pickscore")              # weights under weights/ (eval/t2i/score.py's layout)
    r = reward(images, prompts)                    # images (B, C, H, W) in [-1, 1], differentiable -> (B,)

Names and their scaling to [0, 1]:
  digits-margin        the digits classifier's (eval/benchmark/classifier.py) margin m of the intended class
                       (prompts are the class names "0".."9"), R = sigmoid(m / 10): the benchmark's samples have
                       m about 13, R about 0.79, so R has headroom both ways;
  digits-margin-judge  the same with the second, independently trained classifier `weights/digits_judge`
                       (another architecture and seed): the reward that judges, never the one that trains;
  pickscore            PickScore / 100 (the authors' video code uses |1 - score / 100|);
  hpsv21               HPSv2.1 / 100 (= the cosine);
  aesthetic            LAION aesthetic / 10 (the predictor's range is about 1-10);
  imagereward          sigmoid(ImageReward) (ImageReward is a standardised score, about -2..2).
The image-text scorers see the images through a tensor version of their preprocessing (bicubic resize with
antialiasing, crop or pad to 224, CLIP normalisation), so gradients reach the pixels; pillow's bicubic filter
(the scorers' own PIL path) differs from it by float rounding-level amounts on smooth images.

A reward whose weights are not installed raises RewardUnavailable (a ValueError) with one line saying which
file is missing and where it goes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from eval.t2i.scorers import CLIP_MEAN, CLIP_STD

ROOT = Path(__file__).resolve().parents[1]
DIGITS_JUDGE = ROOT / "weights" / "digits_judge"
MARGIN_TEMPERATURE = 10.0
T2I = {"pickscore": 0.01, "hpsv21": 0.01, "aesthetic": 0.1, "imagereward": None}  # scale (None: sigmoid)
NAMES = ("digits-margin", "digits-margin-judge", *T2I)


class RewardUnavailable(ValueError):
    """A reward name that is unknown or whose weights are not installed."""


class DigitsMargin:
    """R = sigmoid(margin / MARGIN_TEMPERATURE) of the intended class under a digits classifier."""

    def __init__(self, classifier: torch.nn.Module, name: str):
        self.classifier, self.name = classifier.eval().requires_grad_(False), name

    def margin(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw margin `(B,)`: intended logit minus the best other logit (images `(B, 1, 8, 8)` in [-1, 1])."""
        labels = torch.tensor([int(p) for p in prompts], device=images.device)
        logits = self.classifier(images.clamp(-1, 1))  # (B, 10)
        target = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf"))
        return target - others.max(dim=1).values

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.margin(images, prompts) / MARGIN_TEMPERATURE)


def _resize_shortest_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """`(B, 3, H, W)` -> `(B, 3, size, size)`: shortest side to size (bicubic, antialiased), centre crop."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, int(h * scale)), max(size, int(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]


def _resize_longest_pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """`(B, 3, H, W)` -> `(B, 3, size, size)`: longest side to size, padded with black (0 before normalising)."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)


class T2IReward:
    """A text-to-image scorer of eval/t2i on tensors: R = scale * score (or sigmoid(score))."""

    def __init__(self, scorer, name: str):
        self.scorer, self.name, self.scale = scorer, name, T2I[name]

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2  # [-1, 1] -> [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # greyscale -> RGB
        x = _resize_longest_pad(x, 224) if self.name == "hpsv21" else _resize_shortest_crop(x, 224)
        mean, std = torch.tensor(CLIP_MEAN, device=x.device), torch.tensor(CLIP_STD, device=x.device)
        return ((x - mean[:, None, None]) / std[:, None, None]).to(self.scorer.dtype)  # (3,) -> (3, 1, 1)

    def raw(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The scorer's own number `(B,)` (PickScore ~21, HPS ~27, aesthetic ~5, ImageReward ~0)."""
        s, pixels = self.scorer, self.pixels(images).to(self.scorer.device)
        if self.name == "aesthetic":
            return s.head(F.normalize(s.model(pixels).float(), dim=-1))
        if self.name == "imagereward":
            ids, mask = s.tokenizer(prompts)
            return s.model(pixels, ids.to(s.device), mask.to(s.device)).float()
        texts = prompts if s.clean_prompt is None else [s.clean_prompt(p) for p in prompts]
        img = F.normalize(s.model.get_image_features(pixels).float(), dim=-1)
        txt = F.normalize(s.model.get_text_features(s.tokenizer(texts).to(s.device)).float(), dim=-1)
        return s.scale * (img * txt).sum(-1)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raw = self.raw(images, prompts)
        return torch.sigmoid(raw) if self.scale is None else self.scale * raw


def load_reward(name: str, weights_dir: str | os.PathLike | None = None, device: str = "cpu"):
    """The reward called `name` (see the module docstring), frozen, on `device`.

    Raises RewardUnavailable: an unknown name, or weights that are not installed (which file, where it goes).
    """
    if name not in NAMES:
        raise RewardUnavailable(f"unknown reward {name!r}: choose one of {', '.join(NAMES)}.")
    if name.startswith("digits"):
        from eval.benchmark.classifier import DEFAULT_WEIGHTS, load_classifier

        path = Path(weights_dir) if weights_dir else (DIGITS_JUDGE if name.endswith("judge") else DEFAULT_WEIGHTS)
        if not (path / "model.safetensors").is_file():
            hint = ("train it: python -m eval.benchmark.classifier --arch mlp --seed 1 --out weights/digits_judge"
                    if name.endswith("judge") else "it ships with the repository")
            raise RewardUnavailable(f"reward {name} is not installed: {path / 'model.safetensors'} not found ({hint}).")
        return DigitsMargin(load_classifier(path).to(device), name)
    from eval.t2i import WEIGHTS_DIR
    from eval.t2i.score import WEIGHTS, load_scorer, weight_paths

    args = SimpleNamespace(weights_dir=str(weights_dir or WEIGHTS_DIR), **{flag[2:].replace("-", "_"): None for _, flag, _ in WEIGHTS.values()})
    try:
        paths = weight_paths(args, [name])
    except FileNotFoundError as e:
        where = re.sub(r",? or pass --[\w-]+ PATH\.?$", "", str(e)).rstrip(".")  # score.py's flags are not train.py's
        raise RewardUnavailable(f"reward {name} is not installed: {where} (or pass --reward-weights DIR holding that layout).") from None
    scorer = load_scorer(name, paths, device, torch.float32, batch_size=16)
    for module in (scorer.model, getattr(scorer, "head", None)):
        if module is not None:
            module.eval().requires_grad_(False)
    return T2IReward(scorer, name)
