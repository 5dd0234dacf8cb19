"""Training loops, model-agnostic: a UNet `f(x, t, context)`, an iterator of `(x0, context)` batches.

`self_npo` runs truncated diffusion fine-tuning (npo_min/self_npo.py) and returns the student;
`pretrain` is the plain diffusion objective used to make the digits base model. Both log the loss
to a list of dicts that the CLI writes out.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import sys
import threading
import time
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from . import distributed
from .data import shuffled_batches
from .schedule import NoiseSchedule
from .self_npo import SelfNPOConfig, denoising_loss, ema_update, sharded, tdft_loss, truncated_rollout

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (x0 (B, C, H, W), context (B, L, D))


class NonFiniteError(ValueError):
    """Training produced a NaN / Inf loss or gradient (diverged); `step` is the optimizer step (1-based)."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


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
    resume: dict | None = None,
    save: Callable[[dict], None] | None = None,
    save_every: int = 0,
    dist: "distributed.Dist | None" = None,
) -> list[dict]:
    """Fine-tune `student` in place with TDFT; the EMA target starts as a copy of it.

    null_context: `(1, L, D)` the c' used inside the rollout (and for cond_drop).
    prediction_type: the student's output, "epsilon" (SD, digits) or "v_prediction" (CogVideoX).
    Authors' SD1.5 defaults: AdamW lr 1e-6, weight decay 1e-3, grad clip 1.0, constant LR,
    1000 steps at batch 80. Returns the per-step log.

    Resumable: every `save_every` steps (and at a Ctrl-C, after the step in progress) `save(state)` gets
    `training_state(...)`: student, EMA target, optimizer, step, log, the RNG states of torch and of
    `generator`, and the data order (if `batches` has `state_dict`). `resume=state` continues from it;
    the result is bitwise that of an uninterrupted run (same device and threads).

    dist: a data-parallel run (npo_min/distributed.py, torchrun): the student is wrapped in
    DistributedDataParallel, `batches` must yield this rank's shard (distributed.ShardedBatches) and the
    random draws are sharded the same way, so N ranks equal one process with N times the batch; the
    logged loss is the mean over ranks. Pass `save` on rank 0 only.

    Raises:
        ValueError: steps or grad_accum < 1, a resume state past `steps`.
        NonFiniteError: a NaN / Inf loss or gradient norm, at the step it appears (before the optimizer
            applies it, so the student and the last saved state stay finite).
        KeyboardInterrupt: Ctrl-C, after saving the state of the last finished step (if `save`).
    """
    if steps < 1 or grad_accum < 1:
        raise ValueError(f"steps and grad_accum must be >= 1; got {steps}, {grad_accum}.")
    target = copy.deepcopy(student).eval().requires_grad_(False)
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    log, first = [], 1
    if resume is not None:
        first = restore_training_state(resume, student, target, opt, batches, generator) + 1
        log = list(resume["log"])
        if first > steps + 1:
            raise ValueError(f"the resume checkpoint is at step {first - 1}, past --steps {steps}.")
    state = lambda step: training_state(step, log, student, target, opt, batches, generator)  # noqa: E731
    model, shard = student, contextlib.nullcontext()
    if dist is not None:  # gradients averaged over ranks in backward; draws sliced per rank
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None)
        shard, progress = sharded(dist.rank, dist.world), progress and dist.main
    start = time.time() - (log[-1]["seconds"] if log else 0.0)
    bar = tqdm(range(first, steps + 1), desc="self-npo", disable=not progress, initial=first - 1, total=steps)
    with _interrupt_after_step() as interrupted, shard:
        for step in bar:
            total = 0.0
            for micro in range(grad_accum):
                x0, cond = next(batches)
                sync = model.no_sync() if dist is not None and micro < grad_accum - 1 else contextlib.nullcontext()
                with sync:  # DDP: no gradient all-reduce until the last micro-step
                    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        x_t, t, x0_target = truncated_rollout(target, x0, cond, null_context, schedule, cfg, generator,
                                                              prediction_type=prediction_type)
                        loss = tdft_loss(model, x_t, t, x0_target, cond, null_context, schedule, cfg, generator,
                                         prediction_type) / grad_accum
                    loss.backward()
                total += loss.item()
            if dist is not None:
                total = distributed.mean(total, x0.device)  # the same on every rank, so all stop together
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip).item()
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                raise NonFiniteError(step, f"training diverged at step {step}: loss {total:.4g}, gradient norm "
                                           f"{grad_norm:.4g} (not finite). Lower --lr or check the recipe flags.")
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema_update(target, student, cfg.ema_rate)
            mean_t = t.float().mean().item() if dist is None else distributed.mean(t.float().mean().item(), x0.device)
            entry = {"step": step, "loss": total, "grad_norm": grad_norm, "mean_t": mean_t, "seconds": time.time() - start}
            log.append(entry)
            bar.set_postfix(loss=f"{total:.4g}")
            if on_step:
                on_step(step, entry)
            stop = interrupted() if dist is None else distributed.mean(float(interrupted()), x0.device) > 0  # all ranks stop together
            if save is not None and ((save_every and step % save_every == 0 and step < steps) or stop):
                save(state(step))
            if stop:
                raise KeyboardInterrupt(f"step {step}")
    student.eval()
    return log


