"""The digits CLIs end to end on a random digits model, and every bad input they must refuse."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
import train
from conftest import write_random_digits_base
from eval.benchmark import evaluate
from npo_min.checkpoint import CheckpointError, read_metadata, save_safetensors
from npo_min.offsets import save_delta
from npo_min.digits import build_digits_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random digits model in the shipped layout (keys unet.*, class_embedding.*)."""
    return write_random_digits_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(["--weights", str(base), "--out", str(out), "--steps", "2", "--batch-size", "4", "--no-progress"])
    return out


def test_train_writes_delta_with_metadata(trained, base):
    meta = read_metadata(trained / "delta.safetensors")
    assert meta["format"] == "npo_min.delta.v1"
    assert (meta["k"], meta["num_grid"], meta["rollout_w"], meta["steps"]) == ("5", "25", "-1.0", "2")
    for key in ("base", "base_fingerprint", "lr", "seed", "train_seconds", "batch_size"):
        assert key in meta
    assert (trained / "loss.csv").read_text().count("\n") == 3  # header + 2 steps


def test_sample_and_evaluate_run(trained, base, tmp_path):
    delta = str(trained / "delta.safetensors")
    sample.main(["--weights", str(base), "--neg-ckpt", delta, "--out", str(tmp_path / "s"), "--steps", "2", "--num-per-class", "1"])
    assert (tmp_path / "s" / "grid.png").exists()
    evaluate.main(["--weights", str(base), "--neg-ckpt", delta, "--out", str(tmp_path / "e"), "--steps", "2",
                   "--num-per-class", "2", "--guidance-scales", "2"])
    assert (tmp_path / "e" / "eval.json").exists()


def test_existing_out_is_not_overwritten(trained, base):
    before = (trained / "delta.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        train.main(["--weights", str(base), "--out", str(trained), "--steps", "1", "--no-progress"])
    assert (trained / "delta.safetensors").read_bytes() == before


def test_unwritable_out(base, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="writable --out"):
        train.main(["--weights", str(base), "--out", str(blocker / "sub"), "--steps", "1", "--no-progress"])


@pytest.mark.parametrize("k", ["0", "26"])
def test_k_out_of_range(base, tmp_path, k):
    with pytest.raises(ValueError, match="1..N = 25"):
        train.main(["--weights", str(base), "--out", str(tmp_path), "--k", k, "--no-progress"])


@pytest.mark.parametrize("flag", ["--steps", "--batch-size"])
def test_non_positive_counts(tmp_path, flag, capsys):
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), flag, "0"])
    assert f"{flag} must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--out", str(tmp_path), "--steps", "-1"])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        train.main(["--weights", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"])


def test_wrong_architecture_checkpoint(tmp_path):
    save_safetensors({"unet.conv_in.weight": torch.zeros(8, 3, 3, 3), "unet.extra": torch.zeros(1),
                      "class_embedding.embedding.weight": torch.zeros(11, 256)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        train.main(["--weights", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"])
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys (1)" in msg
    assert "extra" in msg and "conv_in.weight: checkpoint (8, 3, 3, 3)" in msg


def test_delta_for_another_base_shape(base, tmp_path):
    save_safetensors({"conv_in.weight": torch.zeros(64, 1, 3, 3)}, tmp_path / "delta.safetensors")
    with pytest.raises(CheckpointError, match="does not fit this base model"):
        sample.main(["--weights", str(base), "--neg-ckpt", str(tmp_path / "delta.safetensors"), "--out", str(tmp_path / "s")])


def test_delta_for_another_base_fingerprint(base, tmp_path):
    torch.manual_seed(1)
    other, _ = build_digits_model()  # same architecture, different weights
    sd = other.state_dict()
    save_delta(sd, sd, tmp_path / "delta.safetensors", {"base": "another digits model"})
    args = ["--weights", str(base), "--neg-ckpt", str(tmp_path / "delta.safetensors"), "--steps", "1", "--num-per-class", "1"]
    with pytest.raises(CheckpointError, match="fingerprint"):
        sample.main(args + ["--out", str(tmp_path / "a")])
    sample.main(args + ["--out", str(tmp_path / "b"), "--ignore-fingerprint"])  # the explicit override works


def test_cli_prints_clean_error(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--weights", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().startswith("error: digits model not found") and "Traceback" not in r.stderr
