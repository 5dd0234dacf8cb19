"""Every bad input the CLIs must refuse: one row per case, each asserting the exit code and the one-line message.

The CLIs run in-process through npo_min.cli.run (what `python train.py ...` runs), so a row costs
milliseconds unless it trains. Add a row with every new flag or refusal.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sample
import train
from eval.benchmark import evaluate
from npo_min import cli
from npo_min.checkpoint import CheckpointError, save_safetensors
from npo_min.digits import build_digits_model
from npo_min.offsets import FORMAT, fingerprint, load_offset
from npo_min.unet import unet_config_from_diffusers

ROOT = Path(__file__).resolve().parent.parent
CLIS = {"train": train.main, "sample": sample.main, "evaluate": evaluate.main}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random digits base model and broken / unusual files next to it; {name: path}."""
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    unet, embed = build_digits_model()
    sd = {f"unet.{k}": v for k, v in unet.state_dict().items()} | {f"class_embedding.{k}": v for k, v in embed.state_dict().items()}
    (d / "base").mkdir()
    save_safetensors(sd, d / "base" / "model.safetensors")
    base = unet.state_dict()
    f = {"base": d / "base", "dir": d}
    # broken weights files
    (d / "empty").mkdir()
    (d / "empty" / "model.safetensors").write_bytes(b"")
    (d / "text").mkdir()
    (d / "text" / "model.safetensors").write_text("this is not a safetensors file")
    (d / "trunc").mkdir()
    raw = (d / "base" / "model.safetensors").read_bytes()
    (d / "trunc" / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "nanbase").mkdir()
    bad = dict(sd)
    bad["unet.conv_in.weight"] = bad["unet.conv_in.weight"].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    save_file(bad, d / "nanbase" / "model.safetensors")  # save_file: our own writer refuses NaN
    # offsets
    meta = {"format": FORMAT, "base_fingerprint": fingerprint(base), "base": "test"}
    nan_delta = {k: torch.zeros_like(v) for k, v in base.items()}
    nan_delta["conv_in.weight"][0, 0, 0, 0] = float("inf")
    save_file(nan_delta, d / "nan_delta.safetensors", metadata=meta)
    g = torch.Generator().manual_seed(0)
    save_file({k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}, d / "stripped.safetensors")
    save_file({}, d / "empty_delta.safetensors", metadata=meta)
    raw = (d / "stripped.safetensors").read_bytes()
    (d / "trunc_delta.safetensors").write_bytes(raw[: len(raw) // 3])
    # a training folder (as train.py leaves it), a finished eval, data folders
    (d / "run").mkdir()
    (d / "run" / "args.json").write_text(json.dumps({"script": "train.py", "steps": 2}))
    (d / "eval").mkdir()
    (d / "eval" / "eval.json").write_text("{}")
    (d / "killed").mkdir()
    (d / "killed" / "resume.pt").write_bytes(b"")
    (d / "data").mkdir()
    (d / "data" / "a.png").write_bytes(b"")  # no caption
    (d / "prompts.txt").write_text("3\n7\n")
    (d / "clips").mkdir()
    (d / "clips" / "a.mp4").write_bytes(b"\x00" * 16)  # a video container: no decoder here
    (d / "cat.txt").write_text("a cat\n")
    return f


def arg(value: str, f: dict) -> str:
    return value.format(**{k: str(v) for k, v in f.items()})


T = "--weights {base} --out {dir}/o --steps 2 --batch-size 4 --no-progress"  # a train.py run that would work
S = "--weights {base} --neg-ckpt {dir}/stripped.safetensors --trust-delta --out {dir}/s --steps 1"
E = "--weights {base} --neg-ckpt {dir}/stripped.safetensors --trust-delta --out {dir}/e --steps 1 --num-per-class 1"

# (id, cli, argv, exit code, message part)
CASES = [
    # train.py: flags without meaning for their value
    ("huber-c nan", "train", T + " --huber-c nan", 2, "--huber-c must be a finite number"),
    ("huber-c 0", "train", T + " --huber-c 0", 2, "--huber-c must be in (0, inf]"),
    ("huber-c negative", "train", T + " --huber-c -1", 2, "--huber-c must be in (0, inf]"),
    ("rollout-w nan", "train", T + " --rollout-w nan", 2, "--rollout-w must be a finite number"),
    ("rollout-w inf", "train", T + " --rollout-w inf", 2, "--rollout-w must be a finite number"),
    ("ema above 1", "train", T + " --ema 1.5", 2, "--ema must be in [0, 1]"),
    ("cond-drop 2", "train", T + " --cond-drop 2", 2, "--cond-drop must be in [0, 1]"),
    ("lr nan", "train", T + " --lr nan", 2, "--lr must be > 0"),
    ("lr inf", "train", T + " --lr inf", 2, "--lr must be a finite number"),
    ("lr 0", "train", T + " --lr 0", 2, "--lr must be > 0"),
    ("grad-clip 0", "train", T + " --grad-clip 0", 2, "--grad-clip must be in (0, inf]"),
    ("weight-decay negative", "train", T + " --weight-decay -1", 2, "--weight-decay must be in [0, inf]"),
    ("save-every negative", "train", T + " --save-every -1", 2, "--save-every must be in [0, inf]"),
    ("steps 0", "train", T + " --steps 0", 2, "--steps must be >= 1"),
    ("k 0", "train", T + " --k 0", 2, "1..N = 25"),
    # train.py: flags that do not apply
    ("digits --data", "train", T + " --data {dir}/data", 2, "--data does not apply"),
    ("digits --resolution", "train", T + " --resolution 256", 2, "--resolution does not apply"),
    ("pretrain --k", "train", "--method pretrain --out {dir}/p --k 3", 2, "--k does not apply"),
    ("pretrain --weights", "train", "--method pretrain --out {dir}/p --weights {base}", 2, "--weights does not apply"),
    ("sd15 without --weights", "train", "--model sd15 --out {dir}/q", 2, "--model sd15 needs --weights"),
    ("sd15 images without captions", "train", "--model sd15 --weights {base} --data {dir}/data --out {dir}/q", 2,
     "have no same-name .txt caption"),
    ("sd15 without --data", "train", "--model sd15 --weights {base} --out {dir}/q", 2, "--model sd15 needs --data DIR"),
    ("sd15 --data missing", "train", "--model sd15 --weights {base} --data {dir}/nope --out {dir}/q", 2, "is not a folder"),
    ("dpo-npo without --pairs", "train", T + " --method dpo-npo", 2, "--method dpo-npo needs --pairs"),
    ("--pairs with reward-npo", "train", T + " --method reward-npo --pairs {dir}/p.jsonl", 2, "--pairs is for --method dpo-npo"),
    ("--resume of a dpo-npo run that never saved", "train", T + " --method dpo-npo --pairs {dir}/p.jsonl --resume", 2, "resume.pt (a run writes it every --save-every steps). Start without --resume"),
    # train.py: weights files
    ("weights missing", "train", T.replace("{base}", "{dir}/nope"), 2, "not found"),
    ("weights empty file", "train", T.replace("{base}", "{dir}/empty"), 2, "empty/model.safetensors is not a readable .safetensors"),
    ("weights not safetensors", "train", T.replace("{base}", "{dir}/text"), 2, "text/model.safetensors is not a readable"),
    ("weights truncated", "train", T.replace("{base}", "{dir}/trunc"), 2, "trunc/model.safetensors"),
    ("weights with NaN", "train", T.replace("{base}", "{dir}/nanbase"), 2, "'conv_in.weight' holds 9 NaN / Inf values"),
    # train.py: outputs and resume
    ("out in shipped weights", "train", T.replace("{dir}/o", str(ROOT / "weights" / "digits")), 2, "shipped weights/ folder"),
    ("out with a stopped run", "train", T.replace("{dir}/o", "{dir}/killed"), 2, "--resume"),
    ("resume without checkpoint", "train", T + " --resume", 2, "no " ),
    ("resume unreadable checkpoint", "train", T.replace("{dir}/o", "{dir}/killed") + " --resume", 2,
     "not a readable resume checkpoint"),
    ("out over a train.py record", "sample", S.replace("{dir}/s", "{dir}/run") + " --overwrite", 2, "record of a train.py run"),
    # sample.py
    ("guidance-scale nan", "sample", S + " --guidance-scale nan", 2, "--guidance-scale must be a finite number"),
    ("beta inf", "sample", S + " --beta inf", 2, "--beta must be a finite number"),
    ("alpha nan", "sample", S + " --alpha nan", 2, "--alpha must be a finite number"),
    ("height 0", "sample", S + " --height 0", 2, "--height must be >= 1"),
    ("width negative", "sample", S + " --width -8", 2, "--width must be >= 1"),
    ("no offset", "sample", "--weights {base} --out {dir}/s", 2, "nothing to compare"),
    ("neg-ckpt missing", "sample", S.replace("{dir}/stripped", "{dir}/nope"), 2, "not found"),
    ("neg-ckpt NaN", "sample", S.replace("stripped", "nan_delta"), 2, "'conv_in.weight' holds 1 NaN / Inf values"),
    ("neg-ckpt stripped metadata", "sample", S.replace(" --trust-delta", ""), 2, "Pass --trust-delta"),
    ("neg-ckpt truncated", "sample", S.replace("stripped", "trunc_delta"), 2, "trunc_delta.safetensors"),
    ("prompts missing", "sample", S + " --prompts {dir}/nope.txt", 2, "not found"),
    ("prompts not class names", "sample", S + " --prompts {dir}/cat.txt", 2, "class names 0..9"),
    ("num-per-class with prompts", "sample", S + " --prompts {dir}/prompts.txt --num-per-class 3", 2,
     "--num-per-class does not apply"),
    ("sample sd15 without --weights", "sample", "--model sd15 --neg-ckpt x --out {dir}/s", 2, "--model sd15 needs --weights"),
    ("sample into shipped weights", "sample", S.replace("{dir}/s", str(ROOT / "weights" / "digits")), 2, "shipped weights/"),
    # cogvideox (video): frames, sizes, clips, weights folder
    ("cogvideox frames not 4k+1", "train", "--model cogvideox --weights {dir} --out {dir}/c --num-frames 10", 2, "is not 4k + 1"),
    ("sample cogvideox frames not 4k+1", "sample", "--model cogvideox --weights {dir} --neg-ckpt x --out {dir}/c --num-frames 12", 2,
     "is not 4k + 1"),
    ("cogvideox bad resolution", "train", "--model cogvideox --weights {dir} --out {dir}/c --resolution 480by720", 2,
     "--resolution must be N or HxW"),
    ("cogvideox without --weights", "train", "--model cogvideox --out {dir}/c", 2, "--model cogvideox needs --weights"),
    ("cogvideox mp4 clips", "train", "--model cogvideox --weights {dir} --data {dir}/clips --out {dir}/c", 2, "no video decoder"),
    ("cogvideox weights a file", "sample", "--model cogvideox --weights {base}/model.safetensors --neg-ckpt x "
     "--prompts {dir}/cat.txt --out {dir}/c", 2, "is not a folder"),
    ("cogvideox folder without parts", "sample", "--model cogvideox --weights {base} --neg-ckpt x --prompts {dir}/cat.txt --out {dir}/c",
     2, "lacks transformer/"),
    ("digits --num-frames", "train", T + " --num-frames 9", 2, "for video models"),
    ("sample digits --num-frames", "sample", S + " --num-frames 9", 2, "--num-frames is for video models"),
    # eval.benchmark.evaluate
    ("eval scales not numbers", "evaluate", E + " --guidance-scales 1,x", 2, "comma-separated numbers"),
    ("eval scales nan", "evaluate", E + " --guidance-scales 2,nan", 2, "--guidance-scales must be finite"),
    ("eval beta nan", "evaluate", E + " --beta nan", 2, "--beta must be a finite number"),
    ("eval NaN delta", "evaluate", E.replace("stripped", "nan_delta"), 2, "'conv_in.weight' holds 1 NaN / Inf values"),
    ("eval existing output", "evaluate", E.replace("{dir}/e", "{dir}/eval"), 2, "--overwrite"),
]


@pytest.mark.parametrize("name,script,argv,code,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(files, capsys, name, script, argv, code, message):
    with pytest.raises(SystemExit) as e:
        cli.run(CLIS[script], arg(argv, files).split())
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert message in err, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("error:", f"{Path(script).stem}", "usage:")) or "error:" in last


def test_table_is_big_enough():
    assert len(CASES) >= 30


def test_shipped_weights_untouched_by_refusals():
    shipped = ROOT / "weights" / "digits"
    assert sorted(p.name for p in shipped.iterdir()) == ["args.json", "config.json", "loss.csv", "model.safetensors"]


def test_divergence_stops_at_its_step(files, tmp_path, capsys):
    """--lr 1e10 diverges: the run stops at the first non-finite loss / gradient, naming the step; nothing is written."""
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, arg(T, files).replace(f"{files['dir']}/o", str(out)).split()
                + ["--lr", "1e10", "--steps", "20", "--save-every", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "training diverged at step" in err and "Nothing was written" in err
    assert not (out / "delta.safetensors").exists() and not (out / "loss.csv").exists()
    # the last good checkpoint is kept: the step before the divergence, every tensor finite
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    assert f"last good state is in {out / 'resume.pt'}" in err
    state = cli.load_resume(out / "resume.pt")
    assert state["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def test_nan_is_never_saved(tmp_path):
    with pytest.raises(CheckpointError, match="NaN / Inf"):
        save_safetensors({"w": torch.tensor([1.0, math.nan])}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_empty_delta_warns(files):
    unet, _ = build_digits_model()
    with pytest.warns(UserWarning, match="empty offset"):
        assert load_offset(files["dir"] / "empty_delta.safetensors", unet.state_dict(), check_fingerprint=False) == {}


def test_stripped_delta_with_trust(files):
    torch.manual_seed(0)
    unet, _ = build_digits_model()
    base = unet.state_dict()
    delta = load_offset(files["dir"] / "stripped.safetensors", base, trust_delta=True)
    assert set(delta) == set(base) and max(v.abs().max().item() for v in delta.values()) < 0.01  # applied as delta


def test_unet_config_refuses_per_level_layers():
    with pytest.raises(CheckpointError, match=r"layers_per_block=\[1, 2, 2, 2\]"):
        unet_config_from_diffusers({"layers_per_block": [1, 2, 2, 2]})
    assert unet_config_from_diffusers({"layers_per_block": [2, 2, 2, 2]}).layers_per_block == 2


def test_unreadable_image_names_the_file(tmp_path):
    from npo_min.data import load_image
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="x.png is not a readable image"):
        load_image(tmp_path / "x.png", 8)


def test_degenerate_images_warn_and_unreadable_ones_are_named(tmp_path):
    from PIL import Image

    from eval.t2i.score import open_image
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    with pytest.warns(UserWarning, match="1x1 px"):
        open_image(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match="fully transparent"):
        open_image(tmp_path / "clear.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="bad.png is not a readable image"):
        open_image(tmp_path / "bad.png")


def test_results_refuses_a_delta_with_another_recipe(files, tmp_path):
    """eval.benchmark.results reuses a delta only if its recorded recipe is the one requested."""
    from eval.benchmark.results import recipe_changes, train_variant
    out = tmp_path / "reports"
    base = str(files["base"])
    common = "--no-progress --steps 1 --batch-size 4"
    delta = train_variant(out, "v", "", base, common)  # trains
    assert delta.exists() and recipe_changes(delta, ["--weights", base, "--out", "x", *common.split()]) == []
    before = delta.read_bytes()
    assert train_variant(out, "v", "", base, common) == delta and delta.read_bytes() == before  # reused
    with pytest.raises(ValueError, match="lr: recorded '0.0001', requested '0.001'"):
        train_variant(out, "v", "--lr 1e-3", base, common)
    assert delta.read_bytes() == before
    # a committed report keeps loss.csv / args.json but not the delta (.gitignore): the delta is trained again
    from safetensors.torch import load_file
    tensors = load_file(delta)
    delta.unlink()
    assert train_variant(out, "v", "", base, common) == delta  # (metadata differs: command, seconds)
    again = load_file(delta)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_model_folders_under_weights_need_overwrite(tmp_path, monkeypatch):
    """Any folder of weights/ that holds files (shipped or downloaded) is written only with --overwrite; new ones are free."""
    monkeypatch.setattr(cli, "SHIPPED", tmp_path)
    (tmp_path / "sd15").mkdir()
    (tmp_path / "sd15" / "model_index.json").write_text("{}")
    with pytest.raises(PermissionError, match="a model folder"):
        cli.check_out([tmp_path / "sd15" / "delta.safetensors"], overwrite=False, script="train.py")
    cli.check_out([tmp_path / "sd15" / "delta.safetensors"], overwrite=True, script="train.py")
    assert cli.check_out([tmp_path / "mine" / "delta.safetensors"], overwrite=False, script="train.py")
    with pytest.raises(PermissionError, match="a model folder"):
        cli.check_out([tmp_path / "delta.safetensors"], overwrite=False, script="train.py")  # weights/ itself holds files
