"""NPO guidance in one batched pass: one denoiser, low-rank offsets added per half of the CFG batch.

Plain CFG runs the denoiser once on the batch [c', c]. NPO (Diffusion-NPO Eq. 9, 10) wants the c half
through theta_pos = theta + eta and the c' half through theta_neg = theta + alpha * eta + beta * delta.
When eta and delta are low rank (a LoRA, or a delta cut to rank R by truncated SVD) that needs no second
model: every touched layer is affine in its weights, so

    layer(x; W + dW) = layer(x; W) + layer(x; dW),   dW = up @ down   =>   extra cost (in + out) * r per token

and a forward hook on the layer adds, to each sample of the batch, its own term: 1 * eta on the positive
half, alpha * eta + beta * delta on the negative half. Linear and Conv (1-3 d) weights take factors;
biases and GroupNorm / LayerNorm affine parameters (small, 1-d) are added densely, also exactly
(group_norm(x; w + dw, b + db) = group_norm(x; w, b) + group_norm(x; dw, db)).

    pos, neg, how = npo_denoisers(unet, eta=..., delta=..., alpha=1, beta=1)   # LowRankOffset or dense dicts
    denoise = guided_denoiser(pos, neg, cond, null, 7.5)                       # one [c', c] pass per step

Full-rank (dense) offsets keep the two-model path (a copy of the denoiser, its memory cost printed);
`truncated_svd` turns a dense delta into a LowRankOffset (sample.py --delta-rank R).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError
from .offsets import Offset, check_offset, is_lora, load_offset, read_lora_factors

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (up (out, r), down (r, in * kh * kw))
CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
NORMS = (nn.GroupNorm, nn.LayerNorm)


@dataclass
class LowRankOffset:
    """A weight offset kept as per-layer factors: `state_dict[layer + ".weight"] += (up @ down).reshape(shape)`,
    plus `dense` tensors over state-dict keys (biases, norm affine parameters), all float32 unless moved.

    factors: `{layer: (up (out, r), down (r, in * kh * kw))}`, layer a module name of the denoiser.
    dense: `{state-dict key: tensor of the base's shape}`.
    """

    factors: Factors = field(default_factory=dict)
    dense: Offset = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest per-layer rank (0 without factors)."""
        return max((down.shape[0] for _, down in self.factors.values()), default=0)

    def to_dense(self, base: Offset) -> Offset:
        """The same offset as full tensors over base's keys (float32), for the two-model path and tests."""
        out = {layer + ".weight": (up.float() @ down.float()).reshape(base[layer + ".weight"].shape)  # (out, r) @ (r, in*k*k)
               for layer, (up, down) in self.factors.items()}
        out.update({k: v.float() for k, v in self.dense.items()})
        check_offset(out, base, "low-rank offset")
        return out

    def to(self, device=None, dtype=None) -> "LowRankOffset":
        return LowRankOffset({k: (u.to(device, dtype), d.to(device, dtype)) for k, (u, d) in self.factors.items()},
                             {k: v.to(device, dtype) for k, v in self.dense.items()})

    def numel(self) -> int:
        return sum(u.numel() + d.numel() for u, d in self.factors.values()) + sum(v.numel() for v in self.dense.values())


