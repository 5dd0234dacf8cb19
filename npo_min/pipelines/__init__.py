"""One interface for every model family, and the per-model defaults of train.py and sample.py.

A family lives in `npo_min/pipelines/<family>.py` and defines `load(weights, *, device, dtype, config,
tokenizer) -> Pipeline`. The scripts only talk to a `Pipeline`:

    pipe = load_pipeline("sd15", "weights/sd15")     # the family's load(), explicit arguments
    pipe.denoiser                                    # f(x_t (B, ...), t (B,), cond) -> eps: trained, offset
    pipe.encode(["a cat"]) / pipe.null_cond(n)       # c and c' (Cond: a tensor or a dict of tensors)
    pipe.noise(n, seed, height, width)               # x_T, sample i drawn from seed + i
    pipe.decode(x0)                                  # (B, C, H, W) images in [-1, 1]
    pipe.read_weights(path)                          # a full denoiser checkpoint in module names (key map)
    pipe.self_npo_batches(data, batch_size, gen)     # endless (x0, cond) batches for Self-NPO
    pipe.prediction_type, pipe.set_alpha_to_one      # what the denoiser outputs (eps or v), DDIM's last alpha
    pipe.video                                       # x0 (B, F, C, h, w) and decode -> (B, C, F, H, W) clips

`MODELS` is the one table of per-model defaults: the base weights, the Self-NPO recipe and the
sampler. Adding a family is adding its model files, its pipeline file and one row here.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..guidance import Cond
from ..schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[2]  # the repository: defaults under weights/ resolve from here
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Pipeline:
    """What train.py and sample.py need from a model family (subclassed by each family).

    Attributes:
        denoiser: the network `f(x_t, t, cond) -> eps` that Self-NPO fine-tunes and offsets change.
        schedule: its VP noise schedule (alphas_cumprod over T = 1000 timesteps).
        name: a description of the loaded base (recorded in a delta's metadata).
        class_names: the prompts of a class-conditional model (sample.py's default), else None.
        latent_scale: pixels per latent pixel (8 for SD's VAE, 1 for pixel-space models).
        lora_prefix: the denoiser's component in the diffusers pipeline, the prefix of PEFT LoRA names
            (npo_min/export.py): "unet", or "transformer" (CogVideoX).
        prediction_type: the denoiser's output, "epsilon" (SD, digits) or "v_prediction" (CogVideoX); the
            schedule's to_x0 / to_eps turn it into x0 and eps for the solvers and Self-NPO.
        set_alpha_to_one: DDIM's final alpha past t = 0 (the family's scheduler config; CogVideoX: True).
        video: samples are clips: `noise` takes num_frames, x0 is `(B, F, C, h, w)`, `decode` returns
            `(B, C, F, H, W)`; sample.py writes animated GIFs.
    """

    denoiser: torch.nn.Module
    schedule: NoiseSchedule
    name: str
    class_names: list[str] | None = None
    latent_scale: int = 1
    prediction_type: str = "epsilon"
    lora_prefix: str = "unet"  # the denoiser's component name in diffusers' pipeline (LoRA export names)
    set_alpha_to_one: bool = False
    video: bool = False

    def encode(self, prompts: list[str]) -> Cond:
        """Prompts (class names for class-conditional models) -> the positive conditioning c, batch len(prompts)."""
        raise NotImplementedError

    def null_cond(self, n: int) -> Cond:
        """The negative / unconditional conditioning c' of CFG, batch n."""
        raise NotImplementedError

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one x_T `(C, h, w)` for an image of height x width pixels.

        Raises ValueError: a size the model cannot produce (not a multiple of latent_scale, or < 1).
        """
        s = self.latent_scale
        if height < 1 or width < 1 or height % s or width % s:
            raise ValueError(f"--height and --width must be positive multiples of {s}; got {height} x {width}.")
        return (self.denoiser.cfg.in_channels, height // s, width // s)

    def set_image_size(self, height: int, width: int) -> None:
        """The size `encode` conditions on, for families whose conditioning includes it (SDXL's time ids);
        the others ignore it."""

    def noise(self, n: int, first_seed: int, height: int, width: int, **frames) -> torch.Tensor:
        """x_T ~ N(0, I) `(n, *noise_shape)`, float32 on the CPU; sample i from a generator seeded first_seed + i,
        so a sample does not depend on the batch it is drawn in. Video families take `num_frames=`."""
        shape = self.noise_shape(height, width, **frames)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(first_seed + i)) for i in range(n)])

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Denoised samples -> images `(B, C, H, W)` in [-1, 1] (clamped)."""
        raise NotImplementedError

    def read_weights(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """A full denoiser checkpoint of this family in the denoiser's module names (for weights - base)."""
        raise NotImplementedError

    def self_npo_batches(self, data: str | None, batch_size: int, generator: torch.Generator,
                         resolution: int | None = None) -> Iterator[tuple[torch.Tensor, Cond]]:
        """Endless `(x0 (B, C, h, w), cond)` batches of real data for Self-NPO's rollout start (Eq. 14)."""
        raise NotImplementedError

    def release_text_encoder(self) -> None:
        """Free the text encoder once every prompt is encoded (families with a large one, e.g. T5-XXL)."""

    def load_pixels(self, path: str | os.PathLike, resolution: int | None = None) -> torch.Tensor:
        """An image file -> `(C, H, W)` pixels in [-1, 1] as the model sees them (preference pairs, npo_min/pairs.py)."""
        raise NotImplementedError

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels `(B, C, H, W)` in [-1, 1] -> (mean, std) of the model's x0 (VAE posterior; std 0 in pixel space)."""
        raise NotImplementedError

    def decode_with_grad(self, x0: torch.Tensor) -> torch.Tensor:
        """As `decode`, but differentiable (reward fine-tuning back-propagates through it); not clamped."""
        raise NotImplementedError

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "Pipeline":
        """Move every module of the pipeline (the denoiser included)."""
        for module in vars(self).values():
            if isinstance(module, torch.nn.Module):
                module.to(device, dtype)
        return self


@dataclass(frozen=True)
class ModelSpec:
    """A row of MODELS: where the family's pipeline lives and its defaults (None = must be given)."""

    module: str                      # the family's pipeline module
    weights: str | None              # default base checkpoint, relative to the repository
    train: dict = field(default_factory=dict)   # Self-NPO defaults: steps, batch_size, lr, ...
    sample: dict = field(default_factory=dict)  # sampling defaults: guidance_scale, steps, solver, spacing, size
    pretrain: dict | None = None     # `train.py --method pretrain` defaults; None = comes pretrained
    npo: dict = field(default_factory=dict)  # Diffusion-NPO trainers (dpo-npo, reward-npo, ...) defaults; {} = none yet


MODELS = {
    # Sized for 2 CPU cores (README results); sampling as the digits benchmark (eval/benchmark).
    "digits": ModelSpec(
        "npo_min.pipelines.digits", "weights/digits",
        train=dict(steps=400, batch_size=64, grad_accum=1, lr=1e-4, weight_decay=1e-3),
        sample=dict(guidance_scale=3.0, steps=25, solver="ddim", spacing="trailing", height=8, width=8, batch_size=100),
        pretrain=dict(steps=4000, batch_size=128, lr=1e-3),  # AdamW, warm-up + cosine, 10% label dropout, EMA 0.999
        # Sized for 2 CPU cores; beta and lr chosen on this model (README, Diffusion-NPO on digits), LoRA rank as the authors'.
        npo=dict(steps=200, batch_size=64, grad_accum=1, lr=1e-3, weight_decay=1e-2, lora_rank=8, dpo_beta=500.0,
                 reward="digits-margin", reward_k=1, sample_steps=10, guidance_scale=3.0)),
    # Fashion-MNIST 28x28 (npo_min/fashion.py), sized for 2 CPU cores: pretraining <= 60 min on one torch thread
    # (threads=1 makes it reproducible), with the 10% and 30% EMA snapshots of the same run as the weak models of
    # autoguidance (written to OUT-10pct/, OUT-30pct/). Self-NPO at the digits lr, 100 steps of batch 16 (a 28x28 step
    # costs ~12x an 8x8 one; sized for the benchmark on 2 shared cores, not tuned).
    "fashion": ModelSpec(
        "npo_min.pipelines.fashion", "weights/fashion",
        train=dict(steps=100, batch_size=16, grad_accum=1, lr=1e-4, weight_decay=1e-3),
        sample=dict(guidance_scale=3.0, steps=25, solver="ddim", spacing="trailing", height=28, width=28, batch_size=100),
        pretrain=dict(steps=1600, batch_size=32, lr=1e-3, ema_rate=0.995, threads=1, snapshots=(0.1, 0.3)),
        # DPO-NPO as digits' (LoRA rank 8, beta 500, lr 1e-3), 100 steps of batch 16 like Self-NPO here; not tuned.
        # No fashion reward is registered for reward-NPO (eval/rewards.py): --reward must be given.
        npo=dict(steps=100, batch_size=16, grad_accum=1, lr=1e-3, weight_decay=1e-2, lora_rank=8, dpo_beta=500.0,
                 reward=None, reward_k=1, sample_steps=10, guidance_scale=3.0)),
    # The authors' SD1.5 recipe (Self-NPO/train.sh): lr 1e-6, AdamW wd 1e-3, 1000 steps, batch 80 = 20 x 4
    # accumulation on one GPU; sampling as their evaluation: DPM-Solver++(2M) 25 steps, scale 7.5, 512 px.
    # Their DPMSolverMultistep used "linspace" spacing (999, 959, ..., 40); "trailing" (999, ..., 39) is the nearest here.
    "sd15": ModelSpec(
        "npo_min.pipelines.sd15", None,
        train=dict(steps=1000, batch_size=20, grad_accum=4, lr=1e-6, weight_decay=1e-3),
        sample=dict(guidance_scale=7.5, steps=25, solver="dpmpp_2m", spacing="trailing", height=512, width=512, batch_size=4),
        # The authors' Diffusion-NPO DPO recipe (REFERENCE.md): LoRA rank 8 on to_q/to_k/to_v/to_out.0, beta 500
        # (SDXL: 2000), lr 5e-6, batch 64 = 8 x 8 accumulation, 2000 steps; reward-NPO: DRaFT-1 on PickScore.
        npo=dict(steps=2000, batch_size=8, grad_accum=8, lr=5e-6, weight_decay=1e-2, lora_rank=8, dpo_beta=500.0,
                 reward="pickscore", reward_k=1, sample_steps=25, guidance_scale=7.5)),
    # The authors' SDXL recipe (Self-NPO/train_xl.py, train_xl.sh): lr 1e-7, AdamW weight decay 0, 1000 steps, batch 10,
    # 1024 px, rollout w = -5 with zero unconditional embeddings (K 5 of N 25, EMA 0.999, pseudo-Huber 0.001 are the
    # shared defaults); sampling as their gen_xl.py: DPM-Solver++(2M) 25 steps, scale 5, 1024 px (`--solver euler`
    # is the other usual SDXL sampler); "leading" spacing with offset 1, as the scheduler config SDXL ships.
    "sdxl": ModelSpec(
        "npo_min.pipelines.sdxl", None,
        train=dict(steps=1000, batch_size=10, grad_accum=1, lr=1e-7, weight_decay=0.0, rollout_w=-5.0, resolution=1024),
        sample=dict(guidance_scale=5.0, steps=25, solver="dpmpp_2m", spacing="leading", height=1024, width=1024, batch_size=2),
        # Diffusion-NPO's SDXL DPO recipe: as SD1.5's with beta 2000 (sdxl_beta2k_2kiter), 1024 px.
        npo=dict(steps=2000, batch_size=8, grad_accum=8, lr=5e-6, weight_decay=1e-2, lora_rank=8, dpo_beta=2000.0,
                 reward="pickscore", reward_k=1, sample_steps=25, guidance_scale=5.0, resolution=1024)),
    # CogVideoX 2B / 5B (the authors' repository has no CogVideoX code; the paper states no video recipe).
    # Sampling is CogVideoXPipeline's: scale 6, 50 DDIM steps, trailing, 49 frames at 480 x 720, c' = T5("").
    # Self-NPO: the step is the paper's (N 25, K 5, w -1, EMA 0.999, pseudo-Huber 0.001: train.py's flags);
    # the optimisation is ours: the SD1.5 lr 1e-6 and wd 1e-3, 1000 steps, batch 8 = 1 clip x 8 accumulation
    # (one 49-frame clip is 17,550 video tokens), on clips of 49 frames at 480 x 720, the model's training size.
    "cogvideox": ModelSpec(
        "npo_min.pipelines.cogvideox", None,
        train=dict(steps=1000, batch_size=1, grad_accum=8, lr=1e-6, weight_decay=1e-3, resolution="480x720", num_frames=49),
        sample=dict(guidance_scale=6.0, steps=50, solver="ddim", spacing="trailing", height=480, width=720, num_frames=49,
                    batch_size=1),
        # Diffusion-NPO on video: every value here is ours (neither paper gives a video DPO recipe): the SD1.5 DPO
        # recipe (LoRA rank 8 on to_q/to_k/to_v/to_out.0, beta 500, lr 5e-6, batch 64 = 1 clip x 64 accumulation,
        # 2000 steps; the DPO errors are on v, the model's target: npo_min/dpo.py) at the model's training size.
        # The authors' video reward code is DR-Video-NPO (= --method guided-reward-npo, REFERENCE.md): PickScore,
        # gradient through the last step, DDIM 25 steps, scale 12 (theirs, on VideoCrafter2); its lr 1e-5 is not
        # taken (one lr per row). The reward is the mean over the decoded frames (theirs: one random frame).
        npo=dict(steps=2000, batch_size=1, grad_accum=64, lr=5e-6, weight_decay=1e-2, lora_rank=8, dpo_beta=500.0,
                 reward="pickscore", reward_k=1, sample_steps=25, guidance_scale=12.0, resolution="480x720",
                 num_frames=49)),
}


def default_weights(model: str) -> str | None:
    """The spec's default base checkpoint as an absolute path (so the CLIs work from any directory)."""
    w = MODELS[model].weights
    return None if w is None else str(ROOT / w)


def load_pipeline(model: str, weights: str | os.PathLike, **options) -> Pipeline:
    """`MODELS[model]`'s family `load(weights, **options)`: device, dtype, config, tokenizer as the family takes.

    Options the family's load does not take are dropped when None (a CLI flag left unset) and refused otherwise.

    Raises:
        ValueError: unknown model name, or an option this family does not take. CheckpointError: what the
            family's loader raises.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: choose one of {sorted(MODELS)}.")
    load = importlib.import_module(MODELS[model].module).load
    takes = inspect.signature(load).parameters
    foreign = sorted(k for k, v in options.items() if k not in takes and v is not None)
    if foreign:
        raise ValueError(f"--model {model} does not take {', '.join('--' + k.replace('_', '-') for k in foreign)}.")
    return load(weights, **{k: v for k, v in options.items() if k in takes})
