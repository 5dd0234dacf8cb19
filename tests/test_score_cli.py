"""`python -m eval.t2i.score`: the paired report on tiny random scorers written in their official layouts.

Weights go to tmp_path/weights under the default names (PickScore_v1/ and clip-vit-large-patch14/
as transformers save_pretrained folders, HPS_v2.1_compressed.pt as an OpenCLIP state dict under
'state_dict' with a `module.` prefix, the aesthetic head as a plain .pth state dict, a CLIP
tokenizer folder with a toy BPE); the scorer architectures (eval.t2i.scorers.PRESETS) are swapped for
tiny ones. The expected numbers are computed by calling the scorers directly and counting wins in
plain Python.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval.t2i import scorers
from eval.t2i.score import TITLES, main, match_prompts, parse_args, read_prompts
from test_scorers import hf_clip, hf_to_open_clip_by_hand, randomize_, real_image, tiny_config, write_toy_bpe

N = 6
PROMPTS = ["a cat", "the dog", "", "an astronaut riding a horse, oil painting", "the the the", "a cat and a dog"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Weights, two image folders (pair 0 identical -> a tie) and a prompt file; returns a namespace."""
    _, tok_dir, vocab = write_toy_bpe(tmp_path / "bpe")
    vit_h, vit_l = tiny_config("gelu", vocab=vocab), tiny_config("quick_gelu", vocab=vocab, proj=768)
    for name, cfg in (("pickscore", vit_h), ("hpsv21", vit_h), ("aesthetic", vit_l)):
        monkeypatch.setitem(scorers.PRESETS, name, cfg)
    w = tmp_path / "weights"
    hf_clip(vit_h, seed=1).save_pretrained(w / "pickscore")
    hps = hf_to_open_clip_by_hand(hf_clip(vit_h, seed=2).state_dict())
    (w / "hps").mkdir()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in hps.items()}}, w / "hps/HPS_v2.1_compressed.pt")
    hf_clip(vit_l, seed=4).save_pretrained(w / "aesthetic/clip-vit-large-patch14")
    torch.save(randomize_(scorers.RewardMLP(), seed=3).state_dict(), w / "aesthetic/sac+logos+ava1-l14-linearMSE.pth")
    shutil.copytree(tok_dir, w / "clip_tokenizer")  # the PickScore folder has no tokenizer files here
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i in range(N):
        size = [(96, 96), (128, 96), (96, 128)][i % 3]
        real_image(*size, seed=i).save(a / f"{i}.png")
        (real_image(*size, seed=i) if i == 0 else real_image(*size, seed=100 + i)).save(b / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    base = ["--a", str(a), "--b", str(b), "--prompts", str(tmp_path / "prompts.txt"), "--weights-dir", str(w),
            "--batch-size", "4", "--device", "cpu"]
    return types.SimpleNamespace(tmp=tmp_path, a=a, b=b, w=w, base=base, out=tmp_path / "report.json")


def expected_scores(env) -> dict[str, tuple[list[float], list[float]]]:
    w = env.w
    loaded = {
        "pickscore": scorers.PickScore.load(w / "pickscore", w / "clip_tokenizer"),
        "hpsv21": scorers.HPSv21.load(w / "hps/HPS_v2.1_compressed.pt", w / "clip_tokenizer"),
        "aesthetic": scorers.Aesthetic.load(w / "aesthetic/sac+logos+ava1-l14-linearMSE.pth",
                                            w / "aesthetic/clip-vit-large-patch14"),
    }
    out = {}
    for name, scorer in loaded.items():
        sides = [scorer.score([Image.open(d / f"{i}.png") for i in range(N)], PROMPTS).tolist() for d in (env.a, env.b)]
        out[name] = (sides[0], sides[1])
    return out


def test_report_table_json_and_csv(env, capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "eval.t2i.imagereward", raising=False)
    code = main(env.base + ["--scorers", "pickscore,hpsv21,aesthetic", "--out", str(env.out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "eval.t2i.imagereward" not in sys.modules  # imported only when asked for
    report = json.loads(env.out.read_text())
    assert report["n"] == N and report["pairing"] == "index"
    assert [im["name"] for im in report["images"]] == [f"{i}.png" for i in range(N)]
    assert [im["prompt"] for im in report["images"]] == PROMPTS
    for name, (a, b) in expected_scores(env).items():
        s = report["summary"][name]
        wins_a = sum(x > y for x, y in zip(a, b)) / N
        wins_b = sum(y > x for x, y in zip(a, b)) / N
        assert s["mean_a"] == pytest.approx(sum(a) / N, abs=1e-5) and s["mean_b"] == pytest.approx(sum(b) / N, abs=1e-5)
        assert (s["win_rate_a"], s["win_rate_b"]) == (wins_a, wins_b), name
        assert s["ties"] == 1 and s["win_rate_a"] + s["win_rate_b"] == pytest.approx(1 - 1 / N)  # pair 0 is identical
        assert [im[f"{name}_a"] for im in report["images"]] == pytest.approx(a, abs=1e-5)
        row = next(line for line in captured.out.splitlines() if line.startswith(TITLES[name]))
        assert f"{s['mean_a']:.4f}" in row and f"{s['mean_b']:.4f}" in row and f"{100 * wins_a:.1f}%" in row
    rows = list(csv.DictReader(env.out.with_suffix(".csv").open()))
    assert [r["scorer"] for r in rows] == ["pickscore", "hpsv21", "aesthetic"]
    assert float(rows[0]["win_rate_a"]) == report["summary"]["pickscore"]["win_rate_a"]


def test_imagereward_is_loaded_lazily_through_its_interface(env, capsys, monkeypatch):
    """score.py assumes only the Scorer interface: `ImageReward.load(path, device=, dtype=, batch_size=)` -> .score()."""
    calls = {}

    class Brightness:
        def score(self, images, prompts):
            return torch.tensor([sum(im.convert("L").getdata()) / (im.width * im.height) for im in images])

    class ImageReward:
        @classmethod
        def load(cls, path, *, device="cpu", dtype=torch.float32, batch_size=16, preset=None):
            calls.update(path=Path(path), device=device, dtype=dtype, batch_size=batch_size)
            return Brightness()

    fake = types.ModuleType("eval.t2i.imagereward")
    fake.ImageReward = ImageReward
    monkeypatch.setitem(sys.modules, "eval.t2i.imagereward", fake)
    (env.w / "imagereward").mkdir()
    assert main(env.base + ["--scorers", "imagereward", "--out", str(env.out)]) == 0, capsys.readouterr().err
    assert calls == {"path": env.w / "imagereward", "device": "cpu", "dtype": torch.float32, "batch_size": 4}
    s = json.loads(env.out.read_text())["summary"]["imagereward"]
    assert s["ties"] == 1 and "ImageReward" in capsys.readouterr().out


def run_error(env, capsys, extra) -> str:
    code = main(env.base + extra)
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_error_missing_pair(env, capsys):
    (env.b / "3.png").unlink()
    err = run_error(env, capsys, ["--scorers", "pickscore", "--out", str(env.out)])
    assert f"{env.a / '3.png'} has no pair" in err and not env.out.exists()
    (env.b / "extra.png").write_bytes((env.a / "3.png").read_bytes())
    (env.b / "3.png").write_bytes((env.a / "3.png").read_bytes())
    assert f"{env.b / 'extra.png'} has no pair" in run_error(env, capsys, ["--scorers", "pickscore"])


def test_error_prompt_count(env, capsys):
    short = env.tmp / "short.jsonl"
    short.write_text("\n".join(json.dumps({"caption": p}) for p in PROMPTS[:5]))
    err = run_error(env, capsys, ["--scorers", "pickscore", "--out", str(env.out), "--prompts", str(short)])
    assert "6 image pairs but 5 prompts" in err


def test_error_missing_weights(env, capsys):
    (env.w / "hps/HPS_v2.1_compressed.pt").unlink()
    err = run_error(env, capsys, ["--scorers", "pickscore,hpsv21", "--out", str(env.out)])
    assert f"{env.w / 'hps/HPS_v2.1_compressed.pt'} not found (HPSv2.1 weights)" in err and "--hps PATH" in err
    shutil.rmtree(env.w / "aesthetic/clip-vit-large-patch14")
    err = run_error(env, capsys, ["--scorers", "aesthetic", "--out", str(env.out)])
    assert "clip-vit-large-patch14 not found" in err and "openai/clip-vit-large-patch14" in err
    err = run_error(env, capsys, ["--scorers", "aesthetic", "--clip-l", str(env.tmp / "my-clip"), "--out", str(env.out)])
    assert f"{env.tmp / 'my-clip'} not found" in err
    shutil.rmtree(env.w / "clip_tokenizer")
    err = run_error(env, capsys, ["--scorers", "hpsv21", "--hps", str(env.w / "pickscore/model.safetensors")])
    assert "no CLIP tokenizer" in err and "clip_tokenizer" in err and "--clip-tokenizer PATH" in err
    for name in ("vocab.json", "merges.txt"):  # the layout of weights/README.md: tokenizer files in the PickScore folder
        shutil.copy(env.tmp / "bpe/tokenizer" / name, env.w / "pickscore" / name)
    assert main(env.base + ["--scorers", "pickscore", "--out", str(env.out)]) == 0


def test_error_existing_out_and_overwrite(env, capsys):
    env.out.write_text("{}")
    err = run_error(env, capsys, ["--scorers", "aesthetic", "--out", str(env.out)])
    assert "already exists" in err and "--overwrite" in err and env.out.read_text() == "{}"
    env.out.unlink()
    env.out.with_suffix(".csv").write_text("old")
    assert "report.csv already exists" in run_error(env, capsys, ["--scorers", "aesthetic", "--out", str(env.out)])
    assert main(env.base + ["--scorers", "aesthetic", "--out", str(env.out), "--overwrite"]) == 0
    assert json.loads(env.out.read_text())["summary"]["aesthetic"]["n"] == N
    assert env.out.with_suffix(".csv").read_text().startswith("scorer,")
    assert "unknown scorer" in run_error(env, capsys, ["--scorers", "clipscore", "--overwrite", "--out", str(env.out)])


# ---------------------------------------------------------------------------------------------- pairing rules


def test_read_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\nb, c\n\n")
    assert read_prompts(tmp_path / "p.txt") == ["a", "", "b, c"]  # inner blank lines count, trailing ones do not
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"caption": "b", "id": 3}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "p.csv").write_text('id,caption\n1,"x, y"\n2,z\n')
    assert read_prompts(tmp_path / "p.csv") == ["x, y", "z"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no 'prompt' or 'caption'"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "p.md").write_text("a")
    with pytest.raises(ValueError, match="unknown prompt file type"):
        read_prompts(tmp_path / "p.md")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompts(tmp_path / "nope.txt")


def test_match_prompts_rules():
    prompts = [f"p{i}" for i in range(12)]
    names = [f"{i}.png" for i in range(12)]  # "10.png" sorts before "2.png": the index decides
    ordered, got, rule = match_prompts(sorted(names), prompts)
    assert rule == "index" and ordered == names and got == prompts
    named = [f"img_{c}.png" for c in "abc"]
    assert match_prompts(list(reversed(named)), ["x", "y", "z"]) == (named, ["x", "y", "z"], "sorted")
    with pytest.raises(ValueError, match="3 image pairs but 2 prompts"):
        match_prompts(named, ["x", "y"])
    with pytest.raises(ValueError, match="0001_s1.png and 1_s2.png both claim prompt index 1"):
        match_prompts(["0001_s1.png", "1_s2.png", "2.png"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="7.png: prompt index 7 is out of range for 3 prompts"):
        match_prompts(["0.png", "1.png", "7.png"], ["x", "y", "z"])


# ---------------------------------------------------------------------------------------------- any working directory

REPO = Path(__file__).resolve().parents[1]


def run_module(args: list[str], cwd: Path):
    """`python -m eval.t2i.score ARGS` in a fresh interpreter, from cwd, with only the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "eval.t2i.score", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_entry_point_runs_from_any_working_directory(tmp_path):
    assert not (tmp_path / "eval").exists() and not (tmp_path / "weights").exists()
    done = run_module(["--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "python -m eval.t2i.score" in done.stdout and "--weights-dir" in done.stdout
    # bad input: one image pair, two prompts -> the one-line error, exit code 2, nothing written
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        real_image(32, 32, seed=0).save(tmp_path / side / "0.png")
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    done = run_module(["--a", "a", "--b", "b", "--prompts", "p.txt", "--scorers", "aesthetic"], tmp_path)
    assert done.returncode == 2 and "error: 1 image pairs but 2 prompts" in done.stderr, done.stderr
    assert not (tmp_path / "report.json").exists()


def test_default_weights_dir_is_the_repositorys(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--a", "a", "--b", "b", "--prompts", "p.txt"])
    assert Path(args.weights_dir) == REPO / "weights" and Path(args.weights_dir).is_absolute()
    from eval.t2i.imagereward import DEFAULT_DIR  # noqa: PLC0415  (test_report_table_json_and_csv wants it unimported)
    assert DEFAULT_DIR == REPO / "weights" / "imagereward"
