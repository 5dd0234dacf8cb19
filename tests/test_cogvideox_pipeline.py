"""The CogVideoX pieces composed by hand (T5Tokenizer -> T5EncoderModel -> transformer + CFG -> v-DDIM ->
VAE decode) reproduce diffusers' CogVideoXPipeline with the same weights and seed.

This is not sample.py (which wires the pieces for users); it checks that the pieces fit: latent layout
(B, F, C, H, W), negative prompt = T5 of "", guidance on v, trailing DDIM with set_alpha_to_one, RoPE
crop region from the pixel size, scaling factor at decode.
"""

from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch
from conftest import maxerr, randomize_
from test_t5 import hf_config, tokenizer_dir  # noqa: F401  (fixture)

from npo_min.cogvideox import PRESETS as TPRESETS, CogVideoXTransformer3DModel
from npo_min.cogvideox_vae import PRESETS as VPRESETS, AutoencoderKLCogVideoX
from npo_min.schedule import NoiseSchedule
from npo_min.solvers import ddim, make_timesteps
from npo_min.t5 import PRESETS as T5PRESETS, T5EncoderModel, T5Tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKLCogVideoX as RefVAE, CogVideoXDDIMScheduler, CogVideoXPipeline  # noqa: E402
from diffusers import CogVideoXTransformer3DModel as RefTransformer  # noqa: E402

L = 12  # text length (226 in the real model)


@pytest.mark.parametrize("preset", ["tiny-2b", "tiny-5b"])
def test_pipeline_parity(tokenizer_dir, preset):  # noqa: F811
    t5_cfg = T5PRESETS["tiny"]
    tr_cfg = replace(TPRESETS[preset], text_embed_dim=t5_cfg.d_model, max_text_seq_length=L)
    vae_cfg = VPRESETS["tiny"]
    ref_t5 = randomize_(transformers.T5EncoderModel(hf_config(t5_cfg)).eval(), seed=1, std=0.3)
    ref_tr = randomize_(RefTransformer(**asdict(tr_cfg)).eval(), seed=2, std=0.2)
    ref_vae = randomize_(RefVAE(**asdict(vae_cfg)).eval(), seed=3, std=0.15)
    sched = CogVideoXDDIMScheduler(clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                                   timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=3.0)
    tok = transformers.T5TokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), extra_ids=0)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=ref_t5, vae=ref_vae, transformer=ref_tr, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    prompts, H, W, frames, steps, scale = ["A panda sits on a stool.", "Café crème, 東京"], 48, 80, 9, 4, 6.0
    with torch.no_grad():
        ref_latents = pipe(prompt=prompts, negative_prompt="", height=H, width=W, num_frames=frames, num_inference_steps=steps,
                           guidance_scale=scale, generator=torch.Generator().manual_seed(0), output_type="latent",
                           max_sequence_length=L).frames
        ref_video = pipe.decode_latents(ref_latents)

    t5 = T5EncoderModel(t5_cfg).eval()
    t5.load_state_dict(ref_t5.state_dict())
    model = CogVideoXTransformer3DModel(tr_cfg).eval()
    model.load_state_dict(ref_tr.state_dict())
    vae = AutoencoderKLCogVideoX(vae_cfg).eval()
    vae.load_state_dict(ref_vae.state_dict())
    tokenize = T5Tokenizer(tokenizer_dir, max_length=L)
    with torch.no_grad():
        cond, null = t5(tokenize(prompts)), t5(tokenize([""] * len(prompts)))  # (B, L, d_model)

        def guided_v(x, t):  # CFG on v: v_u + scale (v_c - v_u)
            v_c, v_u = model(x, t, cond), model(x, t, null)
            return v_u + scale * (v_c - v_u)

        noise = torch.randn(2, (frames - 1) // 4 + 1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
        latents = ddim(guided_v, noise, make_timesteps(steps, "trailing", steps_offset=0), NoiseSchedule.cogvideox(3.0),
                       set_alpha_to_one=True, prediction_type="v_prediction")
        video = vae.decode(latents.permute(0, 2, 1, 3, 4) / vae.scaling_factor)  # (B, F, C, h, w) -> (B, C, F, h, w)
    assert latents.shape == ref_latents.shape == (2, 3, 4, 6, 10)
    assert maxerr(latents, ref_latents) < 1e-4, maxerr(latents, ref_latents)
    assert video.shape == ref_video.shape == (2, 3, 9, 48, 80)
    assert maxerr(video, ref_video) < 1e-4 * max(1.0, ref_video.abs().max().item()), maxerr(video, ref_video)
