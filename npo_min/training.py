"""Training loops, model-agnostic: a UNet `f(x, t, context)`, an iterator of `(x0, context)` batches.

`self_npo` runs truncated diffusion fine-tuning (npo_min/self_npo.py) and returns the student;
`pretrain` is the plain diffusion objective used to make the digits base model. Both log the loss
to a list of dicts that the CLI writes out.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .data import shuffled_batches
from .schedule import NoiseSchedule
from .self_npo import SelfNPOConfig, denoising_loss, ema_update, tdft_loss, truncated_rollout

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (x0 (B, C, H, W), context (B, L, D))


def self_npo(
    student: torch.nn.Module,
    batches: Batches,
    null_context: torch.Tensor,
    schedule: NoiseSchedule,
    cfg: SelfNPOConfig,
    steps: int,
    lr: float,
    weight_decay: float = 1e-3,
    grad_clip: float = 1.0,
    grad_accum: int = 1,
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    prediction_type: str = "epsilon",
) -> list[dict]:
    """Fine-tune `student` in place with TDFT; the EMA target starts as a copy of it.

    null_context: `(1, L, D)` the c' used inside the rollout (and for cond_drop).
    prediction_type: the student's output, "epsilon" (SD, digits) or "v_prediction" (CogVideoX).
    Authors' SD1.5 defaults: AdamW lr 1e-6, weight decay 1e-3, grad clip 1.0, constant LR,
    1000 steps at batch 80. Returns the per-step log.

    Raises:
        ValueError: steps or grad_accum < 1.
    """
    if steps < 1 or grad_accum < 1:
        raise ValueError(f"steps and grad_accum must be >= 1; got {steps}, {grad_accum}.")
    target = copy.deepcopy(student).eval().requires_grad_(False)
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    log, start = [], time.time()
    bar = tqdm(range(1, steps + 1), desc="self-npo", disable=not progress)
    for step in bar:
        total = 0.0
        for _ in range(grad_accum):
            x0, cond = next(batches)
            with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                x_t, t, x0_target = truncated_rollout(target, x0, cond, null_context, schedule, cfg, generator,
                                                      prediction_type=prediction_type)
                loss = tdft_loss(student, x_t, t, x0_target, cond, null_context, schedule, cfg, generator,
                                 prediction_type) / grad_accum
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(target, student, cfg.ema_rate)
        entry = {"step": step, "loss": total, "grad_norm": grad_norm, "mean_t": t.float().mean().item(), "seconds": time.time() - start}
        log.append(entry)
        bar.set_postfix(loss=f"{total:.4g}")
        if on_step:
            on_step(step, entry)
    student.eval()
    return log


def pretrain(
    unet: torch.nn.Module,
    embed: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    schedule: NoiseSchedule,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    label_drop: float = 0.1,
    ema_rate: float = 0.999,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Train a class-conditional eps-prediction model from scratch (plain diffusion objective).

    Labels are replaced by `null_label` with probability `label_drop` (CFG's unconditional branch).
    AdamW with linear warm-up (200 steps) then cosine decay; returns (EMA state dict with keys
    `unet.*` / `class_embedding.*`, per-step log).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}.")
    model = torch.nn.ModuleDict({"unet": unet, "class_embedding": embed}).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    index = shuffled_batches(len(images), batch_size, generator)
    log, start = [], time.time()
    bar = tqdm(range(1, steps + 1), desc="pretrain", disable=not progress)
    for step in bar:
        idx = next(index)
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=generator) < label_drop] = null_label
        loss = denoising_loss(unet, images[idx], embed(y), schedule, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, ema_rate if step > warmup else 0.0)
        log.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0], "seconds": time.time() - start})
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return ema.state_dict(), log
