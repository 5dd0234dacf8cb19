"""Diffusion-NPO trainers end to end (train.py --method dpo-npo / reward-npo / guided-reward-npo) on tiny random
digits and SD1.5-architecture models: outputs load back, losses move the right way, bad inputs are refused
with one line and nothing written; the differentiable rewards of eval/rewards.py."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import write_random_digits_base
from eval import rewards
from eval.t2i import scorers
from npo_min.checkpoint import read_metadata
from npo_min.lora import LORA_FILE
from npo_min.offsets import load_offset
from npo_min.pairs import read_pairs
from npo_min.pipelines import load_pipeline
from test_sd15 import ckpt  # noqa: F401  (the tiny SD1.5 checkpoint fixture)
from test_scorers import hf_clip, randomize_ as randomize_clip, tiny_config

DIGITS_FAST = ["--no-progress", "--batch-size", "4", "--lora-rank", "2"]


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory):
    return write_random_digits_base(tmp_path_factory.mktemp("base"))


def write_pairs(folder, n=6, size=(8, 8), mode="L", prompts=None, seed=0):
    """n pairs of random images + pairs.jsonl (the last pair a tie); returns the file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        for tag in ("a", "b"):
            shape = (size[1], size[0]) + (() if mode == "L" else (3,))
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}{tag}.png")
        prompt = prompts[i % len(prompts)] if prompts else str(i % 10)
        lines.append({"prompt": prompt, "chosen": f"{i}a.png", "rejected": f"{i}b.png", "tie": i == n - 1})
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_read_pairs_drops_ties_and_resolves_paths(tmp_path):
    pairs, ties = read_pairs(write_pairs(tmp_path / "p"))
    assert (len(pairs), ties) == (5, 1) and pairs[0].chosen == tmp_path / "p" / "0a.png" and pairs[0].prompt == "0"


def test_dpo_npo_digits_writes_lora_and_log(digits_base, tmp_path):
    pairs = write_pairs(tmp_path / "p")
    out = tmp_path / "run"
    train.main(["--method", "dpo-npo", "--weights", str(digits_base), "--pairs", str(pairs), "--out", str(out),
                "--steps", "2", *DIGITS_FAST])
    meta = read_metadata(out / LORA_FILE)
    assert meta["method"] == "dpo-npo" and meta["reverse"] == "True" and meta["dpo_beta"] == "500.0"
    log = (out / "loss.csv").read_text().splitlines()
    assert len(log) == 3 and "implicit_acc" in log[0]
    assert abs(float(log[1].split(",")[1]) - math.log(2)) < 1e-5  # step 1: model == reference, loss = log 2
    args = json.loads((out / "args.json").read_text())
    assert args["method"] == "dpo-npo" and args["lora_rank"] == 2
    pipe = load_pipeline("digits", str(digits_base))
    delta = load_offset(out, pipe.denoiser.state_dict(), pipe.read_weights)
    assert delta and all(torch.isfinite(v).all() for v in delta.values())
    # full fine-tuning (--lora-rank 0) writes a delta instead
    train.main(["--method", "dpo-npo", "--weights", str(digits_base), "--pairs", str(pairs), "--out", str(tmp_path / "full"),
                "--steps", "1", "--no-progress", "--batch-size", "4", "--lora-rank", "0", "--no-reverse"])
    assert read_metadata(tmp_path / "full" / "delta.safetensors")["reverse"] == "False"


@pytest.mark.parametrize("case,match", [
    ("missing", "not found"), ("unreadable", "cannot read image"), ("size", "same size"), ("empty", "empty"),
    ("ties", "ties"), ("badjson", "not JSON"), ("field", "lacks"),
])
def test_bad_pairs_are_refused_with_one_line_and_nothing_written(digits_base, tmp_path, case, match):
    folder = tmp_path / "p"
    pairs = write_pairs(folder)
    if case == "missing":
        (folder / "1b.png").unlink()
    elif case == "unreadable":
        (folder / "2a.png").write_bytes(b"not a png")
    elif case == "size":
        Image.new("L", (9, 8)).save(folder / "3b.png")
    elif case == "empty":
        pairs.write_text("\n")
    elif case == "ties":
        pairs.write_text(json.dumps({"prompt": "1", "chosen": "0a.png", "rejected": "0b.png", "tie": True}) + "\n")
    elif case == "badjson":
        pairs.write_text(pairs.read_text() + "{oops\n")
    elif case == "field":
        pairs.write_text(json.dumps({"prompt": "1", "chosen": "0a.png"}) + "\n")
    out = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError), match=match) as info:
        train.main(["--method", "dpo-npo", "--weights", str(digits_base), "--pairs", str(pairs), "--out", str(out),
                    "--steps", "2", *DIGITS_FAST])
    assert "\n" not in str(info.value)
    assert not any(out.iterdir()) if out.exists() else True


