"""The Diffusion-DPO loss (Wallace et al. 2024, Eq. 14 of their paper) and its reversal, Diffusion-NPO Eq. 8.

For a preference pair (x_w preferred, x_l rejected) with the same prompt c, both images are noised with the
SAME noise eps and timestep t. With the per-sample noise-prediction errors (mean over every pixel / latent
element, as the official Diffusion-DPO code's `.mean(dim=[1, 2, 3])`)

    e(x)     = || eps - eps_theta(x_t, t, c) ||^2          (the trained model)
    e_ref(x) = || eps - eps_ref(x_t, t, c) ||^2            (the frozen reference = the base model)

the loss is

    L = -log sigmoid( -beta / 2 * ( (e(x_w) - e(x_l)) - (e_ref(x_w) - e_ref(x_l)) ) ).

It falls when the trained model denoises x_w better (relative to the reference) than x_l. beta is the
KL-strength (the authors: 500 for SD1.5, 2000 for SDXL; larger = stay closer to the reference).

v-prediction models (CogVideoX): the error is on the model's OWN prediction target, e(x) = || v - v_theta ||^2
with v = alpha_t eps - sigma_t x0, as diffusers' Diffusion-DPO training script does for v-prediction models
(`target = noise_scheduler.get_velocity(...)`). Since v - v_theta = (eps - eps_theta) / alpha_t (alpha^2 +
sigma^2 = 1), this is the eps error weighted by 1 / alpha_t^2 per sample, finite at zero terminal SNR where
the eps form is not (alpha_T = 0 makes eps_theta = sigma x_t + alpha v carry no information about x0).

Diffusion-NPO Eq. 8 trains the negative-preference model delta with the pair reversed, (x_w, x_l) -> (x_l,
x_w): `reverse=True`. `reverse=False` is ordinary Diffusion-DPO, whose offset is the eta of Eq. 10. Ties
carry no preference and are dropped before training (npo_min/pairs.py), as the official code keeps only
labels 0 and 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .guidance import Cond, cat_cond
from .schedule import NoiseSchedule, add_noise, x0_eps_to_v


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: `(B, ...)` -> `(B,)` float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B, C, H, W) -> (B, C*H*W) -> (B,)


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
             beta: float, reverse: bool = False) -> tuple[torch.Tensor, dict]:
    """The Diffusion-DPO loss from per-sample errors `(B,)` (see the module docstring); mean over the batch.

    reverse: swap the roles of w and l (Diffusion-NPO Eq. 8).
    Returns (loss (), stats): stats = {"implicit_acc": share of pairs whose inside term is > 0 (the model
    prefers the target image more than the reference does), "reward_margin": mean inside term}.
    """
    if reverse:
        err_w, err_l, ref_err_w, ref_err_l = err_l, err_w, ref_err_l, ref_err_w
    inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))  # (B,)
    loss = -F.logsigmoid(inside).mean()
    return loss, {"implicit_acc": (inside > 0).float().mean().item(), "reward_margin": inside.mean().item()}


def dpo_step_loss(model, reference, x_w: torch.Tensor, x_l: torch.Tensor, cond: Cond, schedule: NoiseSchedule,
                  beta: float, reverse: bool = False, generator: torch.Generator | None = None,
                  prediction_type: str = "epsilon") -> tuple[torch.Tensor, dict]:
    """One Diffusion-DPO loss evaluation on a batch of pairs.

    model / reference: denoisers `f(x_t (B, ...), t (B,), cond) -> eps` (or v for prediction_type
    "v_prediction": the errors are then on v, see the module docstring); the reference runs without gradients
    (it may be the same module with its LoRA switched off: pass a callable that does so).
    x_w, x_l: `(B, C, H, W)` (video: `(B, F, C, h, w)`) clean data (latents or pixels) of the preferred / rejected images; cond: c, batch B.
    t ~ U{0, ..., T-1} and eps ~ N(0, I) are drawn once per pair and shared by both images.
    """
    B, T = x_w.shape[0], schedule.num_train_timesteps
    t = torch.randint(0, T, (B,), generator=generator).to(x_w.device)
    eps = torch.randn(x_w.shape, generator=generator, dtype=x_w.dtype).to(x_w.device)
    alpha, sigma = schedule.coefs(t, x_w)
    x_t = torch.cat([add_noise(x_w, eps, alpha, sigma), add_noise(x_l, eps, alpha, sigma)])  # (2B, C, H, W): w then l
    t2, cond2 = torch.cat([t, t]), cat_cond(cond, cond)
    if prediction_type == "epsilon":
        target = torch.cat([eps, eps])  # (2B, ...)
    elif prediction_type == "v_prediction":
        target = torch.cat([x0_eps_to_v(x_w, eps, alpha, sigma), x0_eps_to_v(x_l, eps, alpha, sigma)])  # (2B, ...): w then l
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction'; got {prediction_type!r}.")
    err_w, err_l = per_sample_error(model(x_t, t2, cond2), target).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = per_sample_error(reference(x_t, t2, cond2), target).chunk(2)
    loss, stats = dpo_loss(err_w, err_l, ref_w, ref_l, beta, reverse)
    stats["mean_t"] = t.float().mean().item()
    return loss, stats
