"""Classifier-free guidance with a separate negative model, and the NPO weight composition.

Diffusion-NPO Eq. 3 / 9 (Self-NPO Eq. 4):  eps = (w + 1) eps_pos(x_t, c) - w eps_neg(x_t, c'),
where the paper's w is the usual guidance_scale minus one (guidance_scale 7.5 == w 6.5).
Diffusion-NPO Eq. 10 (Self-NPO Eq. 7):      theta_neg = theta + alpha * eta + beta * delta.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,...), t (B,)) -> eps (B,...)


def cfg(eps_pos: torch.Tensor, eps_neg: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps = eps_neg + guidance_scale * (eps_pos - eps_neg) = (w + 1) eps_pos - w eps_neg, w = scale - 1."""
    w = guidance_scale - 1.0
    return (w + 1.0) * eps_pos - w * eps_neg


def guided_denoiser(
    pos_model, neg_model, context: torch.Tensor, neg_context: torch.Tensor, guidance_scale: float
) -> Denoiser:
    """A denoiser `(x_t, t) -> eps` applying CFG with two models (Diffusion-NPO Eq. 9).

    pos_model / neg_model: `f(x (B,C,H,W), t (B,), context (B,L,D)) -> eps`; they may be the same
    module (plain CFG). context: `(B, L, D)` positive condition c; neg_context: `(B or 1, L, D)`
    negative/unconditional c'. guidance_scale 1 returns the positive prediction alone.
    """
    neg_context = neg_context.expand(context.shape[0], *neg_context.shape[1:])

    def denoise(x, t):
        if guidance_scale == 1.0:
            return pos_model(x, t, context)
        if neg_model is pos_model:  # one batched pass, as SD pipelines do
            eps_neg, eps_pos = pos_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg_context, context])).chunk(2)
        else:
            eps_pos, eps_neg = pos_model(x, t, context), neg_model(x, t, neg_context)
        return cfg(eps_pos, eps_neg, guidance_scale)

    return denoise


def offset(weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A weight offset `weights - base` (eta from a positive model, or delta from an NPO model).

    Raises:
        ValueError: the key sets or shapes differ (the two are not the same architecture).
    """
    _check_same(weights, base, "weights", "base")
    return {k: (weights[k].float() - base[k].float()) for k in base}


def compose_negative(
    base: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor] | None = None,
    eta: dict[str, torch.Tensor] | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> dict[str, torch.Tensor]:
    """theta_neg = theta + alpha * eta + beta * delta (Diffusion-NPO Eq. 10), in base's dtypes.

    base: theta; delta: NPO offset (may cover a subset of keys, e.g. LoRA-touched layers);
    eta: positive-preference offset (e.g. DPO weights minus base). The authors' "merge weight" m
    corresponds to alpha = 1 - m.

    Raises:
        ValueError: an offset has a key not in base or a shape that differs from base.
    """
    out, acc = dict(base), {}  # acc: float32 sums, rounded to base's dtype once at the end
    for name, off, scale in (("eta", eta, alpha), ("delta", delta, beta)):
        if off is None or scale == 0:
            continue
        unknown = sorted(set(off) - set(base))
        if unknown:
            raise ValueError(f"{name} has {len(unknown)} keys the base model lacks, e.g. {unknown[:3]}: wrong base model?")
        for k, v in off.items():
            if v.shape != base[k].shape:
                raise ValueError(f"{name}[{k}] has shape {tuple(v.shape)} but the base has {tuple(base[k].shape)}: wrong base model?")
            acc[k] = (acc[k] if k in acc else base[k].float()) + scale * v.float()
    out.update({k: v.to(base[k].dtype) for k, v in acc.items()})
    return out


def negative_model(unet: torch.nn.Module, base, delta=None, eta=None, alpha: float = 1.0, beta: float = 1.0) -> torch.nn.Module:
    """A copy of `unet` (in eval mode) holding theta_neg = theta + alpha * eta + beta * delta.

    base: the state dict theta of `unet`; delta / eta as in `compose_negative`.
    """
    neg = copy.deepcopy(unet)
    neg.load_state_dict(compose_negative(base, delta=delta, eta=eta, alpha=alpha, beta=beta))
    return neg.eval()


def _check_same(a, b, na, nb):
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        raise ValueError(f"{na} and {nb} have different keys ({len(diff)} differ, e.g. {diff[:3]}): not the same architecture.")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{na}[{k}] {tuple(a[k].shape)} vs {nb}[{k}] {tuple(b[k].shape)}: not the same architecture.")