def test_reward_name_not_installed_is_one_line(digits_base, tmp_path):
    for name, match in (("nosuch", "unknown reward"), ("pickscore", "not installed"), ("digits-margin-judge", "not installed")):
        with pytest.raises(ValueError, match=match) as info:
            train.main(["--method", "reward-npo", "--weights", str(digits_base), "--out", str(tmp_path / name), "--steps", "1",
                        "--reward", name, "--reward-weights", str(tmp_path / "nothing"), *DIGITS_FAST])
        assert "\n" not in str(info.value) and not any((tmp_path / name).iterdir())


@pytest.mark.parametrize("method", ["reward-npo", "guided-reward-npo"])
def test_reward_trainers_digits(digits_base, tmp_path, method):
    """The shipped classifier's margin as reward, 2 steps, 3 sampling steps, K = 2: a LoRA that loads back."""
    out = tmp_path / method
    train.main(["--method", method, "--weights", str(digits_base), "--out", str(out), "--steps", "2", "--sample-steps", "3",
                "--reward-k", "2", *DIGITS_FAST])
    log = (out / "loss.csv").read_text().splitlines()
    assert len(log) == 3 and "reward" in log[0]
    pipe = load_pipeline("digits", str(digits_base))
    assert load_offset(out, pipe.denoiser.state_dict(), pipe.read_weights)
    with pytest.raises(SystemExit):
        train.parse_args(["--method", method, "--pairs", "x.jsonl"])


def test_reward_npo_gradient_only_through_last_k_steps():
    from npo_min.diffusion_npo import last_k_with_grad

    calls = []
    f = last_k_with_grad(lambda x, t: calls.append(torch.is_grad_enabled()) or x, num_steps=5, k=2)
    for i in range(5):
        f(torch.zeros(1), i)
    assert calls == [False, False, False, True, True]


def test_digits_margin_reward_is_differentiable_and_in_unit_interval():
    reward = rewards.load_reward("digits-margin")
    x = torch.zeros(4, 1, 8, 8, requires_grad=True)
    r = reward(x, ["0", "1", "2", "3"])
    r.sum().backward()
    assert r.shape == (4,) and ((r > 0) & (r < 1)).all() and x.grad.abs().sum() > 0


@pytest.fixture()
def aesthetic_weights(tmp_path, monkeypatch):
    """A tiny aesthetic scorer in weights/ layout (random CLIP + random head)."""
    cfg = tiny_config("quick_gelu", proj=768)
    hf_clip(cfg, seed=8).save_pretrained(tmp_path / "w" / "aesthetic" / "clip-vit-large-patch14")
    head = randomize_clip(scorers.RewardMLP(), seed=9)
    torch.save(head.state_dict(), tmp_path / "w" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    monkeypatch.setitem(scorers.PRESETS, "aesthetic", cfg)  # the real one is vit_l_14
    return tmp_path / "w"


def test_t2i_reward_tensor_path_matches_scorer(aesthetic_weights):
    """At 224 x 224 the tensor preprocessing is the scorer's PIL one: same score; and gradients reach the pixels."""
    reward = rewards.load_reward("aesthetic", aesthetic_weights)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    images = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays]).requires_grad_(True)
    pil = reward.scorer.score([Image.fromarray(a) for a in arrays], ["", ""])
    raw = reward.raw(images, ["", ""])
    assert torch.allclose(raw.detach(), pil, atol=1e-4), (raw, pil)
    reward(images, ["", ""]).sum().backward()
    assert images.grad.abs().sum() > 0


def test_sd15_dpo_npo_end_to_end(ckpt, tmp_path):  # noqa: F811
    """Tiny SD1.5 checkpoint, 64 px pairs: 2 CLI steps -> a LoRA on the attention projections that loads back."""
    pairs = write_pairs(tmp_path / "p", n=5, size=(64, 64), mode="RGB", prompts=["a cat", "a red car"])
    train.main(["--model", "sd15", "--weights", str(ckpt["folder"]), "--pairs", str(pairs), "--resolution", "64",
                "--method", "dpo-npo", "--no-progress", "--grad-accum", "1", "--out", str(tmp_path / "two"), "--steps", "2",
                "--batch-size", "2"])
    pipe = load_pipeline("sd15", str(ckpt["folder"]))
    delta = load_offset(tmp_path / "two", pipe.denoiser.state_dict(), pipe.read_weights)
    assert delta and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for k in delta)


