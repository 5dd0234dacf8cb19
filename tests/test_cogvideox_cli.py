"""train.py / sample.py --model cogvideox end to end on tiny random checkpoints in the official folder layout
(text_encoder/ sharded, tokenizer/ tokenizer.json, transformer/, vae/, scheduler/), 2B-style (sin-cos, shift 3)
and 5B-style (3D RoPE, shift 1, VAE scaling 0.7); the Self-NPO step under v-prediction; clip readers; bad input.

Oracles: diffusers' CogVideoXPipeline (latents with the same seeds) and the eps-prediction Self-NPO path (a
v model built from an eps model must give the same rollout, target and loss). Test-only: diffusers, transformers.
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import maxerr, randomize_
from PIL import Image
from test_t5 import hf_config, tokenizer_dir  # noqa: F401  (fixture)

import sample
import train
from npo_min.checkpoint import CheckpointError
from npo_min.cogvideox import PRESETS as TPRESETS
from npo_min.cogvideox_vae import PRESETS as VPRESETS
from npo_min.data import clip_caption_pairs, load_clip
from npo_min.offsets import load_offset, save_delta
from npo_min.pipelines import MODELS, load_pipeline
from npo_min.pipelines.cogvideox import CogVideoXPipe
from npo_min.schedule import NoiseSchedule, x0_eps_to_v
from npo_min.self_npo import SelfNPOConfig, tdft_loss, truncated_rollout
from npo_min.t5 import PRESETS as T5PRESETS

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
L = 12  # text length (226 in the real model)
STYLES = {"2b": ("tiny-2b", 3.0, 1.15258426), "5b": ("tiny-5b", 1.0, 0.7)}


def make_folder(root: Path, style: str, tokenizer: Path) -> dict:
    """A tiny CogVideoX diffusers folder written by diffusers' / transformers' own save_pretrained."""
    preset, shift, scaling = STYLES[style]
    t5_cfg = T5PRESETS["tiny"]
    tr_cfg = replace(TPRESETS[preset], text_embed_dim=t5_cfg.d_model, max_text_seq_length=L)
    t5 = randomize_(transformers.T5EncoderModel(hf_config(t5_cfg)).eval(), seed=1, std=0.3)
    tr = randomize_(diffusers.CogVideoXTransformer3DModel(**asdict(tr_cfg)).eval(), seed=2, std=0.2)
    vae = randomize_(diffusers.AutoencoderKLCogVideoX(**asdict(replace(VPRESETS["tiny"], scaling_factor=scaling))).eval(),
                     seed=3, std=0.15)
    sched = diffusers.CogVideoXDDIMScheduler(clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                                             timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=shift)
    folder = root / f"cogvideox-{style}"
    t5.save_pretrained(folder / "text_encoder", max_shard_size="20KB")  # sharded, as the official T5
    tr.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    sched.save_pretrained(folder / "scheduler")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_bytes((tokenizer / "tokenizer.json").read_bytes())
    tok = transformers.T5TokenizerFast(tokenizer_file=str(tokenizer / "tokenizer.json"), extra_ids=0)
    pipe = diffusers.CogVideoXPipeline(tokenizer=tok, text_encoder=t5, vae=vae, transformer=tr, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return dict(folder=folder, ref=pipe)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("cogvideox")
    return {style: make_folder(root, style, tokenizer_dir) for style in STYLES}


def random_delta(folder: Path, out: Path, scale: float = 0.02) -> Path:
    pipe = load_pipeline("cogvideox", folder)
    base = pipe.denoiser.state_dict()
    g = torch.Generator().manual_seed(5)
    trained = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return save_delta(trained, base, out / "delta.safetensors", {"test": "random"})


# ----------------------------------------------------------------------------- sample.py vs CogVideoXPipeline


@pytest.mark.parametrize("style,frames,height,width", [("2b", 9, 48, 80), ("5b", 13, 32, 48), ("5b", 9, 64, 32)])
def test_sample_matches_cogvideox_pipeline(tiny, tmp_path, monkeypatch, style, frames, height, width):
    """sample.py's base (plain CFG) latents equal CogVideoXPipeline's with the same per-sample seeds; the npo
    branch differs; base/ and npo/ hold animated GIFs and grid.png a labelled frame grid."""
    folder, ref = tiny[style]["folder"], tiny[style]["ref"]
    delta = random_delta(folder, tmp_path / "delta")
    prompts = ["A panda sits on a stool.", "Café crème, 東京"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    latents = []
    decode = CogVideoXPipe.decode
    monkeypatch.setattr(CogVideoXPipe, "decode", lambda self, x0: (latents.append(x0.clone()), decode(self, x0))[1])
    out, steps, seed = tmp_path / "samples", 4, 3
    files = sample.main(["--model", "cogvideox", "--weights", str(folder), "--neg-ckpt", str(delta), "--prompts",
                         str(tmp_path / "prompts.txt"), "--out", str(out), "--steps", str(steps), "--num-frames", str(frames),
                         "--height", str(height), "--width", str(width), "--batch-size", "2", "--seed", str(seed),
                         "--device", "cpu", "--no-progress"])
    base, npo = latents  # one batch: base then npo
    with torch.no_grad():
        expected = ref(prompt=prompts, negative_prompt="", height=height, width=width, num_frames=frames,
                       num_inference_steps=steps, guidance_scale=6.0, output_type="latent", max_sequence_length=L,
                       generator=[torch.Generator().manual_seed(seed + i) for i in range(2)]).frames
    err = maxerr(base, expected)
    print(f"{style} {frames} frames {height}x{width}: sample.py base latents vs CogVideoXPipeline max abs error {err:.2e}")
    assert base.shape == expected.shape == (2, (frames - 1) // 4 + 1, 4, height // 8, width // 8)
    assert err < 1e-4
    assert maxerr(npo, base) > 1e-3  # the negative model changed the samples
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["args.json", "base/0000.gif", "base/0001.gif", "grid.png", "npo/0000.gif", "npo/0001.gif"]
    assert sorted(files) == sorted(out / n for n in written if n != "args.json")
    n_frames = ref.vae.decode(expected[:1].permute(0, 2, 1, 3, 4)).sample.shape[2]  # 4k + 1 (16 for 4 latent frames)
    with Image.open(out / "base" / "0000.gif") as gif:  # pillow merges identical consecutive frames, adding durations
        durations = [gif.seek(i) or gif.info["duration"] for i in range(gif.n_frames)]
        assert gif.size == (width, height) and abs(sum(durations) - n_frames * 125) <= 5 * n_frames  # 8 fps (GIF: 10 ms units)
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 5 * width and grid.height > 2 * height  # 2 blocks x 5 frames, 2 rows + labels


# ----------------------------------------------------------------------------- train.py


def write_gif(path: Path, frames: int, size=(56, 40), seed=0):
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(frames)]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=125, loop=0)


def make_clips(folder: Path, frames: int = 10) -> Path:
    """One animated GIF and one frame folder, each with a caption."""
    folder.mkdir(parents=True)
    write_gif(folder / "a.gif", frames)
    (folder / "a.txt").write_text("a panda eating bamboo")
    (folder / "b").mkdir()
    rng = np.random.default_rng(1)
    for i in range(frames):
        Image.fromarray(rng.integers(0, 255, (36, 60, 3), dtype=np.uint8)).save(folder / "b" / f"{i:03d}.png")
    (folder / "b.txt").write_text("a car on a dirt road")
    return folder


def test_train_two_steps_writes_a_delta_that_loads(tiny, tmp_path):
    folder = tiny["5b"]["folder"]
    data, out = make_clips(tmp_path / "clips"), tmp_path / "run"
    train.main(["--model", "cogvideox", "--weights", str(folder), "--data", str(data), "--steps", "2", "--batch-size", "1",
                "--grad-accum", "2", "--resolution", "32x48", "--num-frames", "9", "--out", str(out), "--no-progress",
                "--device", "cpu", "--gradient-checkpointing"])
    log = (out / "loss.csv").read_text().splitlines()
    assert len(log) == 3 and all(np.isfinite(float(row.split(",")[1])) for row in log[1:])
    pipe = load_pipeline("cogvideox", folder)
    delta = load_offset(out / "delta.safetensors", pipe.denoiser.state_dict(), pipe.read_weights)  # fingerprint checked
    assert sorted(delta) == sorted(pipe.denoiser.state_dict()) and any(v.abs().max() > 0 for v in delta.values())
    args = json.loads((out / "args.json").read_text())
    assert args["resolution"] == [32, 48] and args["num_frames"] == 9 and args["lr"] == MODELS["cogvideox"].train["lr"]


def test_self_npo_batches_layout(tiny, tmp_path):
    pipe = load_pipeline("cogvideox", tiny["2b"]["folder"])
    batches = pipe.self_npo_batches(str(make_clips(tmp_path / "clips", 13)), 2, torch.Generator().manual_seed(0),
                                    resolution=(32, 16), num_frames=13)
    x0, cond = next(batches)
    assert x0.shape == (2, 4, 4, 4, 2) and cond.shape == (2, L, T5PRESETS["tiny"].d_model)
    assert torch.isfinite(x0).all()


# ----------------------------------------------------------------------------- Self-NPO under v-prediction


class EpsModel(torch.nn.Module):
    """A toy eps-prediction denoiser f(x, t, c) (nonlinear in x, depends on t and c)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x, t, c):
        return torch.tanh(self.w * x + c.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 1000)


