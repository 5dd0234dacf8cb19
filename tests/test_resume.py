"""Resumable training: a run killed (SIGKILL, Ctrl-C) and resumed gives the delta of an uninterrupted run, bit for bit."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import write_random_digits_base
from npo_min import cli

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40  # a kill at steps 2..10 leaves 30+ steps: the run cannot finish between the poll and the SIGKILL


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_random_digits_base(tmp_path_factory.mktemp("base"))


def flags(base, out, *extra):
    # batch 4 < the digits train split, several epochs of data order are not needed: the order state is the point
    return ["--weights", str(base), "--out", str(out), "--steps", str(STEPS), "--batch-size", "4", "--k", "2",
            "--no-progress", "--save-every", "1", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the OMP_NUM_THREADS=1 subprocesses it is compared with, bit for bit
    try:
        train.main(flags(base, out))
    finally:
        torch.set_num_threads(threads)
    assert not (out / "resume.pt").exists()  # a finished run leaves only its results
    return load_file(out / "delta.safetensors")


def start(base, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "train.py", *flags(base, out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc, out, step, timeout=120):
    """Wait until resume.pt holds at least `step` (it is rewritten atomically every step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {proc.stderr.read()}")
        try:
            if (out / "resume.pt").is_file() and cli.load_resume(out / "resume.pt")["step"] >= step:
                return
        except Exception:  # noqa: BLE001 - a read racing the rename; try again
            pass
        time.sleep(0.05)
    pytest.fail(f"no resume checkpoint at step {step} within {timeout} s")


def assert_same(delta, reference):
    assert delta.keys() == reference.keys()
    for k in reference:
        assert torch.equal(delta[k], reference[k]), k  # bitwise: equal values, no tolerance


@pytest.mark.slow  # two train.py processes, about a minute on 2 shared cores
def test_sigkill_then_resume_is_bitwise_equal(base, reference, tmp_path):
    kill_at = random.Random().randint(2, 10)  # a random early step, printed on failure
    print("SIGKILL after step", kill_at)
    out = tmp_path / "run"
    proc = start(base, out)
    wait_for_step(proc, out, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "delta.safetensors").exists()
    (out / ".resume.pt.leftover.tmp").write_bytes(b"half a file")  # what a kill during a write leaves
    with pytest.raises(FileExistsError, match="--resume"):
        train.main(flags(base, out))  # a stopped run is never silently restarted
    train.main(flags(base, out, "--resume"))
    assert not (out / ".resume.pt.leftover.tmp").exists()
    assert_same(load_file(out / "delta.safetensors"), reference)
    assert (out / "loss.csv").read_text().count("\n") == STEPS + 1


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_saves_and_says_how_to_resume(base, reference, tmp_path):
    out = tmp_path / "run"
    proc = start(base, out)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: saved step" in err and "--resume" in err and "Traceback" not in err
    train.main(flags(base, out, "--resume"))
    assert_same(load_file(out / "delta.safetensors"), reference)


def test_resume_from_every_step_in_process(base, tmp_path):
    """The loop itself (fast, in-process): a state saved after step k, restored into fresh objects, continues
    to the same student as the uninterrupted run; the state survives save_resume / load_resume."""
    from npo_min import training
    from npo_min.pipelines import load_pipeline
    from npo_min.self_npo import SelfNPOConfig

    cfg = SelfNPOConfig(k=2)

    def run(resume=None, stop=None):
        torch.manual_seed(3)
        gen = torch.Generator().manual_seed(3)
        pipe = load_pipeline("digits", str(base))
        batches = pipe.self_npo_batches(None, 4, gen)
        states = {}
        save = lambda state: states.__setitem__(state["step"], state)  # noqa: E731
        unet = pipe.denoiser.requires_grad_(True)
        training.self_npo(unet, batches, pipe.null_cond(1), pipe.schedule, cfg, stop or 5, 1e-4, generator=gen,
                          progress=False, resume=resume, save=save, save_every=1)
        return unet.state_dict(), states

    full, states = run()
    path = tmp_path / "resume.pt"
    cli.save_resume(path, states[2])
    resumed, _ = run(resume=cli.load_resume(path))
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_resume_refuses_other_flags(base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cli.save_resume(out / "resume.pt", {"step": 1, "recipe": {"lr": 1e-4}})
    with pytest.raises(ValueError, match="other flags"):
        train.main(flags(base, out, "--resume", "--lr", "1e-3"))


def test_resume_checkpoint_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"step": 1, "x": Evil()}, tmp_path / "resume.pt")
    with pytest.raises(Exception, match="not a readable resume checkpoint"):
        cli.load_resume(tmp_path / "resume.pt")