@pytest.mark.slow
def test_sd15_dpo_npo_loss_decreases_on_a_fixed_set(ckpt, tmp_path):  # noqa: F811
    """20 steps of the trainer on 4 fixed 64 px pairs: the DPO-NPO loss on a fixed set of (t, eps) draws, log 2
    before training (model = reference), falls (measured 0.693 -> 0.600; ~30 s on 2 busy CPU cores)."""
    from npo_min.diffusion_npo import dpo_npo, frozen_reference
    from npo_min.dpo import dpo_step_loss
    from npo_min.lora import add_lora
    from npo_min.pairs import preference_batches

    pairs = write_pairs(tmp_path / "p", n=5, size=(64, 64), mode="RGB", prompts=["a cat", "a red car"])
    pipe = load_pipeline("sd15", str(ckpt["folder"]))
    batches = preference_batches(pipe, pairs, 4, torch.Generator().manual_seed(0), resolution=64, log=lambda _: None)
    fixed = next(batches)
    unet = pipe.denoiser
    add_lora(unet, rank=4)
    reference = frozen_reference(unet)

    def held_loss():
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(dpo_step_loss(unet, reference, *fixed, pipe.schedule, 500.0, True, g)[0].item() for _ in range(8)) / 8

    before = held_loss()
    dpo_npo(unet, iter(lambda: fixed, None), pipe.schedule, 500.0, reverse=True, steps=20, lr=1e-3,
            generator=torch.Generator().manual_seed(1), progress=False)
    after = held_loss()
    print(f"sd15 dpo-npo loss on fixed draws: {before:.4f} -> {after:.4f}")
    assert abs(before - math.log(2)) < 1e-6 and after < before - 0.05