class VModel(torch.nn.Module):
    """The same denoiser in v-prediction: v = alpha eps - sigma x0, x0 = (x - sigma eps) / alpha."""

    def __init__(self, eps_model, schedule):
        super().__init__()
        self.eps_model, self.schedule = eps_model, schedule

    def forward(self, x, t, c):
        eps = self.eps_model(x, t, c)
        alpha, sigma = self.schedule.coefs(t, x)
        return x0_eps_to_v((x - sigma * eps) / alpha, eps, alpha, sigma)


@pytest.mark.parametrize("start", ["data", "noise"])
def test_tdft_step_v_prediction_equals_eps_form(start):
    """The rollout, its Tweedie target, the re-noised point and the loss are the same for an eps model and the
    v model that predicts the same thing (SD schedule, where both forms are defined), and finite for a v model
    on the zero-terminal-SNR CogVideoX schedule (rollouts from t = 999, where alpha = 0)."""
    sched, cfg = NoiseSchedule.sd(), SelfNPOConfig(k=3, start=start, rollout_w=0.5)
    eps_model = EpsModel()
    v_model = VModel(eps_model, sched)
    x0 = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond, null = torch.randn(6, 2, 4, dtype=torch.float64), torch.zeros(1, 2, 4, dtype=torch.float64)
    results = []
    for model, kind in ((eps_model, "epsilon"), (v_model, "v_prediction")):
        g = torch.Generator().manual_seed(1)
        x_t, t, target = truncated_rollout(model, x0, cond, null, sched, cfg, g, prediction_type=kind)
        loss = tdft_loss(model, x_t, t, target, cond, null, sched, cfg, g, prediction_type=kind)
        results.append((x_t, t, target, loss))
    (xe, te, ge, le), (xv, tv, gv, lv) = results
    assert torch.equal(te, tv)
    torch.testing.assert_close(xv, xe, rtol=0, atol=1e-10)
    torch.testing.assert_close(gv, ge, rtol=0, atol=1e-10)
    torch.testing.assert_close(lv, le, rtol=1e-9, atol=0)
    cog = NoiseSchedule.cogvideox(3.0)
    v_cog = lambda x, t, c: torch.tanh(0.3 * x + t.reshape(-1, 1, 1, 1) / 1000)  # any v model
    x_t, t, target = truncated_rollout(v_cog, x0, cond, null, cog, SelfNPOConfig(k=2, start="noise"),
                                       torch.Generator().manual_seed(2), prediction_type="v_prediction")
    loss = tdft_loss(v_cog, x_t, t, target, cond, null, cog, SelfNPOConfig(), torch.Generator().manual_seed(3),
                     prediction_type="v_prediction")
    assert torch.isfinite(target).all() and torch.isfinite(loss)