def training_state(step, log, student, target, opt, batches, generator) -> dict:
    """Everything a Self-NPO run needs to continue bit for bit after `step` (CPU tensors; torch.save-able)."""
    cpu = lambda sd: {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}  # noqa: E731
    return {"step": step, "log": list(log), "student": cpu(student.state_dict()), "target": cpu(target.state_dict()),
            "optimizer": _to_cpu(opt.state_dict()), **rng_state(generator),
            "batches": batches.state_dict() if hasattr(batches, "state_dict") else None}


def restore_training_state(state: dict, student, target, opt, batches, generator) -> int:
    """Load `training_state(...)` into the run's objects; returns the step it was saved after.

    Raises ValueError: the batches cannot restore a data order (their model family does not support --resume).
    """
    if state.get("batches") is None or not hasattr(batches, "load_state_dict"):
        raise ValueError("this model's training batches have no resumable data order: start without --resume.")
    student.load_state_dict(state["student"])
    target.load_state_dict(state["target"])
    opt.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["batches"])
    restore_rng(state, generator)
    return int(state["step"])


def rng_state(generator: torch.Generator | None) -> dict:
    """The random states a resumed run needs (torch's global CPU / CUDA RNG and the data generator)."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generator": generator.get_state() if generator is not None else None}


def restore_rng(state: dict, generator: torch.Generator | None) -> None:
    """Put back what rng_state saved."""
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@contextlib.contextmanager
def _interrupt_after_step():
    """Ctrl-C (SIGINT) sets a flag that the loop reads after its step, so a saved state is always a whole
    step; a second Ctrl-C interrupts at once. Outside the main thread the default handling stays."""
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)
        print("\nCtrl-C: stopping after this step (press again to stop at once) ...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


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
    snapshot_steps: tuple[int, ...] = (),
    on_snapshot: Callable[[int, dict, list[dict]], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Train a class-conditional eps-prediction model from scratch (plain diffusion objective).

    Labels are replaced by `null_label` with probability `label_drop` (CFG's unconditional branch).
    AdamW with linear warm-up (200 steps) then cosine decay; returns (EMA state dict with keys
    `unet.*` / `class_embedding.*`, per-step log). After each step in `snapshot_steps`,
    `on_snapshot(step, EMA state dict, log so far)` is called (the weaker models of the same run
    that autoguidance uses); snapshots do not change the run.

    Raises:
        ValueError: steps < 1, or a snapshot step outside 1..steps.
        NonFiniteError: a NaN / Inf loss, at its step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}.")
    if any(not 1 <= s <= steps for s in snapshot_steps):
        raise ValueError(f"snapshot steps must be in 1..{steps}; got {list(snapshot_steps)}.")
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
        if not math.isfinite(loss.item()):
            raise NonFiniteError(step, f"training diverged at step {step}: loss {loss.item()} (not finite). Lower --lr.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, ema_rate if step > warmup else 0.0)
        log.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0], "seconds": time.time() - start})
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_snapshot is not None and step in snapshot_steps:
            on_snapshot(step, {k: v.detach().clone() for k, v in ema.state_dict().items()}, list(log))
    model.eval()
    return ema.state_dict(), log