def test_sd15_reward_npo_end_to_end(ckpt, aesthetic_weights, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red car\n")
    train.main(["--model", "sd15", "--weights", str(ckpt["folder"]), "--method", "reward-npo", "--reward", "aesthetic",
                "--reward-weights", str(aesthetic_weights), "--prompts", str(prompts), "--resolution", "64",
                "--out", str(tmp_path / "r"), "--steps", "2", "--batch-size", "2", "--grad-accum", "1",
                "--sample-steps", "2", "--no-progress"])
    pipe = load_pipeline("sd15", str(ckpt["folder"]))
    assert load_offset(tmp_path / "r", pipe.denoiser.state_dict(), pipe.read_weights)
    assert "reward" in (tmp_path / "r" / "loss.csv").read_text().splitlines()[0]


def test_ddim_with_grad_matches_the_sampler():
    """Without gradients ddim_with_grad is npo_min.solvers' DDIM; with them, only the last K steps carry any."""
    from npo_min.diffusion_npo import ddim_with_grad
    from npo_min.schedule import NoiseSchedule
    from npo_min.solvers import sample

    schedule, w = NoiseSchedule.sd(), torch.tensor(0.3, requires_grad=True)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    denoise = lambda x, t: w * x + 0.01 * t.float().reshape(-1, 1, 1, 1) / 1000  # (B,) -> (B, 1, 1, 1)
    want = sample(denoise, noise, 6, schedule, "ddim", "trailing")
    got = ddim_with_grad(denoise, noise, 6, 2, schedule)
    assert torch.allclose(got.detach(), want, atol=1e-5) and got.requires_grad
    got.sum().backward()
    assert w.grad is not None and w.grad.abs() > 0


def test_ddim_with_grad_v_prediction_matches_the_sampler():
    """v-prediction on CogVideoX's zero-terminal-SNR schedule (alpha_T = 0, final alpha 1): ddim_with_grad is
    npo_min.solvers' DDIM with prediction_type v_prediction and set_alpha_to_one."""
    from npo_min.diffusion_npo import ddim_with_grad
    from npo_min.schedule import NoiseSchedule
    from npo_min.solvers import sample

    schedule, w = NoiseSchedule.cogvideox(3.0), torch.tensor(0.3, requires_grad=True)
    noise = torch.randn(2, 3, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # (B, F, C, h, w)
    denoise = lambda x, t: w * x + 0.01 * t.float().reshape(-1, 1, 1, 1, 1) / 1000  # (B,) -> (B, 1, 1, 1, 1)
    want = sample(denoise, noise, 6, schedule, "ddim", "trailing", prediction_type="v_prediction", set_alpha_to_one=True)
    got = ddim_with_grad(denoise, noise, 6, 1, schedule, prediction_type="v_prediction", set_alpha_to_one=True)
    assert torch.isfinite(got).all() and torch.allclose(got.detach(), want, atol=1e-5), (got - want).abs().max()
    eps_form = ddim_with_grad(denoise, noise, 6, 1, schedule, set_alpha_to_one=True)
    assert not torch.isfinite(eps_form).all() or (eps_form - want).abs().max() > 1e-3  # the eps algebra is not v's


class Killed(BaseException):
    """Stands for SIGKILL: the process ends right after a resume checkpoint is written (nothing else runs)."""


@pytest.mark.parametrize("method,rank", [("dpo-npo", 2), ("dpo-npo", 0), ("reward-npo", 2)])
def test_killed_then_resumed_is_bitwise_equal(digits_base, tmp_path, monkeypatch, method, rank):
    """A Diffusion-NPO run stopped after step 3 (in-process: the save raises, as a kill right after it) and
    continued with --resume writes the LoRA / delta and loss log of the uninterrupted run, bit for bit."""
    from safetensors.torch import load_file

    from npo_min import cli

    extra = ["--pairs", str(write_pairs(tmp_path / "p"))] if method == "dpo-npo" else ["--reward-k", "1", "--sample-steps", "3"]
    flags = lambda out, *more: ["--method", method, "--weights", str(digits_base), "--out", str(out), "--steps", "5",  # noqa: E731
                                "--no-progress", "--batch-size", "4", "--lora-rank", str(rank), "--save-every", "1",
                                "--seed", "3", "--lr", "1e-2", *extra, *more]
    name = LORA_FILE if rank else "delta.safetensors"
    train.main(flags(tmp_path / "ref"))
    assert not (tmp_path / "ref" / "resume.pt").exists()  # a finished run leaves only its results
    save = cli.save_resume

    def save_then_die(path, state):
        save(path, state)
        if state["step"] == 3:
            raise Killed

    monkeypatch.setattr(cli, "save_resume", save_then_die)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train.main(flags(out))
    monkeypatch.setattr(cli, "save_resume", save)
    assert cli.load_resume(out / "resume.pt")["step"] == 3 and not (out / name).exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train.main(flags(out))  # a stopped run is never silently restarted
    with pytest.raises(ValueError, match="other flags"):
        train.main(flags(out, "--resume", "--dpo-beta", "7") if method == "dpo-npo" else flags(out, "--resume", "--reward-k", "2"))
    train.main(flags(out, "--resume"))
    got, want = load_file(out / name), load_file(tmp_path / "ref" / name)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(want[k].abs().max() > 0 for k in want)
    rows = lambda p: [r.rsplit(",", 1)[0] for r in (p / "loss.csv").read_text().splitlines()]  # noqa: E731  (no seconds)
    assert rows(out) == rows(tmp_path / "ref") and len(rows(out)) == 6
    assert not (out / "resume.pt").exists()


def test_ctrl_c_saves_the_step_and_says_how_to_resume(digits_base, tmp_path, monkeypatch):
    """Ctrl-C (the flag _interrupt_after_step sets, raised here after step 2) saves resume.pt at that step, ends
    with cli.Interrupted naming the --resume command, and --resume finishes to the uninterrupted LoRA."""
    import contextlib

    from safetensors.torch import load_file

    from npo_min import cli, diffusion_npo

    pairs = write_pairs(tmp_path / "p")
    flags = lambda out, *more: ["--method", "dpo-npo", "--weights", str(digits_base), "--out", str(out), "--steps", "4",  # noqa: E731
                                "--pairs", str(pairs), "--save-every", "100", "--lr", "1e-2", *DIGITS_FAST, *more]
    train.main(flags(tmp_path / "ref"))
    calls = []

    @contextlib.contextmanager
    def ctrl_c_after_step_2():
        yield lambda: calls.append(1) or len(calls) == 2

    monkeypatch.setattr(diffusion_npo, "_interrupt_after_step", ctrl_c_after_step_2)
    with pytest.raises(cli.Interrupted, match=r"saved step 2 of 4 .*--resume"):
        train.main(flags(tmp_path / "run"))  # --save-every 100 > --steps: only the Ctrl-C save
    monkeypatch.undo()
    train.main(flags(tmp_path / "run", "--resume"))
    got, want = load_file(tmp_path / "run" / LORA_FILE), load_file(tmp_path / "ref" / LORA_FILE)
    assert all(torch.equal(got[k], want[k]) for k in want)