def test_v_prediction_needs_ddim():
    from npo_min.solvers import sample as solve

    with pytest.raises(ValueError, match="--solver ddim"):
        solve(lambda x, t: x, torch.zeros(1, 1), 2, NoiseSchedule.cogvideox(), "dpmpp_2m", "trailing", prediction_type="v_prediction")


# ----------------------------------------------------------------------------- clips and bad input


def test_clip_readers(tmp_path):
    data = make_clips(tmp_path / "clips", 10)
    pairs = clip_caption_pairs(data)
    assert [(p.name, c) for p, c in pairs] == [("a.gif", "a panda eating bamboo"), ("b", "a car on a dirt road")]
    clip = load_clip(pairs[0][0], 9, 24, 40)
    assert clip.shape == (3, 9, 24, 40) and clip.min() >= -1 and clip.max() <= 1
    with Image.open(pairs[0][0]) as gif:  # frame 0 resized to cover 24 x 40 (56 x 40 -> 56 x 40 crop 40 x 24 ...)
        gif.seek(3)
        assert gif.size == (56, 40)
    frames = load_clip(pairs[1][0], 9, 36, 60)  # no resize needed: the frames themselves
    first = np.asarray(Image.open(data / "b" / "000.png"), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(frames[:, 0].permute(1, 2, 0).numpy(), first, atol=1e-6)
    with pytest.raises(ValueError, match="has 10 frames but 13 are needed"):
        load_clip(pairs[0][0], 13, 24, 40)
    (data / "c.mp4").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"c\.mp4: no video decoder.*ffmpeg"):
        clip_caption_pairs(data)
    (data / "c.mp4").unlink()
    write_gif(data / "d.gif", 9)
    with pytest.raises(FileNotFoundError, match="no same-name .txt caption"):
        clip_caption_pairs(data)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bad_input_one_line_errors(tiny, tmp_path, capsys):
    folder2b = tiny["2b"]["folder"]
    (tmp_path / "p.txt").write_text("a cat\n")
    common = ["--weights", str(folder2b), "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    # 2B checkpoint with the 5B preset: the CLI prints one line, no traceback
    run = run_cli("sample.py", "--model", "cogvideox", *common, "--neg-ckpt", str(folder2b), "--prompts", str(tmp_path / "p.txt"),
                  "--config", "cogvideox-5b", "--steps", "1", "--num-frames", "9", "--height", "32", "--width", "32")
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and "cogvideox-5b" in lines[0], run.stderr
    assert "use_rotary_positional_embeddings" in lines[0] and "num_layers" in lines[0]
    # frame count not 4k + 1 (refused at parse time, before loading)
    for script in (sample, train):
        with pytest.raises(SystemExit):
            script.main(["--model", "cogvideox", *common, "--num-frames", "10"])
        assert "--num-frames 10 is not 4k + 1" in capsys.readouterr().err.strip().splitlines()[-1]
    # a clip shorter than the frames asked for (the message is the CLI's one line)
    data = make_clips(tmp_path / "clips", 5)
    with pytest.raises(ValueError, match="has 5 frames but 9 are needed"):
        train.main(["--model", "cogvideox", *common, "--data", str(data), "--num-frames", "9", "--resolution", "32x32",
                    "--steps", "1", "--batch-size", "1", "--grad-accum", "1"])
    # video-only flags on an image model, and a bad --resolution
    with pytest.raises(ValueError, match="for video models"):
        train.main(["--model", "digits", "--out", str(tmp_path / "d"), "--num-frames", "9", "--steps", "1"])
    with pytest.raises(SystemExit):
        train.main(["--model", "cogvideox", *common, "--resolution", "480by720"])
    assert "--resolution must be N or HxW" in capsys.readouterr().err
    # the pipeline refuses sizes and frame counts it cannot make
    pipe = load_pipeline("cogvideox", folder2b)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.noise_shape(40, 32, 9)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        pipe.noise_shape(32, 32, 12)
    with pytest.raises(ValueError, match="does not take --text-dtype"):
        load_pipeline("digits", None, text_dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="lacks transformer/"):
        load_pipeline("cogvideox", tmp_path)


def test_bf16_text_encoder_and_release(tiny):
    pipe = load_pipeline("cogvideox", tiny["2b"]["folder"], text_dtype=torch.bfloat16)
    assert next(pipe.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(pipe.denoiser.parameters()).dtype == torch.float32
    c = pipe.encode(["a cat"])
    assert c.dtype == torch.float32 and c.shape == (1, L, T5PRESETS["tiny"].d_model)
    full = load_pipeline("cogvideox", tiny["2b"]["folder"]).encode(["a cat"])
    cos = torch.nn.functional.cosine_similarity(c.flatten(), full.flatten(), dim=0).item()
    print(f"bf16 vs fp32 T5 states (random tiny T5): cosine {cos:.4f}")
    assert cos > 0.99  # the same encoder, rounded to bf16 (random weights amplify the rounding)
    null = pipe.null_cond(1)
    pipe.release_text_encoder()
    assert pipe.text_encoder is None and torch.equal(pipe.null_cond(3)[0], null[0])
    with pytest.raises(RuntimeError, match="released"):
        pipe.encode(["a dog"])


def test_diffusers_cogvideox_lora_and_full_transformer_as_offsets(tiny, tmp_path):
    """--neg-ckpt / --pos-ckpt forms on the transformer: a LoRA in diffusers' CogVideoX names (`transformer.` +
    PEFT lora_A / lora_B), fused as W += B A (no alpha: scale 1), and a full fine-tuned transformer/ folder."""
    from safetensors.torch import save_file

    folder = tiny["5b"]["folder"]
    pipe = load_pipeline("cogvideox", folder)
    base = pipe.denoiser.state_dict()
    g = torch.Generator().manual_seed(9)
    A, B = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    save_file({"transformer.transformer_blocks.1.attn1.to_v.lora_A.weight": A,
               "transformer.transformer_blocks.1.attn1.to_v.lora_B.weight": B}, tmp_path / "lora.safetensors")
    delta = load_offset(tmp_path / "lora.safetensors", base, pipe.read_weights)
    assert list(delta) == ["transformer_blocks.1.attn1.to_v.weight"]
    torch.testing.assert_close(delta["transformer_blocks.1.attn1.to_v.weight"], B @ A)
    tuned = {k: v + 0.01 for k, v in base.items()}
    from diffusers import CogVideoXTransformer3DModel

    ref = CogVideoXTransformer3DModel.from_pretrained(folder / "transformer")
    ref.load_state_dict(tuned)
    ref.save_pretrained(tmp_path / "tuned" / "transformer")
    eta = load_offset(tmp_path / "tuned", base, pipe.read_weights)
    assert sorted(eta) == sorted(base) and all(torch.allclose(v, torch.full_like(v, 0.01), atol=1e-6) for v in eta.values())


def test_scheduler_config_checked(tiny, tmp_path):
    """The released scheduler_config.json gives its shift; absent keys take diffusers' defaults (so a file without
    prediction_type is an eps model and refused); a value this implementation does not reproduce is named."""
    from npo_min.pipelines.cogvideox import read_scheduler_config

    released = json.loads((tiny["5b"]["folder"] / "scheduler" / "scheduler_config.json").read_text())
    assert read_scheduler_config(tiny["5b"]["folder"]) == 1.0 and read_scheduler_config(tiny["2b"]["folder"]) == 3.0
    assert read_scheduler_config(tmp_path) is None  # no scheduler/: the loader falls back to the size's released value
    (tmp_path / "scheduler").mkdir()
    for drop, change, message in [("snr_shift_scale", {}, None), ("prediction_type", {}, "prediction_type='epsilon'"),
                                  (None, {"clip_sample": True}, "clip_sample=True"),
                                  (None, {"beta_schedule": "linear"}, "beta_schedule='linear'")]:
        cfg = {k: v for k, v in released.items() if k != drop} | change
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
        if message is None:
            assert read_scheduler_config(tmp_path) == 3.0  # diffusers' default shift
        else:
            with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
                read_scheduler_config(tmp_path)


# ----------------------------------------------------------------------------- Diffusion-NPO trainers on video


def make_clip_pairs(folder: Path, frames: int = 9) -> Path:
    """A pairs file over clips: two GIFs (one pair) and two frame folders (another), same size within a pair."""
    folder.mkdir(parents=True)
    write_gif(folder / "a.gif", frames, seed=0)
    write_gif(folder / "b.gif", frames, seed=1)
    for name, seed in (("c", 2), ("d", 3)):
        (folder / name).mkdir()
        rng = np.random.default_rng(seed)
        for i in range(frames):
            Image.fromarray(rng.integers(0, 255, (36, 60, 3), dtype=np.uint8)).save(folder / name / f"{i:03d}.png")
    rows = [{"prompt": "a panda eating bamboo", "chosen": "a.gif", "rejected": "b.gif"},
            {"prompt": "a car on a dirt road", "chosen": "c", "rejected": "d"}]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl"


def test_dpo_npo_two_steps_writes_a_lora_that_loads_as_neg_ckpt(tiny, tmp_path):
    """train.py --model cogvideox --method dpo-npo on GIF and frame-folder pairs: 2 steps, the LoRA (the MODELS npo
    row's rank 8) loads back through --neg-ckpt and changes the samples."""
    folder = tiny["5b"]["folder"]
    pairs, out = make_clip_pairs(tmp_path / "clips"), tmp_path / "run"
    train.main(["--model", "cogvideox", "--weights", str(folder), "--method", "dpo-npo", "--pairs", str(pairs),
                "--steps", "2", "--batch-size", "1", "--grad-accum", "2", "--lr", "1e-3", "--resolution", "32x48",
                "--num-frames", "9", "--out", str(out), "--no-progress", "--device", "cpu"])
    log = (out / "loss.csv").read_text().splitlines()
    assert len(log) == 3 and all(np.isfinite(float(row.split(",")[1])) for row in log[1:])
    lora = out / "pytorch_lora_weights.safetensors"
    pipe = load_pipeline("cogvideox", folder)
    delta = load_offset(lora, pipe.denoiser.state_dict(), pipe.read_weights)
    assert any(k.endswith("attn1.to_q.weight") for k in delta) and any(v.abs().max() > 0 for v in delta.values())
    from safetensors import safe_open

    with safe_open(lora, "pt") as f:  # diffusers' CogVideoX names: the component is the transformer
        assert all(k.startswith("transformer.") for k in f.keys())
    args = json.loads((out / "args.json").read_text())
    assert args["lora_rank"] == MODELS["cogvideox"].npo["lora_rank"] and args["dpo_beta"] == MODELS["cogvideox"].npo["dpo_beta"]
    (tmp_path / "p.txt").write_text("a panda\n")
    sample.main(["--model", "cogvideox", "--weights", str(folder), "--neg-ckpt", str(lora), "--prompts", str(tmp_path / "p.txt"),
                 "--out", str(tmp_path / "samples"), "--steps", "2", "--num-frames", "9", "--height", "32", "--width", "48",
                 "--batch-size", "1", "--device", "cpu", "--no-progress"])
    assert (tmp_path / "samples" / "npo" / "0000.gif").is_file()


def test_clip_pairs_read_as_video_latents(tiny, tmp_path):
    """preference_batches on clips: latents `(B, F', C, h, w)`, the chosen and rejected clips encoded apart."""
    from npo_min.pairs import preference_batches

    pipe = load_pipeline("cogvideox", tiny["2b"]["folder"])
    x_w, x_l, cond = next(preference_batches(pipe, make_clip_pairs(tmp_path / "clips", 13), 2, torch.Generator().manual_seed(0),
                                             resolution=(32, 16), num_frames=13, log=lambda s: None))
    assert x_w.shape == x_l.shape == (2, 4, 4, 4, 2) and cond.shape == (2, L, T5PRESETS["tiny"].d_model)
    assert torch.isfinite(x_w).all() and (x_w - x_l).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["reward-npo", "guided-reward-npo"])
def test_reward_trainers_two_steps_on_video(tiny, tmp_path, monkeypatch, method):
    """reward-npo / guided-reward-npo on the tiny CogVideoX (v-prediction DDIM, differentiable VAE decode, the reward
    the mean over frames): 2 steps write a LoRA that loads. The reward is a stand-in (the mean brightness of each
    frame, squashed to [0, 1]) since the image scorers are tested elsewhere; it must see every frame."""
    from eval import rewards

    seen = []

    def brightness(images, prompts):
        seen.append((tuple(images.shape), len(prompts)))
        return torch.sigmoid(images.mean(dim=(1, 2, 3)))  # (B*F, 3, H, W) -> (B*F,)

    monkeypatch.setattr(rewards, "load_reward", lambda name, weights=None, device="cpu": brightness)
    folder, out = tiny["2b"]["folder"], tmp_path / "run"
    (tmp_path / "p.txt").write_text("a panda\na car\n")
    train.main(["--model", "cogvideox", "--weights", str(folder), "--method", method, "--prompts", str(tmp_path / "p.txt"),
                "--steps", "2", "--batch-size", "1", "--grad-accum", "1", "--lr", "1e-3", "--sample-steps", "3",
                "--resolution", "32x48", "--num-frames", "9", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert seen and all(shape == (9, 3, 32, 48) and n == 9 for shape, n in seen)  # 1 clip x 9 frames
    log = (out / "loss.csv").read_text().splitlines()
    assert "reward" in log[0] and len(log) == 3
    pipe = load_pipeline("cogvideox", folder)
    delta = load_offset(out / "pytorch_lora_weights.safetensors", pipe.denoiser.state_dict(), pipe.read_weights)
    assert any(v.abs().max() > 0 for v in delta.values())


def test_exported_lora_loads_in_diffusers_cogvideox(tiny, tmp_path):
    """python -m npo_min.export --model cogvideox writes PEFT names with the `transformer.` prefix; diffusers'
    CogVideoXPipeline.load_lora_weights + fuse_lora on them gives our fused delta (exact rank: <= 1e-5), and our
    reader reads the file back to the same delta."""
    import copy

    from npo_min import export
    from npo_min.checkpoint import read_metadata
    from npo_min.guidance import compose_negative

    folder, ref = tiny["5b"]["folder"], tiny["5b"]["ref"]
    pipe = load_pipeline("cogvideox", folder)
    base = pipe.denoiser.state_dict()
    g, delta = torch.Generator().manual_seed(4), {}
    for layer in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_out.0", "transformer_blocks.1.ff.net.2"):
        w = base[layer + ".weight"]
        delta[layer + ".weight"] = 0.02 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)  # rank 2
    save_delta({k: base[k] + delta.get(k, 0) for k in base}, base, tmp_path / "run" / "delta.safetensors", {"base": "tiny"})
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    export.main([str(tmp_path / "run"), "--model", "cogvideox", "--weights", str(folder), "--rank", "2", "--out", str(lora)])
    from safetensors import safe_open

    with safe_open(lora, "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    meta = json.loads(read_metadata(lora)["lora_adapter_metadata"])
    assert meta["transformer.r"] == meta["transformer.lora_alpha"] == 2
    back = load_offset(lora, base, pipe.read_weights)
    assert sorted(back) == sorted(delta) and max(maxerr(back[k], delta[k]) for k in delta) <= 1e-6
    video = diffusers.CogVideoXPipeline(tokenizer=ref.tokenizer, text_encoder=ref.text_encoder, vae=ref.vae,
                                        transformer=copy.deepcopy(ref.transformer), scheduler=ref.scheduler)
    video.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="npo")
    video.fuse_lora(lora_scale=1.0)
    state = video.transformer.state_dict()
    fused = {k: v for k, v in state.items() if "lora" not in k and "base_layer" not in k}
    fused |= {k.replace(".base_layer", ""): v for k, v in state.items() if ".base_layer." in k}
    ours = compose_negative(base, delta=delta)
    err = max(maxerr(fused[k], ours[k]) for k in ours)
    print(f"diffusers CogVideoX load_lora_weights + fuse_lora vs our fused delta: max abs err {err:.3g}")
    assert err <= 1e-5 and max(maxerr(fused[k], base[k]) for k in delta) > 1e-3
