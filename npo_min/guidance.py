"""Classifier-free guidance with a separate negative model, and the NPO weight composition.

Diffusion-NPO Eq. 3 / 9 (Self-NPO Eq. 4):  eps = (w + 1) eps_pos(x_t, c) - w eps_neg(x_t, c'),
written as the lerp eps_neg + s (eps_pos - eps_neg) with s = guidance_scale = w + 1 (as EDM2 writes it).
One function, `cfg`, serves sampling (s = 7.5 for SD1.5) and the Self-NPO rollout (w = -1 is s = 0: the
pure unconditional prediction).
Diffusion-NPO Eq. 10 (Self-NPO Eq. 7):      theta_neg = theta + alpha * eta + beta * delta.

Conditioning `Cond` is what a family's denoiser takes as its third argument: a tensor `(B, L, D)`
(SD1.5 text states, digits class tokens) or a dict of tensors batched on dim 0 (SDXL: text states,
pooled text, time ids). `expand_cond`, `cat_cond` and `where_cond` handle both. A dict c' may omit keys:
those are shared with c in both branches (`share_cond`; SDXL's time ids, as diffusers' pipeline does).
"""

from __future__ import annotations

import copy
from typing import Callable, Union

import torch

from .offsets import check_offset

Cond = Union[torch.Tensor, dict[str, torch.Tensor]]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,...), t (B,)) -> eps (B,...)


def cfg(eps_pos: torch.Tensor, eps_neg: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps_neg + s (eps_pos - eps_neg) = (w + 1) eps_pos - w eps_neg, s = guidance_scale = w + 1 (Eq. 9).

    torch.lerp: exactly eps_pos at s = 1 and exactly eps_neg at s = 0.
    """
    return torch.lerp(eps_neg, eps_pos, guidance_scale)


# ----------------------------------------------------------------------------- conditioning batches


def _map(fn, *conds: Cond) -> Cond:
    if isinstance(conds[0], dict):
        return {k: fn(*(c[k] for c in conds)) for k in conds[0]}
    return fn(*conds)


def cond_batch(cond: Cond) -> int:
    return (next(iter(cond.values())) if isinstance(cond, dict) else cond).shape[0]


def expand_cond(cond: Cond, n: int) -> Cond:
    """Broadcast a batch-1 conditioning (e.g. c' of CFG) to batch n; a batch-n one is returned as is."""
    return _map(lambda c: c.expand(n, *c.shape[1:]), cond)


def share_cond(neg: Cond, pos: Cond) -> Cond:
    """c' completed with the entries of c it omits (conditioning both CFG branches share, e.g. SDXL's time
    ids); a tensor c' is returned as is."""
    if isinstance(neg, dict) and isinstance(pos, dict):
        return {k: neg[k] if k in neg else pos[k] for k in pos}
    return neg


def cat_cond(a: Cond, b: Cond) -> Cond:
    return _map(lambda x, y: torch.cat([x, y]), a, b)


def where_cond(mask: torch.Tensor, a: Cond, b: Cond) -> Cond:
    """Per sample: a where mask `(B,)` is True, else b (both batch B or broadcastable)."""
    return _map(lambda x, y: torch.where(mask.reshape(-1, *[1] * (x.ndim - 1)), x, y), a, b)  # (B,) -> (B, 1, ...)


def guided_denoiser(pos_model, neg_model, cond: Cond, neg_cond: Cond, guidance_scale: float) -> Denoiser:
    """A denoiser `(x_t, t) -> eps` applying CFG with two models (Diffusion-NPO Eq. 9).

    pos_model / neg_model: `f(x (B, ...), t (B,), cond) -> eps`; the same module for plain CFG (then one
    batched pass on [c', c], as SD pipelines do), or the two branches of one
    batched_offsets.BranchedDenoiser (one batched pass too, each half with its own offsets). cond: the positive condition c, batch B; neg_cond: the
    negative / unconditional c', batch B or 1 (a dict may omit entries shared with c, see share_cond).
    guidance_scale 1 evaluates only the positive branch, 0 only the negative one.
    """
    neg_cond = share_cond(expand_cond(neg_cond, cond_batch(cond)), cond)
    owner = getattr(pos_model, "owner", None)
    owner = owner if owner is not None and getattr(neg_model, "owner", None) is owner \
        and not pos_model.negative and neg_model.negative else None

    def denoise(x, t):
        if guidance_scale == 1.0:
            return pos_model(x, t, cond)
        if guidance_scale == 0.0:
            return neg_model(x, t, neg_cond)
        if neg_model is pos_model:
            eps_neg, eps_pos = pos_model(torch.cat([x, x]), torch.cat([t, t]), cat_cond(neg_cond, cond)).chunk(2)
        elif owner is not None:  # one pass, [c' (theta_neg), c (theta_pos)]
            negative = torch.arange(2 * x.shape[0], device=x.device) < x.shape[0]  # (2B,) True on the c' half
            eps_neg, eps_pos = owner(torch.cat([x, x]), torch.cat([t, t]), cat_cond(neg_cond, cond), negative).chunk(2)
        else:
            eps_pos, eps_neg = pos_model(x, t, cond), neg_model(x, t, neg_cond)
        return cfg(eps_pos, eps_neg, guidance_scale)

    return denoise


# ----------------------------------------------------------------------------- theta_neg (Eq. 10)


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
    corresponds to alpha = 1 - m. Sums are taken in float32 and rounded to base's dtype once.

    Raises:
        CheckpointError (a ValueError): an offset has a key not in base or a shape that differs from base.
    """
    out, acc = dict(base), {}
    for name, off, scale in (("eta", eta, alpha), ("delta", delta, beta)):
        if off is None or scale == 0:
            continue
        check_offset(off, base, name)
        for k, v in off.items():
            acc[k] = (acc[k] if k in acc else base[k].float()) + scale * v.float()
    out.update({k: v.to(base[k].dtype) for k, v in acc.items()})
    return out


def negative_model(model: torch.nn.Module, base, delta=None, eta=None, alpha: float = 1.0, beta: float = 1.0) -> torch.nn.Module:
    """A copy of `model` (in eval mode) holding theta_neg = theta + alpha * eta + beta * delta.

    base: the state dict theta of `model`; delta / eta as in `compose_negative`.
    """
    neg = copy.deepcopy(model)
    neg.load_state_dict(compose_negative(base, delta=delta, eta=eta, alpha=alpha, beta=beta))
    return neg.eval()
