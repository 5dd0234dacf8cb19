"""The fashion model: IDX reading, the data split, the preset, pretraining with snapshots, the pipeline, and a smoke
run of `eval.results --model fashion` (tiny random models, a few synthetic images, the shipped classifier)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from npo_min import training
from npo_min.checkpoint import read_metadata, save_safetensors
from npo_min.fashion import CLASS_NAMES, DEFAULT_DIR, build_fashion_model, load_fashion, read_idx
from npo_min.pipelines import load_pipeline
from npo_min.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of a uint8 array (the format read_idx reads), gzipped if the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def fake_fashion(folder: Path, n_train: int = 64, n_test: int = 40, seed: int = 0) -> Path:
    """A Fashion-MNIST-shaped folder: random 28x28 images, labels cycling 0..9 (gz train, plain test)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, suffix in (("train", n_train, ".gz"), ("t10k", n_test, "")):
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)
    return folder


def test_read_idx_roundtrip_and_refusals(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, a)
        got = read_idx(tmp_path / name)
        assert got.shape == (2, 3, 4) and got.dtype == np.uint8 and (got == a).all()
    (tmp_path / "short").write_bytes((tmp_path / "a.idx").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "png")


def test_load_fashion_split_and_range(tmp_path, monkeypatch):
    monkeypatch.setenv("NPO_FASHION_DIR", str(fake_fashion(tmp_path / "f")))
    x, y = load_fashion("train")
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.99 and x.max() > 0.99
    assert y.tolist() == [i % 10 for i in range(64)]
    assert load_fashion("test")[0].shape == (40, 1, 28, 28)  # read from uncompressed files
    with pytest.raises(ValueError, match="unknown split"):
        load_fashion("validation")
    monkeypatch.setenv("NPO_FASHION_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion("train")


@pytest.mark.skipif(not DEFAULT_DIR.is_dir(), reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
def test_real_fashion_mnist_split(monkeypatch):
    monkeypatch.delenv("NPO_FASHION_DIR", raising=False)
    (x, y), (xt, yt) = load_fashion("train"), load_fashion("test")
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    assert -1 <= x.min() < x.max() <= 1


def test_fashion_preset_size_and_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("NPO_FASHION_DIR", str(fake_fashion(tmp_path / "f")))
    torch.manual_seed(0)
    unet, embed = build_fashion_model()
    n = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in embed.parameters())
    assert 0.95e6 < n < 1.05e6, n
    sd = {**{f"unet.{k}": v for k, v in unet.state_dict().items()}, **{f"class_embedding.{k}": v for k, v in embed.state_dict().items()}}
    save_safetensors(sd, tmp_path / "m" / "model.safetensors")
    pipe = load_pipeline("fashion", tmp_path / "m")
    assert pipe.class_names == CLASS_NAMES and pipe.labels(["Sneaker", " Bag"]).tolist() == [7, 8]
    with pytest.raises(ValueError, match="class names"):
        pipe.encode(["7"])
    assert pipe.noise(2, 0, 28, 28).shape == (2, 1, 28, 28)
    x0, cond = next(pipe.self_npo_batches(None, 8, torch.Generator().manual_seed(0)))
    assert x0.shape == (8, 1, 28, 28) and cond.shape == (8, 4, 64)
    with torch.no_grad():
        assert pipe.denoiser(x0, torch.tensor([10] * 8), cond).shape == (8, 1, 28, 28)


def test_pretrain_snapshots_do_not_change_the_run():
    def run(**snap):
        torch.manual_seed(0)
        unet, embed = build_fashion_model()
        images, labels = torch.rand(16, 1, 28, 28) * 2 - 1, torch.arange(16) % 10
        return training.pretrain(unet, embed, images, labels, 10, NoiseSchedule.sd(), 3, batch_size=8, ema_rate=0.5,
                                 generator=torch.Generator().manual_seed(0), progress=False, **snap)[0]

    seen = {}
    with_snaps = run(snapshot_steps=(1, 2), on_snapshot=lambda step, ema, log: seen.update({step: (ema, len(log))}))
    plain = run()
    assert sorted(seen) == [1, 2] and [seen[s][1] for s in (1, 2)] == [1, 2]
    assert all(torch.equal(with_snaps[k], plain[k]) for k in plain)
    key = "unet.conv_in.weight"
    assert not torch.equal(seen[1][0][key], seen[2][0][key]) and not torch.equal(seen[2][0][key], plain[key])
    with pytest.raises(ValueError, match="snapshot steps"):
        run(snapshot_steps=(4,))


def test_train_cli_pretrain_writes_run_and_snapshots(tmp_path):
    env = {**os.environ, "NPO_FASHION_DIR": str(fake_fashion(tmp_path / "f")), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "w" / "fashion"
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", "fashion", "--method", "pretrain", "--steps", "10",
           "--batch-size", "8", "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for folder, step in ((out, 10), (out.with_name("fashion-10pct"), 1), (out.with_name("fashion-30pct"), 3)):
        meta = read_metadata(folder / "model.safetensors")
        assert meta["steps"] == str(step) and meta["ema_rate"] == "0.995" and meta["threads"] == "1"
        assert json.loads((folder / "args.json").read_text())["model"] == "fashion"
        assert len((folder / "loss.csv").read_text().splitlines()) == step + 1
        load_pipeline("fashion", folder)  # each one loads as a model
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)  # outputs exist: refused before any work
    assert r.returncode != 0 and "already exists" in r.stderr and "Traceback" not in r.stderr


CLASSIFIER = ROOT / "weights" / "fashion_classifier"


def test_results_smoke(tmp_path, monkeypatch):
    """`eval.results --model fashion` end to end on a few samples: Self-NPO, random-norm and autoguidance rows."""
    if not (CLASSIFIER / "model.safetensors").exists():
        pytest.fail(f"{CLASSIFIER} missing: run `python -m eval.benchmark.classifier --model fashion`.")
    from eval.benchmark import results

    monkeypatch.setenv("NPO_FASHION_DIR", str(fake_fashion(tmp_path / "f")))
    for name, seed in (("base", 0), ("weak", 1)):
        torch.manual_seed(seed)
        unet, embed = build_fashion_model()
        sd = {**{f"unet.{k}": v for k, v in unet.state_dict().items()}, **{f"class_embedding.{k}": v for k, v in embed.state_dict().items()}}
        save_safetensors(sd, tmp_path / name / "model.safetensors")
    out = tmp_path / "r"
    results.main(["--model", "fashion", "--weights", str(tmp_path / "base"), "--out", str(out), "--no-full",
                  "--autoguide", str(tmp_path / "weak"), "--common", "--no-progress --steps 1 --batch-size 4",
                  "--guidance-scales", "2,3", "--num-per-class", "1", "--train-seeds", "2", "--pairs-per-class", "2",
                  "--n-boot", "5"])
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    assert [r["method"] for r in rows if r["guidance_scale"] == 2] == [
        "cfg", "self-npo-k5", "random-norm", "self-npo-k5-seed1", "random-norm-seed1", "dpo-npo", "dpo-npo-seed1",
        "autoguide-weak"]
    for r in rows:
        assert r["n"] == 10 and np.isfinite(r["fd"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert report["metadata"]["self-npo-k5-seed1"]["seed"] == "1" and report["metadata"]["dpo-npo"]["method"] == "dpo-npo"
    assert len((out / "pairs" / "pairs.jsonl").read_text().splitlines()) == 20  # 2 pairs x 10 classes
    gaps = {(g["family"], g["baseline"], g["measure"], g["guidance_scale"]): g for g in report["gaps"]}
    assert set(gaps) == {(f, b, m, s) for f in ("self-npo-k5", "random-norm", "dpo-npo") for b in ("cfg", "autoguide-weak")
                         for m in ("margin", "fd") for s in (2.0, 3.0)}
    assert all(g["seeds"] == 2 for g in gaps.values())
    assert "FD gain at equal margin against cfg" in (out / "results.md").read_text()
    assert (out / "curves.png").exists() and (out / "curves_accuracy.png").exists()
    shift = {(r["method"], r["t"]): r["shift"] for r in report["shift"]}
    assert len(shift) == 8 * 5 and all(shift["cfg", t] == 0 for t in (100, 300, 500, 700, 900))
    assert all(shift[m, t] > 0 for m in ("self-npo-k5", "random-norm", "autoguide-weak", "dpo-npo") for t in (100, 900))


def test_map_reads_reports_and_names_missing_bases(tmp_path):
    from eval.benchmark import map as bench_map

    rows = lambda wins: [{"method": m, "guidance_scale": s, "win_vs_cfg": None if m == "cfg" else w, "n": 100,
                          "fd": 10.0 * s, "margin": s + (m != "cfg") * (0.5 if s == 3.0 else 0.0)}
                         for s, w in zip((1.5, 3.0), wins) for m in ("cfg", "self-npo-k5", "random-norm")]
    gaps = [{"family": "self-npo-k5", "baseline": "cfg", "guidance_scale": s, "gap": g, "se": 0.1}
            for s, g in ((1.5, -0.2), (3.0, 0.3))]
    for folder, wins in (("fashion", (0.51, 0.35)), ("digits", (0.376, 0.31))):
        (tmp_path / folder).mkdir()
        report = {"rows": rows(wins)} | ({"gaps": gaps} if folder == "fashion" else {})
        (tmp_path / folder / "results.json").write_text(json.dumps(report))
    bench_map.main(["--reports", str(tmp_path)])
    md = (tmp_path / "map.md").read_text()
    # fashion: the report's gaps with their SE; digits (no "gaps"): the point gap from the rows (same FD, +0.5 at 3)
    assert "| fashion, shipped (n=100) | 1.5 / 51.0% / -0.20 ± 0.10 | 3 / 35.0% / +0.30 ± 0.10 |" in md
    assert "| digits, shipped (n=100) | 1.5 / 37.6% / +0.00 | 3 / 31.0% / +0.50 |" in md
    assert "Not measured: fashion, 10% base, fashion, 30% base" in md
    assert (tmp_path / "map.png").stat().st_size > 0 and (tmp_path / "map_gap.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="run `python -m eval.results` first"):
        bench_map.main(["--reports", str(tmp_path / "none")])


def test_map_shift_vs_gap_rank_correlation():
    from eval.benchmark.map import shift_vs_gap

    shift = [{"method": m, "t": t, "shift": s} for m, s in (("cfg", 0.0), ("a", 0.01), ("a-seed1", 0.03), ("b", 0.05),
                                                             ("c", 0.09), ("autoguide-x", 0.5)) for t in (100, 900)]
    gaps = [{"family": f, "baseline": "cfg", "measure": "margin", "guidance_scale": 2.0, "gap": g}
            for f, g in (("a", 0.1), ("b", -0.5), ("c", -1.0))]
    rows, rho = shift_vs_gap({"shift": shift, "gaps": gaps})
    assert [r[0] for r in rows] == ["a", "b", "c"] and rows[0][1] == pytest.approx(0.02)  # seeds averaged
    assert rho == pytest.approx(-1.0)  # the further the negative moves, the lower the gap
    rows, rho = shift_vs_gap({"shift": shift, "gaps": [dict(g, gap=-g["gap"]) for g in gaps]})
    assert rho == pytest.approx(1.0)
