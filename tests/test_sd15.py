"""npo_min.pipelines.sd15 end to end on a tiny random checkpoint with the SD1.5 architecture (preset "tiny").

The same weights are written in both layouts: an SD single file with the official prefixes
(model.diffusion_model. / first_stage_model. / cond_stage_model.transformer.) and a diffusers folder
(unet/ vae/ text_encoder/ tokenizer/) made with diffusers' and transformers' own save_pretrained from
models loaded through diffusers' single-file converters. diffusers / transformers are oracles only.
LoRA conversion is checked against diffusers' own PEFT loading (`load_lora_adapter`, `fuse_lora`;
peft is a test requirement), diffusers' LoRA *key* converter, and an independent forward computation
(hooks adding scale * B(A(x)) to every targeted layer of a diffusers UNet).
"""

import argparse
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from conftest import diffusers_unet_to_ldm, maxerr, randomize_, unet_kwargs, vae_kwargs
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from npo_min.checkpoint import CheckpointError
import sample
import train
from npo_min.data import image_caption_pairs, load_image
from npo_min.offsets import load_offset, lora_to_delta, save_delta
from npo_min.pipelines.sd15 import PRESETS, load as load_sd15
from npo_min.unet import UNet2DConditionModel, read_unet_weights
from test_vae import random_ldm_vae

REPO = Path(__file__).resolve().parent.parent
TINY = PRESETS["tiny"]
READ = lambda path: read_unet_weights(path, TINY.unet)  # the family's full-UNet reader (key map)
TOL = 1e-4


def hf_text_config(cfg) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_width, max_position_embeddings=cfg.max_positions, hidden_act=cfg.act,
        eos_token_id=2, attn_implementation="eager")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, clip_vocab):
    """Tiny SD1.5-architecture checkpoint in both layouts, plus the diffusers models holding its weights."""
    root = tmp_path_factory.mktemp("tiny_sd15")
    torch.manual_seed(0)
    unet = randomize_(diffusers.UNet2DConditionModel(**unet_kwargs(TINY.unet)), seed=1).eval()
    ldm_vae = {k: 0.2 * v for k, v in random_ldm_vae(TINY.vae).items()}
    vae = diffusers.AutoencoderKL(**vae_kwargs(TINY.vae)).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm_vae.items()}, vae_kwargs(TINY.vae)))
    text = randomize_(transformers.CLIPTextModel(hf_text_config(TINY.text)), seed=2).eval()
    folder = root / "diffusers"
    unet.save_pretrained(folder / "unet", max_shard_size="500KB")  # sharded
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    shutil.copytree(clip_vocab, folder / "tokenizer")
    single = {f"model.diffusion_model.{k}": v.contiguous() for k, v in diffusers_unet_to_ldm(unet.state_dict(), TINY.unet).items()}
    single |= {f"first_stage_model.{k}": v.contiguous() for k, v in ldm_vae.items()}
    single |= {f"cond_stage_model.transformer.text_model.{k}": v.contiguous() for k, v in text.state_dict().items()}
    (root / "single").mkdir()
    save_file(single, root / "single" / "tiny.safetensors")
    return dict(root=root, folder=folder, single=root / "single" / "tiny.safetensors", unet=unet, vae=vae, text=text,
                tokenizer=clip_vocab)


@pytest.fixture(scope="module")
def bundle(ckpt):
    return load_sd15(ckpt["folder"])


