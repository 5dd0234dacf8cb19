"""One-pass NPO guidance on the other families' denoisers: the SDXL UNet (dict conditioning with pooled text
and time ids) and the CogVideoX transformer (video latents (B, F, C, H, W); its patch conv sees B * F rows,
sample-major). Same reference as tests/test_batched_offsets.py: the two-model result with dense offsets.
"""

import pytest
import torch

from npo_min.batched_offsets import LowRankOffset, npo_denoisers
from npo_min.cogvideox import PRESETS as COG, CogVideoXTransformer3DModel
from npo_min.guidance import guided_denoiser
from npo_min.sdxl import PRESETS as SDXL
from npo_min.unet import UNet2DConditionModel
from test_batched_offsets import ATTN, lora_factors_for, reference, rel


def _randomized(model):
    with torch.no_grad():  # norms and biases away from their init, so offsets and base interact
        for i, p in enumerate(model.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return model.eval()


def _one_pass_vs_two_models(model, x, t, cond, null, scale, conv_layers):
    attn = [n for n, _ in model.named_modules() if n.endswith(ATTN)]
    delta = LowRankOffset(lora_factors_for(model, attn, 4, seed=1))
    eta = LowRankOffset(lora_factors_for(model, conv_layers + attn[:4], 2, seed=2))
    want = reference(model, eta, delta, 0.5, 2.0, x, t, cond, null, scale)
    pos, neg, how = npo_denoisers(model, eta, delta, 0.5, 2.0)
    assert how.startswith("one-pass")
    with torch.no_grad():
        got = guided_denoiser(pos, neg, cond, null, scale)(x, t)
    plain = reference(model, None, None, 1, 1, x, t, cond, null, scale)
    return rel(got, want), rel(got, plain)


@pytest.mark.parametrize("scale", [5.0, 1.0])
def test_sdxl_unet_one_pass_equals_two_models(scale):
    torch.manual_seed(0)
    unet = _randomized(UNet2DConditionModel(SDXL["tiny"].unet))
    g, cfg = torch.Generator().manual_seed(3), unet.cfg
    B = 2
    x = torch.randn(B, cfg.in_channels, 8, 12, generator=g)  # non-square latents
    ids = torch.tensor([[64.0, 96, 0, 0, 64, 96], [64, 96, 8, 4, 64, 96]])  # (B, 6): per-sample crop offsets
    cond = {"encoder_hidden_states": torch.randn(B, 5, cfg.cross_attention_dim, generator=g),
            "text_embeds": torch.randn(B, 32, generator=g), "time_ids": ids}
    null = {"encoder_hidden_states": torch.zeros(1, 5, cfg.cross_attention_dim), "text_embeds": torch.zeros(1, 32)}
    convs = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)][:4]
    err, moved = _one_pass_vs_two_models(unet, x, torch.tensor([999, 400]), cond, null, scale, convs)
    print(f"sdxl scale {scale}: one-pass vs two-model relative error {err:.2g}")
    assert err <= 1e-5 and moved > 1e-3


@pytest.mark.parametrize("preset", ["tiny-2b", "tiny-5b"])
def test_cogvideox_one_pass_equals_two_models(preset):
    torch.manual_seed(0)
    model = _randomized(CogVideoXTransformer3DModel(COG[preset]))
    cfg, g, B = model.cfg, torch.Generator().manual_seed(3), 2
    x = torch.randn(B, 3, cfg.in_channels, 8, 12, generator=g)  # (B, F, C, H, W): 3 latent frames, non-square
    cond = torch.randn(B, 6, cfg.text_embed_dim, generator=g)
    null = torch.randn(1, 6, cfg.text_embed_dim, generator=g)
    err, moved = _one_pass_vs_two_models(model, x, torch.tensor([999, 250]), cond, null, 6.0, ["patch_embed.proj"])
    print(f"cogvideox {preset}: one-pass vs two-model relative error {err:.2g}")
    assert err <= 1e-5 and moved > 1e-3
