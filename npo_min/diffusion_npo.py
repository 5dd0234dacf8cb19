"""Diffusion-NPO training (Wang et al. 2025): a model of what people DISLIKE, for the negative branch of CFG.

Three trainers, each fine-tuning `model` in place (all weights, or a LoRA: npo_min/lora.py) and returning
the per-step log; `delta = trained - base` (or the LoRA) is then used as theta_neg = theta + beta * delta:

  dpo_npo            Diffusion-DPO on preference pairs with each pair reversed (Diffusion-NPO Eq. 8).
                     reverse=False is ordinary Diffusion-DPO: its offset is the eta of Eq. 10, so the
                     negative branch theta + alpha * eta + beta * delta takes both from this one trainer.
  reward_npo         Differentiable-reward fine-tuning with the reward reversed, R_npo = 1 - R (Diffusion-NPO
                     Eq. 7, R in [0, 1]): the model samples with CFG (its own positive and negative branch),
                     the decoded sample is scored, and the loss -R_npo = R - 1 is back-propagated through the
                     last K denoising steps only (DRaFT-K, Clark et al. 2023; K = 1 is ReFL-like). This is the
                     paper's equation: the trained model's OWN samples are pushed to low reward.
  guided_reward_npo  The variant of the authors' video code (DR-Video-NPO, on VADER): the positive branch is
                     the frozen base on c, the negative branch the trained model on c', and the loss 1 - R of
                     the CFG-GUIDED sample trains the negative branch so that guidance away from it raises the
                     reward. Not Eq. 7: it optimises the guided output directly (see REFERENCE.md).

The frozen reference / base is the model itself with its LoRA switched off when it has one, else a copy.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .dpo import dpo_step_loss
from .guidance import Cond, guided_denoiser
from .lora import lora_disabled, lora_layers
from .schedule import NoiseSchedule
from .solvers import make_timesteps
from .training import NonFiniteError, _interrupt_after_step, _to_cpu, restore_rng, rng_state


def frozen_reference(model: torch.nn.Module) -> Callable:
    """The base model as a gradient-free denoiser `f(x, t, cond)`: the same module with every LoRA off, or a
    frozen copy taken now (full fine-tuning)."""
    if lora_layers(model):
        def reference(x, t, cond):
            with torch.no_grad(), lora_disabled(model):
                return model(x, t, cond)
        return reference
    copy_ = copy.deepcopy(model).eval().requires_grad_(False)

    def reference(x, t, cond):
        with torch.no_grad():
            return copy_(x, t, cond)
    return reference


def optimize(model: torch.nn.Module, micro_step: Callable[[], tuple[torch.Tensor, dict]], steps: int, lr: float,
             weight_decay: float, grad_clip: float, grad_accum: int, autocast_dtype: torch.dtype | None,
             device_type: str, progress: bool, desc: str, generator: torch.Generator | None = None, batches=None,
             resume: dict | None = None, save: Callable[[dict], None] | None = None, save_every: int = 0) -> list[dict]:
    """AdamW on the model's trainable parameters, `grad_accum` micro-steps per step (loss / grad_accum each),
    gradient-norm clipping; returns [{step, loss, grad_norm, seconds, **stats of the last micro-step}].

    Resumable as Self-NPO (npo_min/training.py): every `save_every` steps (and at a Ctrl-C, after the step in
    progress) `save(state)` gets `resume_state(...)`: the trainable parameters (the LoRA, or every weight), the
    optimizer, step, log, the RNG states of torch and of `generator`, and the data order of `batches` (if it
    has `state_dict`). `resume=state` continues from it; the result is bitwise that of an uninterrupted run
    (same device and threads). A full fine-tuning's frozen reference must be taken before (it is the base).

    Raises ValueError: steps or grad_accum < 1, no trainable parameter, a resume state past `steps` or for
        other parameters; NonFiniteError (a ValueError): a non-finite loss or gradient norm, at its step (lower
        --lr). KeyboardInterrupt: Ctrl-C, after saving the state of the last finished step (if `save`).
    """
    if steps < 1 or grad_accum < 1:
        raise ValueError(f"steps and grad_accum must be >= 1; got {steps}, {grad_accum}.")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    if not params:
        raise ValueError("the model has no trainable parameters.")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    log, first = [], 1
    if resume is not None:
        first = restore_resume_state(resume, named, opt, batches, generator) + 1
        log = list(resume["log"])
        if first > steps + 1:
            raise ValueError(f"the resume checkpoint is at step {first - 1}, past --steps {steps}.")
    model.train()
    start = time.time() - (log[-1]["seconds"] if log else 0.0)
    bar = tqdm(range(first, steps + 1), desc=desc, disable=not progress, initial=first - 1, total=steps)
    with _interrupt_after_step() as interrupted:
        for step in bar:
            total, stats = 0.0, {}
            for _ in range(grad_accum):
                with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss, stats = micro_step()
                (loss / grad_accum).backward()
                total += loss.item() / grad_accum
            if not torch.isfinite(torch.tensor(total)):
                raise NonFiniteError(step, f"{desc}: the loss became {total} at step {step}: lower --lr (nothing was written).")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
            if not torch.isfinite(torch.tensor(grad_norm)):  # before the optimizer applies it
                raise NonFiniteError(step, f"{desc}: the gradient norm became {grad_norm} at step {step}: lower --lr "
                                           "(nothing was written).")
            opt.step()
            opt.zero_grad(set_to_none=True)
            entry = {"step": step, "loss": total, "grad_norm": grad_norm, **stats, "seconds": time.time() - start}
            log.append(entry)
            bar.set_postfix(loss=f"{total:.4g}")
            stop = interrupted()
            if save is not None and ((save_every and step % save_every == 0 and step < steps) or stop):
                save(resume_state(step, log, named, opt, batches, generator))
            if stop:
                raise KeyboardInterrupt(f"step {step}")
    model.eval()
    return log


def resume_state(step: int, log: list[dict], named: dict, opt, batches, generator) -> dict:
    """Everything a Diffusion-NPO run needs to continue bit for bit after `step` (CPU tensors; torch.save-able)."""
    return {"step": step, "log": list(log), "params": {n: p.detach().to("cpu", copy=True) for n, p in named.items()},
            "optimizer": _to_cpu(opt.state_dict()), **rng_state(generator),
            "batches": batches.state_dict() if hasattr(batches, "state_dict") else None}


def restore_resume_state(state: dict, named: dict, opt, batches, generator) -> int:
    """Load `resume_state(...)` into the run's objects; returns the step it was saved after.

    Raises ValueError: the state holds other trainable parameters (names or shapes), or a data order that
        these batches cannot take (or none where they need one).
    """
    saved = state.get("params")
    if not isinstance(saved, dict) or sorted(saved) != sorted(named) or \
            any(saved[n].shape != p.shape for n, p in named.items()):
        raise ValueError("the resume checkpoint holds other trainable parameters than this run (another LoRA rank / "
                         "targets, model or trainer): resume with the same flags, or start over with --overwrite.")
    if hasattr(batches, "load_state_dict"):
        if state.get("batches") is None:
            raise ValueError("the resume checkpoint has no data order for these batches: start over with --overwrite.")
        batches.load_state_dict(state["batches"])
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(saved[n])
    opt.load_state_dict(state["optimizer"])
    restore_rng(state, generator)
    return int(state["step"])


def dpo_npo(model: torch.nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor, Cond]], schedule: NoiseSchedule,
            beta: float, reverse: bool = True, *, steps: int, lr: float, weight_decay: float = 1e-2,
            grad_clip: float = 1.0, grad_accum: int = 1, autocast_dtype: torch.dtype | None = None,
            generator: torch.Generator | None = None, progress: bool = True, prediction_type: str = "epsilon",
            resume: dict | None = None, save: Callable[[dict], None] | None = None, save_every: int = 0) -> list[dict]:
    """Diffusion-DPO (reverse=False) or DPO-NPO (reverse=True, Eq. 8) on `(x_w, x_l, cond)` batches
    (npo_min/pairs.py). Loss and per-pair shared noise / timestep: npo_min/dpo.py (prediction_type: the
    model's output, "epsilon" or "v_prediction"; the errors are on that target). resume / save / save_every:
    as `optimize` (the batches' data order is saved when they have `state_dict`)."""
    reference = frozen_reference(model)
    device = next(model.parameters()).device

    def micro_step():
        x_w, x_l, cond = next(batches)
        return dpo_step_loss(model, reference, x_w, x_l, cond, schedule, beta, reverse, generator, prediction_type)

    return optimize(model, micro_step, steps, lr, weight_decay, grad_clip, grad_accum, autocast_dtype, device.type,
                    progress, "dpo-npo" if reverse else "dpo", generator, batches, resume, save, save_every)


def last_k_with_grad(denoise: Callable, num_steps: int, k: int) -> Callable:
    """DRaFT-K: the wrapped denoiser runs without gradients for the first num_steps - K calls of a sampler
    with num_steps steps (one call per step, as DDIM), with gradients for the last K."""
    calls = [0]

    def wrapped(x, t):
        i = calls[0]
        calls[0] += 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= num_steps - k):
            return denoise(x, t)
    return wrapped


def ddim_with_grad(denoise: Callable, noise: torch.Tensor, num_steps: int, k: int, schedule: NoiseSchedule,
                   spacing: str = "trailing", prediction_type: str = "epsilon", set_alpha_to_one: bool = False) -> torch.Tensor:
    """Deterministic DDIM (the update of npo_min.solvers.ddim, same timesteps) from x_T = noise `(B, ...)` to x0,
    differentiable through the last K steps only (DRaFT-K); the earlier steps run without gradients.
    prediction_type "v_prediction": the denoiser outputs v; x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v
    (finite at zero terminal SNR, CogVideoX). set_alpha_to_one: the last step's alpha past t = 0 is 1 (CogVideoX),
    else alphas_cumprod[0] (SD), as npo_min.solvers.ddim."""
    ac, T = schedule.alphas_cumprod, schedule.num_train_timesteps
    ts = make_timesteps(num_steps, spacing, T, solver="ddim")
    denoise = last_k_with_grad(denoise, num_steps, k)
    x = noise
    for i, t in enumerate(ts):
        t_prev = t - T // len(ts)
        a_t = ac[t].item()
        a_prev = ac[t_prev].item() if t_prev >= 0 else 1.0 if set_alpha_to_one else ac[0].item()
        if i == num_steps - k:
            x = x.detach()  # the graph starts here
        pred = denoise(x, torch.full((x.shape[0],), t, device=x.device))
        if prediction_type == "v_prediction":
            x0, eps = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * pred, (1 - a_t) ** 0.5 * x + a_t ** 0.5 * pred
        else:
            eps = pred
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5  # Tweedie
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def reward_npo(model: torch.nn.Module, decode: Callable, reward: Callable, prompts: list[str], encode: Callable,
               null: Cond, noise_shape: tuple, schedule: NoiseSchedule, *, guided: bool = False,
               guidance_scale: float, sample_steps: int, k: int = 1, spacing: str = "trailing", steps: int, lr: float,
               batch_size: int, weight_decay: float = 1e-2, grad_clip: float = 1.0, grad_accum: int = 1,
               autocast_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
               progress: bool = True, prediction_type: str = "epsilon", set_alpha_to_one: bool = False,
               resume: dict | None = None, save: Callable[[dict], None] | None = None, save_every: int = 0) -> list[dict]:
    """reward-NPO (guided=False, Eq. 7) or the DR-Video-NPO variant (guided=True); see the module docstring.

    decode: x0 `(B, ...)` -> images, differentiable (Pipeline.decode_with_grad); reward: (images, prompts) ->
    `(B,)` in [0, 1], differentiable (eval/rewards.py); prompts: drawn with replacement, batch_size per
    micro-step; encode: prompts -> c; null: c' (batch 1); noise_shape: one x_T `(C, h, w)`. Each micro-step
    samples `sample_steps` DDIM steps from fresh noise with CFG at guidance_scale, gradients through the last
    K. Logged: reward (mean R of the sampled batch). prediction_type / set_alpha_to_one: the model's (Pipeline
    attributes; CogVideoX: "v_prediction", True). resume / save / save_every: as `optimize` (every draw is from
    `generator`, whose state is saved).

    Raises ValueError: K outside 1..sample_steps (and as `optimize`).
    """
    if not 1 <= k <= sample_steps:
        raise ValueError(f"--reward-k must be in 1..{sample_steps} (the sampling steps); got {k}.")
    device = next(model.parameters()).device
    base = frozen_reference(model) if guided else None
    with torch.no_grad():
        conds = [encode([p]) for p in sorted(set(prompts))]
    index = {p: i for i, p in enumerate(sorted(set(prompts)))}

    def micro_step():
        pick = torch.randint(0, len(prompts), (batch_size,), generator=generator)
        chosen = [prompts[i] for i in pick.tolist()]
        cond = _stack([conds[index[p]] for p in chosen])
        x_T = torch.randn((batch_size, *noise_shape), generator=generator).to(device)
        if guided:  # DR-Video-NPO: frozen positive branch on c, trained negative branch on c'
            denoise = guided_denoiser(base, model, cond, null, guidance_scale)
        else:  # Eq. 7: the trained model's own guided samples
            denoise = guided_denoiser(model, model, cond, null, guidance_scale)
        x0 = ddim_with_grad(denoise, x_T, sample_steps, k, schedule, spacing, prediction_type, set_alpha_to_one)
        r = reward(decode(x0), chosen)  # (B,) in [0, 1]
        loss = (1.0 - r).mean() if guided else -(1.0 - r).mean()  # guided: raise R; Eq. 7: maximise R_npo = 1 - R
        return loss, {"reward": r.mean().item()}

    return optimize(model, micro_step, steps, lr, weight_decay, grad_clip, grad_accum, autocast_dtype, device.type,
                    progress, "guided-reward-npo" if guided else "reward-npo", generator, None, resume, save, save_every)


def _stack(conds: list[Cond]) -> Cond:
    if isinstance(conds[0], dict):
        return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    return torch.cat(conds)