def truncated_svd(delta: Offset, rank: int) -> tuple[LowRankOffset, float]:
    """Cut a dense offset to rank `rank` per weight: W = U S V^T -> up = U_r S_r, down = V_r^T (Eckart-Young:
    the best rank-r approximation in Frobenius norm). Tensors with ndim >= 2 (Linear / Conv weights, seen as
    `(out, in * kh * kw)`) are factored, all-zero ones dropped; 1-d tensors (biases, norms) stay dense.

    Returns (offset, relative error ||delta - approx||_F / ||delta||_F over all tensors).
    Raises ValueError: rank < 1.
    """
    if rank < 1:
        raise ValueError(f"--delta-rank must be >= 1 (got {rank}).")
    out, err2, norm2 = LowRankOffset(), 0.0, 0.0
    for key, value in delta.items():
        m = value.float()
        n2 = float(m.pow(2).sum())
        norm2 += n2
        if m.ndim < 2:
            out.dense[key] = m
            continue
        if n2 == 0.0:
            continue
        if not key.endswith(".weight"):
            raise CheckpointError(f"offset key {key} (ndim {m.ndim}) is not a layer weight: cannot factor it.")
        m = m.flatten(1)  # (out, in, kh, kw) -> (out, in * kh * kw)
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        r = min(rank, s.numel())
        up, down = (u[:, :r] * s[:r]).float(), vh[:r].float()  # (out, r), (r, in * kh * kw)
        err2 += float((m.double() - (u[:, :r] * s[:r]) @ vh[:r]).pow(2).sum())
        out.factors[key[: -len(".weight")]] = (up, down)
    return out, (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0


def load_offset_factors(path, base: Offset, read_weights=None, check_fingerprint: bool = True,
                        trust_delta: bool = False, rank: int | None = None) -> tuple[LowRankOffset | Offset, str]:
    """An offset file as a LowRankOffset when it is low rank, else dense (offsets.load_offset).

    A LoRA gives its own factors; a dense delta / full model is cut to `rank` by truncated SVD when rank
    is given. Returns (offset, a one-line description: its form, rank, and the SVD's relative error).
    Raises CheckpointError as load_offset / lora_factors; ValueError for rank < 1.
    """
    if is_lora(path):
        off = LowRankOffset(read_lora_factors(path, base, check_fingerprint))
        return off, f"LoRA, {len(off.factors)} layers, rank {off.rank}"
    dense = load_offset(path, base, read_weights, check_fingerprint, trust_delta)
    if rank is None:
        return dense, f"dense offset, {len(dense)} tensors"
    off, err = truncated_svd(dense, rank)
    return off, f"dense offset cut to rank {rank} by truncated SVD: relative error {err:.3g} (||delta - approx|| / ||delta||)"


# ----------------------------------------------------------------------------- the one-pass denoiser


class BranchedDenoiser(nn.Module):
    """`model` (theta, unchanged) with per-sample low-rank offsets: sample b of a call gets
    eta if positive, alpha * eta + beta * delta if negative (Diffusion-NPO Eq. 10).

    Forward hooks on the touched layers add the terms; they are active only inside this module's forward,
    so `model` itself still computes theta. Factors follow the model's device and dtype (moved at the first
    call after the model moves).
    The batch must be dim 0 of every touched layer's input, sample-major (a layer seeing B * k rows,
    e.g. frames, gives sample b the rows b * k .. b * k + k - 1).

    Raises:
        CheckpointError: an offset names a layer / parameter that is not a Linear, Conv or norm weight or bias
            (such offsets need the two-model path: `supports`).
    """

    def __init__(self, model: nn.Module, eta: LowRankOffset | None = None, delta: LowRankOffset | None = None,
                 alpha: float = 1.0, beta: float = 1.0):
        super().__init__()
        self.model, self._at = model, None
        self.terms = []  # (offset, scale on positive samples, scale on negative samples)
        if eta is not None:
            self.terms.append((eta, 1.0, float(alpha)))
        if delta is not None and beta != 0:
            self.terms.append((delta, 0.0, float(beta)))
        problem = unsupported([t[0] for t in self.terms], model)
        if problem:
            raise CheckpointError(problem)
        self._negative: torch.Tensor | None = None
        layers = {}
        for i, (off, _, _) in enumerate(self.terms):
            for layer in off.factors:
                layers.setdefault(layer, []).append(i)
            for key in off.dense:
                layers.setdefault(key.rsplit(".", 1)[0], []).append(i)
        self._handles = [model.get_submodule(name).register_forward_hook(self._hook(name, sorted(set(ix))))
                         for name, ix in layers.items()]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond, negative) -> torch.Tensor:
        """eps `(B, ...)`; negative: a bool or a `(B,)` bool tensor, True = theta_neg for that sample."""
        neg = torch.as_tensor(negative, device=x.device).expand(x.shape[0]) if not torch.is_tensor(negative) or negative.ndim == 0 \
            else negative.to(x.device)
        p = next(self.model.parameters())
        if self._at != (p.device, p.dtype):
            self.terms, self._at = [(off.to(p.device, p.dtype), sp, sn) for off, sp, sn in self.terms], (p.device, p.dtype)
        self._negative = neg
        try:
            return self.model(x, t, cond)
        finally:
            self._negative = None

    def branch(self, negative: bool) -> "Branch":
        """The positive (theta + eta) or negative (theta_neg) denoiser `f(x, t, cond)` as a callable."""
        return Branch(self, negative)

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str, term_ids: list[int]):
        def hook(module, args, output):
            neg = self._negative
            if neg is None:
                return None
            x = args[0]
            if x.shape[0] % neg.shape[0]:
                raise RuntimeError(f"layer {name} sees a batch of {x.shape[0]} rows for {neg.shape[0]} samples: "
                                   "the one-pass NPO path needs the batch on dim 0.")
            neg_rows = neg.repeat_interleave(x.shape[0] // neg.shape[0])  # (B,) -> (N,), sample-major
            in_place = not (torch.is_grad_enabled() and output.requires_grad)
            for i in term_ids:
                off, s_pos, s_neg = self.terms[i]
                scale = torch.where(neg_rows, s_neg, s_pos).to(output.dtype)  # (N,)
                rows = scale.nonzero()[:, 0]  # sorted
                if rows.numel() == 0:
                    continue
                a, b = int(rows[0]), int(rows[-1]) + 1
                if b - a == rows.numel():  # one contiguous block (CFG's [c', c] halves): views, no gather
                    xi, part = x[a:b], scale[a:b]
                    uniform = bool((part == part[0]).all())
                    corr = _layer_offset(module, name, off, xi)  # (n, ...) or a bias alone (out, 1, ..)
                    corr = corr * (float(part[0]) if uniform else part.reshape(-1, *[1] * (output.ndim - 1)))  # (n,) -> (n, 1, ...)
                    if in_place:  # sampling (no autograd): add into the rows, no copy of the whole output
                        output[a:b] += corr
                    else:
                        output = torch.cat([output[:a], output[a:b] + corr, output[b:]])
                    continue
                xi = x.index_select(0, rows)
                corr = _layer_offset(module, name, off, xi).expand(xi.shape[0], *output.shape[1:])  # a bias alone: (out, 1, ..)
                corr = corr * scale[rows].reshape(-1, *[1] * (corr.ndim - 1))  # (n,) -> (n, 1, ...)
                output = output.index_add(0, rows, corr)
            return output
        return hook


class Branch:
    """One side of a BranchedDenoiser as a plain denoiser `f(x, t, cond) -> eps` (guidance.guided_denoiser
    sees two branches of one owner and runs them as one batched pass)."""

    def __init__(self, owner: BranchedDenoiser, negative: bool):
        self.owner, self.negative = owner, negative

    def __call__(self, x, t, cond):
        return self.owner(x, t, cond, self.negative)


def unsupported(offsets: list[LowRankOffset], model: nn.Module) -> str | None:
    """Why these offsets cannot go on `model` by hooks (a one-line reason), or None when they can."""
    modules = dict(model.named_modules())
    for off in offsets:
        for layer, (up, down) in off.factors.items():
            m = modules.get(layer)
            if not isinstance(m, (nn.Linear, *CONVS)):
                return f"low-rank factors for {layer}, which is not a Linear / Conv layer of this model"
            if isinstance(m, tuple(CONVS)) and (m.groups != 1 or m.padding_mode != "zeros"):
                return f"low-rank factors for grouped / non-zero-padded conv {layer}"
            if up.shape[0] * down.shape[1] != m.weight.numel() or up.shape[0] != m.weight.shape[0]:
                return f"factors of {layer} ({tuple(up.shape)} @ {tuple(down.shape)}) do not fit weight {tuple(m.weight.shape)}"
        for key, value in off.dense.items():
            name, _, param = key.rpartition(".")
            m = modules.get(name)
            if not isinstance(m, (nn.Linear, *CONVS, *NORMS)) or param not in ("weight", "bias") \
                    or (param == "weight" and not isinstance(m, NORMS)):
                return f"a dense offset for {key} (only biases and norm affine parameters can be dense)"
            if getattr(m, param) is None or tuple(getattr(m, param).shape) != tuple(value.shape):
                return f"dense offset {key} of shape {tuple(value.shape)} does not fit the model"
    return None


def _layer_offset(module: nn.Module, name: str, off: LowRankOffset, x: torch.Tensor) -> torch.Tensor:
    """layer(x; dW, db): the output change from the offset's weight factors / dense bias, norm parameters."""
    fac, db, dw = off.factors.get(name), off.dense.get(name + ".bias"), off.dense.get(name + ".weight")
    if isinstance(module, nn.Linear):
        y = 0
        if fac is not None:
            y = F.linear(F.linear(x, fac[1]), fac[0])  # x (..., in) -> (..., r) -> (..., out)
        return y + db if db is not None else y
    if isinstance(module, tuple(CONVS)):
        conv, n = CONVS[type(module)], module.weight.ndim - 2
        y = 0
        if fac is not None:
            up, down = fac
            w_down = down.reshape(down.shape[0], *module.weight.shape[1:])  # (r, in * k^n) -> (r, in, *k)
            h = conv(x, w_down, None, module.stride, module.padding, module.dilation)  # (N, r, *spatial)
            y = conv(h, up.reshape(*up.shape, *[1] * n))  # 1x1: (out, r) -> (out, r, 1, ...)
        return y + db.reshape(-1, *[1] * n) if db is not None else y  # (out,) -> (out, 1, ...)
    if isinstance(module, nn.GroupNorm):
        w = dw if dw is not None else torch.zeros_like(module.weight)
        return F.group_norm(x, module.num_groups, w, db, module.eps)
    w = dw if dw is not None else torch.zeros_like(module.weight)  # LayerNorm
    return F.layer_norm(x, module.normalized_shape, w, db, module.eps)


# ----------------------------------------------------------------------------- choosing the path


def npo_denoisers(model: nn.Module, eta: LowRankOffset | Offset | None = None, delta: LowRankOffset | Offset | None = None,
                  alpha: float = 1.0, beta: float = 1.0, one_pass: bool | None = None) -> tuple[Callable, Callable, str]:
    """The positive (theta + eta) and negative (theta + alpha eta + beta delta) denoisers, and how they run.

    one_pass None (auto): one batched pass (BranchedDenoiser) when every given offset is a LowRankOffset that
    hooks can apply (a dense eta with alpha = 1 is folded into the model's weights instead, which changes
    `model` in place); else the two-model path: theta + eta loaded into `model` (in place) and a copy holding
    theta_neg (guidance.negative_model), whose extra memory the returned description states.
    Returns (pos, neg, description).
    Raises CheckpointError: one_pass=True with offsets it cannot apply; offsets that do not fit the model.
    """
    from .guidance import compose_negative, negative_model

    base = model.state_dict()  # references to the parameters: no copy
    low = [o for o in (eta, delta) if isinstance(o, LowRankOffset)]
    fold_eta = eta is not None and not isinstance(eta, LowRankOffset) and alpha == 1.0
    dense_left = (eta is not None and not isinstance(eta, LowRankOffset) and not fold_eta) or \
        (delta is not None and not isinstance(delta, LowRankOffset))
    reason = "dense (full-rank) offsets" if dense_left else unsupported(low, model)
    if one_pass is None:
        one_pass = reason is None
    if one_pass:
        if reason:
            raise CheckpointError(f"one-pass NPO guidance impossible: {reason}. Use the two-model path (or --delta-rank R).")
        if fold_eta:
            model.load_state_dict(compose_negative(base, eta=eta))
        branched = BranchedDenoiser(model, eta if not fold_eta else None, delta, alpha, beta)
        extra = sum(o.numel() for o in low) * next(model.parameters()).element_size()
        return branched.branch(False), branched.branch(True), \
            f"one-pass NPO guidance: one denoiser + low-rank terms per half of the CFG batch (+{extra / 2**20:.1f} MiB)"
    dense = lambda o: o.to_dense(base) if isinstance(o, LowRankOffset) else o  # noqa: E731
    neg = negative_model(model, base, dense(delta) if delta is not None else None,
                         dense(eta) if eta is not None else None, alpha, beta)
    if eta is not None:
        model.load_state_dict(compose_negative(base, eta=dense(eta)))
    extra = sum(p.numel() * p.element_size() for p in neg.parameters())
    why = f" ({reason})" if reason else ""
    return model, neg, f"two-model NPO guidance{why}: a second copy of the denoiser, +{extra / 2**30:.2f} GiB"