def test_both_layouts_load_the_same_weights(ckpt, bundle, tmp_path):
    assert bundle.config == TINY  # read from the folder's config.json files
    single = load_sd15(ckpt["single"], config="tiny", tokenizer=ckpt["tokenizer"])
    torch.save({"state_dict": load_file(ckpt["single"])}, tmp_path / "tiny.ckpt")
    pickled = load_sd15(tmp_path / "tiny.ckpt", config="tiny", tokenizer=ckpt["tokenizer"])
    for other in (single, pickled):
        for part in ("denoiser", "vae", "text_encoder"):
            a, b = getattr(bundle, part).state_dict(), getattr(other, part).state_dict()
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), part
    assert not any(p.requires_grad for p in bundle.vae.parameters()) and not any(p.requires_grad for p in bundle.text_encoder.parameters())
    half = load_sd15(ckpt["folder"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for m in (half.denoiser, half.vae, half.text_encoder) for p in m.parameters())


def test_components_match_diffusers(ckpt, bundle):
    g = torch.Generator().manual_seed(3)
    x, context, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ids = bundle.tokenizer(["a photo of a cat", ""])
    with torch.no_grad():
        errs = dict(
            unet=maxerr(bundle.denoiser(x, torch.tensor([3, 900]), context), ckpt["unet"](x, torch.tensor([3, 900]), context).sample),
            vae=maxerr(bundle.vae.decode(z), ckpt["vae"].decode(z).sample),
            text=maxerr(bundle.encode(["a photo of a cat", ""]), ckpt["text"](ids).last_hidden_state),
        )
    print("max abs err vs diffusers / transformers:", {k: f"{v:.3g}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    assert bundle.encode([""]).shape == (1, 77, 32)


def test_single_file_needs_a_tokenizer(ckpt, tmp_path):
    shutil.copy(ckpt["single"], tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_sd15(tmp_path / "model.safetensors", config="tiny")
    shutil.copytree(ckpt["tokenizer"], tmp_path / "tokenizer")  # a tokenizer/ folder next to the file is found
    assert load_sd15(tmp_path / "model.safetensors", config="tiny").tokenizer("a cat").shape == (1, 77)
    with pytest.raises(CheckpointError, match="shape mismatches"):  # the real SD1.5 widths do not fit
        load_sd15(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_sd15(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------- LoRA and other offsets

TARGETS = [  # (layer, kind): the authors' attention targets, plus a 1x1 conv, a 3x3 conv and a time projection
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", "linear"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "linear"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "linear"),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0", "linear"),
    ("up_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj", "linear"),
    ("down_blocks.2.attentions.0.proj_in", "conv1"),
    ("up_blocks.0.resnets.1.conv1", "conv3"),
    ("down_blocks.3.resnets.0.time_emb_proj", "linear"),
]
RANK = 4


def random_lora(unet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (down A, up B) with shapes as PEFT stores them for that layer type."""
    g, modules, out = torch.Generator().manual_seed(4), dict(unet.named_modules()), {}
    for name, kind in TARGETS:
        w = modules[name].weight
        if kind == "linear":
            a, b = torch.randn(RANK, w.shape[1], generator=g), torch.randn(w.shape[0], RANK, generator=g)
        else:  # conv LoRA: A has the layer's kernel, B is 1x1
            a, b = torch.randn(RANK, *w.shape[1:], generator=g), torch.randn(w.shape[0], RANK, 1, 1, generator=g)
        out[name] = (0.05 * a, 0.05 * b)
    return out


def kohya(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def test_lora_forms_agree_with_each_other_and_diffusers_key_converter(ckpt, bundle, tmp_path):
    base, lora = bundle.denoiser.state_dict(), random_lora(ckpt["unet"])
    peft = {f"unet.{n}.lora_{ab}.weight": t for n, (a, b) in lora.items() for ab, t in (("A", a), ("B", b))}
    ref = lora_to_delta(peft, base)
    assert sorted(ref) == sorted(f"{n}.weight" for n in lora)
    for n, (a, b) in lora.items():  # by hand: B @ A, reshaped to the weight
        assert torch.allclose(ref[f"{n}.weight"], (b.flatten(1) @ a.flatten(1)).reshape(base[f"{n}.weight"].shape))
    forms = {
        "diffusers": {f"unet.{n}.lora.{d}.weight": t for n, (a, b) in lora.items() for d, t in (("down", a), ("up", b))},
        "peft_bare": {f"base_model.model.{n}.lora_{ab}.weight": t for n, (a, b) in lora.items() for ab, t in (("A", a), ("B", b))},
        "kohya": {f"{kohya(n)}.lora_{d}.weight": t for n, (a, b) in lora.items() for d, t in (("down", a), ("up", b))},
    }
    for name, sd in forms.items():
        got = lora_to_delta(sd, base)
        assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref), name
    # diffusers' own reading of the kohya file (old attention-processor names for attention layers)
    save_file({k: v.contiguous() for k, v in forms["kohya"].items()}, tmp_path / "kohya.safetensors")
    converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "kohya.safetensors"))
    assert any(".processor.to_q_lora." in k for k in converted) and not alphas
    got = lora_to_delta(converted, base)
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    # alpha: a stored `.alpha` (kohya) or the header's lora_adapter_metadata scales by alpha / rank
    with_alpha = forms["kohya"] | {f"{kohya(n)}.alpha": torch.tensor(2.0) for n in lora}
    assert all(torch.allclose(v, ref[k] * 2.0 / RANK) for k, v in lora_to_delta(with_alpha, base).items())
    save_file({k: v.contiguous() for k, v in peft.items()}, tmp_path / "lora.safetensors",
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": 8})})
    assert all(torch.allclose(v, ref[k] * 8 / RANK) for k, v in load_offset(tmp_path / "lora.safetensors", base).items())


def test_lora_delta_reproduces_lora_forward(ckpt, bundle):
    """theta + delta in our UNet == a diffusers UNet computing W x + B(A(x)) on every targeted layer."""
    ref, lora = ckpt["unet"], random_lora(ckpt["unet"])
    base = bundle.denoiser.state_dict()
    delta = lora_to_delta({f"unet.{n}.lora.{d}.weight": t for n, (a, b) in lora.items() for d, t in (("down", a), ("up", b))}, base)
    modules, hooks = dict(ref.named_modules()), []
    for name, (a, b) in lora.items():
        m = modules[name]
        if isinstance(m, torch.nn.Linear):
            fn = lambda mod, inp, out, a=a, b=b: out + F.linear(F.linear(inp[0], a), b)
        else:
            fn = lambda mod, inp, out, a=a, b=b: out + F.conv2d(F.conv2d(inp[0], a, stride=mod.stride, padding=mod.padding), b)
        hooks.append(m.register_forward_hook(fn))
    ours = UNet2DConditionModel(TINY.unet).eval()
    ours.load_state_dict({k: base[k] + delta.get(k, 0) for k in base})
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    try:
        with torch.no_grad():
            expected = ref(x, torch.tensor([50, 600]), context).sample
            plain = bundle.denoiser(x, torch.tensor([50, 600]), context)
            got = ours(x, torch.tensor([50, 600]), context)
    finally:
        for h in hooks:
            h.remove()
    print(f"LoRA: theta + delta vs W x + B(A(x)): max abs err {maxerr(got, expected):.3g} (LoRA effect {maxerr(plain, expected):.3g})")
    assert maxerr(got, expected) <= TOL and maxerr(plain, expected) > 1e-3


def test_lora_delta_matches_diffusers_peft_loading(ckpt, bundle, tmp_path):
    """A PEFT-format LoRA file: our theta + delta == diffusers' UNet after `load_lora_adapter`, with the
    adapter active and after `fuse_lora`, with lora_alpha from the file's metadata (scale alpha / r)."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (requirements-test.txt)")
    base, lora = bundle.denoiser.state_dict(), random_lora(ckpt["unet"])
    peft_sd = {f"unet.{n}.lora_{ab}.weight": t.contiguous() for n, (a, b) in lora.items() for ab, t in (("A", a), ("B", b))}
    meta = {f"unet.{k}": v for k, v in {"r": RANK, "lora_alpha": 8, "target_modules": sorted(lora)}.items()}
    save_file(peft_sd, tmp_path / "npo_lora.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    delta = load_offset(tmp_path / "npo_lora.safetensors", base)
    ours = UNet2DConditionModel(TINY.unet).eval()
    ours.load_state_dict({k: base[k] + delta.get(k, 0) for k in base})
    ref = copy.deepcopy(ckpt["unet"]).eval()
    ref.load_lora_adapter(dict(peft_sd), prefix="unet", adapter_name="npo", metadata=meta)
    g = torch.Generator().manual_seed(6)
    x, context, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([50, 600])
    with torch.no_grad():
        got, plain, active = ours(x, t, context), bundle.denoiser(x, t, context), ref(x, t, context).sample
        ref.fuse_lora(lora_scale=1.0)
        fused = ref(x, t, context).sample
    print(f"LoRA vs diffusers+peft: adapter {maxerr(got, active):.3g}, fused {maxerr(got, fused):.3g} (effect {maxerr(plain, active):.3g})")
    assert maxerr(got, active) <= TOL and maxerr(got, fused) <= TOL and maxerr(plain, active) > 1e-3


def test_load_offset_forms_and_errors(ckpt, bundle, tmp_path):
    base = bundle.denoiser.state_dict()
    g = torch.Generator().manual_seed(6)
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    want = {k: trained[k] - base[k] for k in base}
    save_delta(trained, base, tmp_path / "run" / "delta.safetensors", {"base": "tiny"})
    full = UNet2DConditionModel(TINY.unet)
    full.load_state_dict(trained)
    diffusers_unet = diffusers.UNet2DConditionModel(**unet_kwargs(TINY.unet))
    diffusers_unet.load_state_dict(trained)
    diffusers_unet.save_pretrained(tmp_path / "dpo" / "unet")  # a fine-tuned UNet, as --pos-ckpt
    for path in (tmp_path / "run", tmp_path / "run" / "delta.safetensors", tmp_path / "dpo", tmp_path / "dpo" / "unet"):
        got = load_offset(path, base, READ)
        assert sorted(got) == sorted(want) and max(maxerr(got[k], want[k]) for k in want) <= 1e-6, path
    other = {k: v + 1 for k, v in base.items()}
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_offset(tmp_path / "run", other, READ)
    assert sorted(load_offset(tmp_path / "run", other, READ, check_fingerprint=False)) == sorted(want)
    with pytest.raises(CheckpointError, match="name no layer"):
        lora_to_delta({"unet.down_blocks.9.attn.to_q.lora_A.weight": torch.zeros(1, 2)}, base)
    with pytest.raises(CheckpointError, match="needs both"):
        lora_to_delta({"unet.conv_in.lora_A.weight": torch.zeros(1, 4, 3, 3)}, base)
    with pytest.raises(CheckpointError, match="does not fit"):
        lora_to_delta({"conv_in.lora_A.weight": torch.zeros(2, 5), "conv_in.lora_B.weight": torch.zeros(32, 2)}, base)
    with pytest.raises(CheckpointError, match="text-encoder LoRAs are not applied"):
        lora_to_delta({"text_encoder.text_model.x.lora_A.weight": torch.zeros(1)}, base)
    with pytest.raises(CheckpointError, match="not found"):
        load_offset(tmp_path / "nope.safetensors", base)


# ----------------------------------------------------------------------------- Self-NPO data and train.py


def make_data(folder: Path, n: int = 3) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(96, 64), (64, 80), (70, 70), (128, 64)][:n]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
        (folder / f"img{i}.txt").write_text(f"a random picture number {i}\n")
    return folder


def test_load_image_resizes_shortest_side_and_centre_crops(tmp_path):
    ramp = np.tile(np.arange(128, dtype=np.uint8)[None, :, None] * 2, (64, 1, 3))  # (64, 128, 3): value 2x
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 64)  # already 64 high: no resize, crop columns 32..95
    assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert x[0, 0, 0] == pytest.approx(64 / 127.5 - 1) and x[0, 0, 63] == pytest.approx(190 / 127.5 - 1)
    assert load_image(tmp_path / "wide.png", 32).shape == (3, 32, 32)


def test_image_caption_pairs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        image_caption_pairs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        image_caption_pairs(tmp_path / "empty")
    data = make_data(tmp_path / "data")
    assert [c for _, c in image_caption_pairs(data)] == [f"a random picture number {i}" for i in range(3)]
    (data / "img1.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images .* no same-name \.txt caption, e\.g\. \['img1.png'\]"):
        image_caption_pairs(data)


def test_self_npo_batches(ckpt, bundle, tmp_path):
    data = make_data(tmp_path / "data")
    pipe = load_sd15(str(ckpt["single"]), config="tiny", tokenizer=str(ckpt["tokenizer"]))
    gen = torch.Generator().manual_seed(0)
    batches = pipe.self_npo_batches(str(data), 2, gen, resolution=64)
    null, name = pipe.null_cond(1), pipe.name
    assert name.startswith("sd15:")
    assert all(p.requires_grad and p.dtype == torch.float32 for p in pipe.denoiser.parameters())
    assert null.shape == (1, 77, 32) and torch.allclose(null, bundle.encode([""]))
    # batch 1 by hand: a permutation of the 3 images, then eps; latents = sf * (mean + std * eps)
    replay = torch.Generator().manual_seed(0)
    idx = torch.randperm(3, generator=replay)[:2]
    eps = torch.randn((2, 4, 8, 8), generator=replay)
    pixels = torch.stack([load_image(p, 64) for p, _ in image_caption_pairs(data)])[idx]
    with torch.no_grad():
        mean, logvar = bundle.vae.encode(pixels)
        context = bundle.encode([f"a random picture number {i}" for i in idx.tolist()])
    latents, got_context = next(batches)
    assert latents.shape == (2, 4, 8, 8) and got_context.shape == (2, 77, 32)
    assert maxerr(latents, TINY.vae.scaling_factor * (mean + torch.exp(0.5 * logvar) * eps)) <= TOL
    assert maxerr(got_context, context) <= TOL
    for _ in range(2):  # endless: the third batch needs a reshuffle of the 3 images
        assert next(batches)[0].shape == (2, 4, 8, 8)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_train_then_sample_cli(ckpt, bundle, tmp_path):
    """train.py --model sd15 (2 steps) on the tiny folder checkpoint, then sample.py --model sd15 with its delta."""
    data, out = make_data(tmp_path / "data"), tmp_path / "out"
    run_cli("train.py", "--model", "sd15", "--weights", str(ckpt["folder"]), "--data", str(data), "--steps", "2",
            "--batch-size", "2", "--grad-accum", "1", "--resolution", "64", "--out", str(out), "--no-progress",
            "--dtype", "bf16", "--gradient-checkpointing")  # autocast bf16 with checkpointing, weights fp32
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    delta = load_offset(out, bundle.denoiser.state_dict(), READ)  # fingerprint of the same base
    assert sorted(delta) == sorted(bundle.denoiser.state_dict()) and any(v.abs().max() > 0 for v in delta.values())
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"caption": "a cat"}) + "\n")  # as eval.t2i.score reads them
    run_cli("sample.py", "--model", "sd15", "--weights", str(ckpt["folder"]), "--neg-ckpt", str(out / "delta.safetensors"),
            "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "samples"), "--steps", "2",
            "--height", "64", "--width", "64", "--device", "cpu")
    found = sorted(str(p.relative_to(tmp_path / "samples")) for p in (tmp_path / "samples").rglob("*.png"))
    assert found == ["base/0000.png", "grid.png", "npo/0000.png"]


# ----------------------------------------------------------------------------- sampling


def sample_args(ckpt, tmp_path, **kw) -> list[str]:
    """sample.py's argv for --model sd15 on the tiny folder; keyword = flag (True = a bare flag, None = left out)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nan oil painting of a castle\n\n")
    flags = {**dict(
        weights=str(ckpt["folder"]), prompts=str(prompts), out=str(tmp_path / "samples"), seed=7, guidance_scale=7.5,
        steps=15, solver="dpmpp_2m", spacing="trailing", alpha=1.0, beta=1.0, neg_ckpt=None, pos_ckpt=None, height=64, width=64,
        overwrite=False, dtype="fp32", device="cpu", no_progress=True, batch_size=2), **kw}
    argv = ["--model", "sd15"]
    for k, v in flags.items():
        if v is not None and v is not False:
            argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return argv


def sample_main(argv: list[str]) -> list[Path]:
    return sample.main(argv)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _find(sub: np.ndarray, grid: np.ndarray) -> bool:
    """Does image `sub` (h, w, 3) appear, pixel for pixel, somewhere inside `grid`?"""
    h, w = sub.shape[:2]
    for y in range(grid.shape[0] - h + 1):
        for x in np.flatnonzero((grid[y, : grid.shape[1] - w + 1] == sub[0, 0]).all(-1)):
            if np.array_equal(grid[y : y + h, x : x + w], sub):
                return True
    return False


def test_sample_main_writes_pairs_and_matches_diffusers_pipeline(ckpt, bundle, tmp_path):
    lora = random_lora(ckpt["unet"])
    save_file({f"unet.{n}.lora.{d}.weight": t.contiguous() for n, (a, b) in lora.items() for d, t in (("down", a), ("up", b))},
              tmp_path / "npo_lora.safetensors")
    args = sample_args(ckpt, tmp_path, neg_ckpt=str(tmp_path / "npo_lora.safetensors"))
    files = sample_main(args)
    out = Path(_flag(args, "--out"))
    written = sorted(p for p in out.rglob("*.png"))
    assert [str(p.relative_to(out)) for p in written] == ["base/0000.png", "base/0001.png", "grid.png", "npo/0000.png", "npo/0001.png"]
    assert sorted(files) == written
    base0, npo0 = (np.asarray(Image.open(out / k / "0000.png")) for k in ("base", "npo"))
    assert base0.shape == (64, 64, 3) and np.abs(base0.astype(int) - npo0).max() > 0
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))  # labelled: base block | npo block, one row a prompt
    assert grid.shape[0] >= 128 and grid.shape[1] >= 128 and _find(base0, grid) and _find(npo0, grid)
    # "base" is plain CFG with the base model: the diffusers pipeline, same components, noise and solver
    pipe = diffusers.StableDiffusionPipeline(
        vae=ckpt["vae"], text_encoder=ckpt["text"], tokenizer=transformers.CLIPTokenizer.from_pretrained(ckpt["tokenizer"], model_max_length=77),
        unet=ckpt["unet"], scheduler=diffusers.DPMSolverMultistepScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(int(_flag(args, "--seed")) + 1))
    with torch.no_grad():
        image = pipe("an oil painting of a castle", height=64, width=64, num_inference_steps=15, guidance_scale=7.5,
                     latents=noise, output_type="np").images[0]
    ours = np.asarray(Image.open(out / "base" / "0001.png")).astype(int)
    diff = np.abs(ours - (image * 255).round().astype(int))
    print(f"sample_main base vs StableDiffusionPipeline: max {diff.max()} / 255, {(diff > 0).mean():.2%} of values differ")
    assert diff.max() <= 1
    # nothing is overwritten without --overwrite, and that is checked before any work
    with pytest.raises(FileExistsError, match="--overwrite"):
        sample_main(args)
    sample_main(sample_args(ckpt, tmp_path, neg_ckpt=_flag(args, "--neg-ckpt"), overwrite=True, steps=2))


def test_sample_main_argument_errors(ckpt, tmp_path):
    with pytest.raises(ValueError, match="--neg-ckpt"):
        sample_main(sample_args(ckpt, tmp_path))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        sample_main(sample_args(ckpt, tmp_path, neg_ckpt=str(ckpt["folder"]), prompts=str(tmp_path / "empty.txt")))
    with pytest.raises(FileNotFoundError, match="not found"):
        sample_main(sample_args(ckpt, tmp_path, neg_ckpt=str(ckpt["folder"]), prompts=str(tmp_path / "nope.txt")))
    with pytest.raises(ValueError, match="multiples of 8"):
        sample_main(sample_args(ckpt, tmp_path, neg_ckpt=str(ckpt["folder"]), height=60))


def test_sample_one_pass_lora_and_delta_rank_match_two_models(ckpt, bundle, tmp_path, capsys):
    """sample.py: a LoRA (conv + linear layers) runs in one batched pass and writes the images the two-model path
    writes (<= 1 / 255); a full delta runs on two models, or in one pass after --delta-rank (error printed)."""
    lora = random_lora(ckpt["unet"])
    save_file({f"unet.{n}.lora.{d}.weight": t.contiguous() for n, (a, b) in lora.items() for d, t in (("down", a), ("up", b))},
              tmp_path / "npo_lora.safetensors")
    kw = dict(neg_ckpt=str(tmp_path / "npo_lora.safetensors"), steps=3, beta=2.0)
    sample_main(sample_args(ckpt, tmp_path, out=str(tmp_path / "one"), **kw))
    assert "one-pass NPO guidance" in capsys.readouterr().out
    sample_main(sample_args(ckpt, tmp_path, out=str(tmp_path / "two"), two_model=True, **kw))
    assert "two-model NPO guidance" in capsys.readouterr().out
    for name in ("npo/0000.png", "npo/0001.png", "base/0001.png"):
        one, two = (np.asarray(Image.open(tmp_path / d / name)).astype(int) for d in ("one", "two"))
        assert np.abs(one - two).max() <= 1, name
    g = torch.Generator().manual_seed(0)
    full = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous() for k, v in bundle.denoiser.state_dict().items()}
    save_file(full, tmp_path / "full_unet.safetensors")  # a fine-tuned UNet in module names
    sample_main(sample_args(ckpt, tmp_path, out=str(tmp_path / "full"), neg_ckpt=str(tmp_path / "full_unet.safetensors"), steps=2))
    assert "two-model NPO guidance" in capsys.readouterr().out
    sample_main(sample_args(ckpt, tmp_path, out=str(tmp_path / "cut"), neg_ckpt=str(tmp_path / "full_unet.safetensors"), steps=2,
                            delta_rank=4))
    out = capsys.readouterr().out
    assert "truncated SVD: relative error" in out and "one-pass NPO guidance" in out
    with pytest.raises(SystemExit):
        sample.parse_args(sample_args(ckpt, tmp_path, neg_ckpt="x", delta_rank=0))
