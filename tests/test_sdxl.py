"""npo_min.sdxl and npo_min.pipelines.sdxl end to end on a tiny random checkpoint with the SDXL architecture
(npo_min.sdxl preset "tiny").

The same weights are written in both layouts: an SDXL single file with the official prefixes
(model.diffusion_model. with label_emb, first_stage_model., conditioner.embedders.0.transformer. CLIP-L,
conditioner.embedders.1.model. bigG in OpenCLIP's layout with fused in_proj and x @ P text_projection) and a
diffusers folder (unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/) from diffusers' and
transformers' own save_pretrained. diffusers / transformers are oracles only.
"""

import copy
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffusers
import sample
import train
import transformers
from conftest import diffusers_unet_to_ldm, maxerr, randomize_, unet_kwargs, vae_kwargs
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from npo_min.checkpoint import CheckpointError
from npo_min.data import image_caption_pairs, load_image, load_image_random_crop
from npo_min.offsets import load_offset, save_delta
from npo_min.pipelines.sd15 import load as load_sd15
from npo_min.pipelines.sdxl import load as load_sdxl
from npo_min.clip import CLIPTextModel
from npo_min.unet import UNet2DConditionModel, checkpoint_family
from npo_min.sdxl import PRESETS, read_single_file, text_2_from_open_clip, time_ids
from test_scorers import hf_to_open_clip_by_hand
from test_sd15 import make_data
from test_vae import random_ldm_vae

TINY = PRESETS["tiny"]
TOL = 1e-4


def hf_text_config(cfg, projection: bool = False) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_width, max_position_embeddings=cfg.max_positions, hidden_act=cfg.act,
        projection_dim=cfg.projection_dim or 512, eos_token_id=2, attn_implementation="eager")


def _bare(sd: dict) -> dict:
    """transformers state dict -> keys under text_model. (transformers 5 may save a bare CLIPTextModel without it)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v.contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, clip_vocab):
    """Tiny SDXL-architecture checkpoint in both layouts, plus the diffusers / transformers models holding it."""
    root = tmp_path_factory.mktemp("tiny_sdxl")
    torch.manual_seed(0)
    unet = randomize_(diffusers.UNet2DConditionModel(**unet_kwargs(TINY.unet)), seed=1).eval()
    ldm_vae = {k: 0.2 * v for k, v in random_ldm_vae(TINY.vae).items()}
    vae = diffusers.AutoencoderKL(**vae_kwargs(TINY.vae)).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm_vae.items()}, vae_kwargs(TINY.vae)))
    text = randomize_(transformers.CLIPTextModel(hf_text_config(TINY.text)), seed=2).eval()
    text_2 = randomize_(transformers.CLIPTextModelWithProjection(hf_text_config(TINY.text_2)), seed=3).eval()
    folder = root / "diffusers"
    unet.save_pretrained(folder / "unet", max_shard_size="500KB")  # sharded
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    text_2.save_pretrained(folder / "text_encoder_2")
    shutil.copytree(clip_vocab, folder / "tokenizer")
    shutil.copytree(clip_vocab, folder / "tokenizer_2")
    (folder / "tokenizer_2" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))  # as SDXL's tokenizer_2
    single = {f"model.diffusion_model.{k}": v.contiguous() for k, v in diffusers_unet_to_ldm(unet.state_dict(), TINY.unet).items()}
    single |= {f"first_stage_model.{k}": v.contiguous() for k, v in ldm_vae.items()}
    single |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in _bare(text.state_dict()).items()}
    open_clip = hf_to_open_clip_by_hand({**_bare(text_2.state_dict()), "logit_scale": torch.tensor(4.6052)})
    single |= {f"conditioner.embedders.1.model.{k}": v.contiguous() for k, v in open_clip.items()}
    (root / "single").mkdir()
    save_file(single, root / "single" / "sd_xl_tiny.safetensors")
    return dict(root=root, folder=folder, single=root / "single" / "sd_xl_tiny.safetensors", unet=unet, vae=vae, text=text,
                text_2=text_2, tokenizer=clip_vocab)


@pytest.fixture(scope="module")
def bundle(ckpt):
    return load_sdxl(ckpt["folder"])


def test_both_layouts_load_the_same_weights(ckpt, bundle, tmp_path):
    assert bundle.config == TINY  # read from the folder's config.json files
    assert checkpoint_family(ckpt["folder"]) == checkpoint_family(ckpt["single"]) == "sdxl"
    single = load_sdxl(ckpt["single"], config="tiny", tokenizer=ckpt["folder"])
    torch.save({"state_dict": load_file(ckpt["single"])}, tmp_path / "tiny.ckpt")
    pickled = load_sdxl(tmp_path / "tiny.ckpt", config="tiny", tokenizer=ckpt["tokenizer"])  # one vocabulary for both
    for other in (single, pickled):
        for part in ("denoiser", "vae", "text_encoder", "text_encoder_2"):
            a, b = getattr(bundle, part).state_dict(), getattr(other, part).state_dict()
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), part
        assert torch.equal(other.tokenizer_2(["a cat"]), bundle.tokenizer_2(["a cat"]))
    assert bundle.tokenizer_2.pad_id == 0 and bundle.tokenizer.pad_id == 49407  # "!" and <|endoftext|>
    assert not any(p.requires_grad for m in (bundle.vae, bundle.text_encoder, bundle.text_encoder_2) for p in m.parameters())
    half = load_sdxl(ckpt["folder"], dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.denoiser.parameters())
    half.to("cpu", torch.float16)
    assert all(p.dtype == torch.float32 for p in half.vae.parameters())  # the SDXL VAE overflows in fp16: kept in fp32


def test_single_file_conversion_matches_diffusers_converters(ckpt):
    """Every part of the single file maps to the very same names and values as diffusers' converters."""
    raw = load_file(ckpt["single"])
    ours = read_single_file(ckpt["single"], TINY)
    theirs = dict(
        unet=convert_ldm_unet_checkpoint(raw, {"layers_per_block": 2, "addition_embed_type": "text_time"}),
        vae=convert_ldm_vae_checkpoint(raw, vae_kwargs(TINY.vae)),
        text=convert_ldm_clip_checkpoint(raw, remove_prefix="conditioner.embedders.0.transformer."),
        text_2=convert_open_clip_checkpoint(ckpt["text_2"], raw, prefix="conditioner.embedders.1.model."),
    )
    theirs["text"] = _bare(theirs["text"])
    theirs["text_2"] = _bare(theirs["text_2"])
    for part in ours:
        a, b = ours[part], {k: v for k, v in theirs[part].items() if not k.endswith("position_ids")}
        assert sorted(a) == sorted(b), (part, sorted(set(a) ^ set(b))[:5])
        assert all(torch.equal(a[k], b[k]) for k in a), part
    # and the diffusers models of the fixture hold exactly these tensors
    for part, model in (("unet", ckpt["unet"]), ("text_2", ckpt["text_2"])):
        ref = _bare(model.state_dict()) if part == "text_2" else model.state_dict()
        assert all(torch.equal(ours[part][k], ref[k]) for k in ours[part]), part
    assert "logit_scale" not in text_2_from_open_clip({"logit_scale": torch.zeros(())})


def test_components_match_diffusers(ckpt, bundle):
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 4, 8, 12, generator=g)  # non-square, batch 2
    t = torch.tensor([3, 900])
    ctx = dict(encoder_hidden_states=torch.randn(2, 77, 48, generator=g), text_embeds=torch.randn(2, 32, generator=g),
               time_ids=torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0], [1024.0, 1024.0, 16.0, 8.0, 1024.0, 1024.0]]))
    prompts = ["a photo of a cat", "an oil painting of a castle, very detailed!"]
    ids, ids_2 = bundle.tokenizer(prompts), bundle.tokenizer_2(prompts)
    with torch.no_grad():
        out_1 = ckpt["text"](ids, output_hidden_states=True)
        out_2 = ckpt["text_2"](ids_2, output_hidden_states=True)
        cond = bundle.encode(prompts)
        ref_unet = ckpt["unet"](x, t, encoder_hidden_states=ctx["encoder_hidden_states"],
                                added_cond_kwargs={k: ctx[k] for k in ("text_embeds", "time_ids")}).sample
        errs = dict(
            unet=maxerr(bundle.denoiser(x, t, ctx), ref_unet),
            text=maxerr(cond["encoder_hidden_states"], torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)),
            pooled=maxerr(cond["text_embeds"], out_2.text_embeds),
            vae=maxerr(bundle.decode(z), ckpt["vae"].decode(z / TINY.vae.scaling_factor).sample.clamp(-1, 1)),
        )
    print("max abs err vs diffusers / transformers:", {k: f"{v:.3g}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    assert cond["encoder_hidden_states"].shape == (2, 77, 48) and cond["text_embeds"].shape == (2, 32)
    assert torch.equal(cond["time_ids"], time_ids((64, 64), (0, 0), (64, 64), 2))  # 8 x sample_size (1024 for SDXL) by default
    bundle.set_image_size(64, 96)
    try:
        assert bundle.encode(["x"])["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]
    finally:
        bundle.set_image_size(64, 64)
    null = bundle.null_cond(3)
    assert sorted(null) == ["encoder_hidden_states", "text_embeds"] and all(v.abs().max() == 0 for v in null.values())
    assert null["encoder_hidden_states"].shape == (3, 77, 48) and null["text_embeds"].shape == (3, 32)


def test_self_npo_batches_time_ids_and_conditioning(ckpt, bundle, tmp_path):
    data = make_data(tmp_path / "data", n=4)  # sizes (96, 64), (64, 80), (70, 70), (128, 64)
    gen = torch.Generator().manual_seed(0)
    batches = bundle.self_npo_batches(str(data), 4, gen, resolution=64)
    latents, cond = next(batches)
    # replay: the permutation, then (top, left) per image in batch order, then eps
    replay = torch.Generator().manual_seed(0)
    idx = torch.randperm(4, generator=replay)
    paths = [p for p, _ in image_caption_pairs(data)]
    crops = [load_image_random_crop(paths[i], 64, replay) for i in idx.tolist()]
    eps = torch.randn((4, 4, 8, 8), generator=replay)
    pixels = torch.stack([x for x, _ in crops])
    with torch.no_grad():
        mean, logvar = bundle.vae.encode(pixels)
        want = bundle.encode([f"a random picture number {i}" for i in idx.tolist()])
    assert maxerr(latents, TINY.vae.scaling_factor * (mean + torch.exp(0.5 * logvar) * eps)) <= TOL
    assert maxerr(cond["encoder_hidden_states"], want["encoder_hidden_states"]) <= TOL
    assert maxerr(cond["text_embeds"], want["text_embeds"]) <= TOL
    # (64, 64, crop top, crop left, 64, 64), the crop within the resized image: 96x64 -> left in [0, 32];
    # 64x80 -> top in [0, 16]; 70x70 -> resized to 64, (0, 0); 128x64 -> left in [0, 64]
    bounds = {0: (0, 32), 1: (16, 0), 2: (0, 0), 3: (0, 64)}
    assert cond["time_ids"].tolist() == [[64.0, 64.0, *map(float, c), 64.0, 64.0] for _, c in crops]
    assert all(0 <= c[0] <= bounds[i][0] and 0 <= c[1] <= bounds[i][1] for i, (_, c) in zip(idx.tolist(), crops))
    # the same seed gives the same batches (crops, latents)
    again = bundle.self_npo_batches(str(data), 4, torch.Generator().manual_seed(0), resolution=64)
    latents_2, cond_2 = next(again)
    assert torch.equal(latents, latents_2) and torch.equal(cond["time_ids"], cond_2["time_ids"])


def test_random_crop_offsets_are_the_crop_the_vae_encodes(ckpt, bundle, tmp_path):
    """A crafted image whose pixel values are their own coordinates: the crop the VAE sees starts at the
    (top, left) written into the time ids, and the offsets vary over draws, reproducibly with the seed."""
    data = tmp_path / "ramps"
    data.mkdir()
    cols = np.tile(np.arange(192, dtype=np.uint8)[None, :, None], (64, 1, 3))  # (64, 192, 3): value = column
    rows = np.tile(np.arange(160, dtype=np.uint8)[:, None, None], (1, 64, 3))  # (160, 64, 3): value = row
    for name, arr in (("a_wide", cols), ("b_tall", rows)):
        Image.fromarray(arr).save(data / f"{name}.png")  # short side 64 = resolution: no resize, crop only
        (data / f"{name}.txt").write_text(name)
    seen = []
    encode = bundle.vae.encode

    def spy(x):
        seen.append(x.clone())
        return encode(x)

    def draws(seed, n):
        seen.clear()
        batches = bundle.self_npo_batches(str(data), 2, torch.Generator().manual_seed(seed), resolution=64)
        ids = [next(batches)[1]["time_ids"] for _ in range(n)]
        return ids, [x.clone() for x in seen]

    bundle.vae.encode = spy
    try:
        ids, pixels = draws(3, 6)
        ids_again, _ = draws(3, 6)
    finally:
        del bundle.vae.encode
    offsets = set()
    for t, x in zip(ids, pixels):  # t (2, 6); x (2, 3, 64, 64) in [-1, 1], value = coordinate / 127.5 - 1
        v = ((x[:, 0] + 1) * 127.5).round().long()  # (2, 64, 64) the coordinates the VAE saw
        for row, (top, left) in zip(v, t[:, 2:4].long().tolist()):
            if row[0, 1] - row[0, 0] == 1:  # the wide ramp: cropped horizontally only, first column = left
                assert top == 0 and row[0, 0] == left and row[0, 63] == left + 63
                offsets.add(("left", left))
            else:  # the tall ramp: first row = top
                assert left == 0 and row[1, 0] - row[0, 0] == 1 and row[0, 0] == top and row[63, 0] == top + 63
                offsets.add(("top", top))
    assert len({o for o in offsets if o[0] == 'left'}) > 1 and len({o for o in offsets if o[0] == 'top'}) > 1  # random, not fixed
    assert all(torch.equal(a, b) for a, b in zip(ids, ids_again))  # the same seed: the same crops


def test_random_crop_batches_resume_exactly(ckpt, bundle, tmp_path):
    """What train.py --resume restores (the generator's state and the batches' order state) gives the same
    next batch: crops, latents and time ids."""
    data = make_data(tmp_path / "data", n=4)
    gen = torch.Generator().manual_seed(7)
    batches = bundle.self_npo_batches(str(data), 3, gen, resolution=64)
    for _ in range(2):  # into the second epoch (4 images, batches of 3)
        next(batches)
    state = (gen.get_state(), copy.deepcopy(batches.state_dict()))
    latents, cond = next(batches)
    gen_2 = torch.Generator().manual_seed(123)
    resumed = bundle.self_npo_batches(str(data), 3, gen_2, resolution=64)
    resumed.load_state_dict(state[1])
    gen_2.set_state(state[0])
    latents_2, cond_2 = next(resumed)
    assert torch.equal(latents, latents_2) and all(torch.equal(cond[k], cond_2[k]) for k in cond)


# ----------------------------------------------------------------------------- sample.py and train.py


def test_sample_main_matches_stable_diffusion_xl_pipeline(ckpt, bundle, tmp_path):
    """`sample.py --model sdxl` "base" = StableDiffusionXLPipeline with the same components, noise, scheduler,
    zero negative embeddings (force_zeros_for_empty_prompt), non-square 64 x 96."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nan oil painting of a castle\n")
    out = tmp_path / "samples"
    base = bundle.denoiser.state_dict()
    save_delta({**base, "conv_out.bias": base["conv_out.bias"] + 0.3}, base, tmp_path / "neg.safetensors", {"base": "tiny"})
    files = sample.main(["--model", "sdxl", "--weights", str(ckpt["folder"]), "--prompts", str(prompts), "--out", str(out),
                         "--neg-ckpt", str(tmp_path / "neg.safetensors"), "--steps", "12", "--height", "64",
                         "--width", "96", "--seed", "5", "--no-progress", "--device", "cpu"])
    assert sorted(str(p.relative_to(out)) for p in files) == ["base/0000.png", "base/0001.png", "grid.png", "npo/0000.png", "npo/0001.png"]
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=ckpt["vae"], text_encoder=ckpt["text"], text_encoder_2=ckpt["text_2"],
        tokenizer=transformers.CLIPTokenizer.from_pretrained(ckpt["folder"] / "tokenizer", model_max_length=77),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(ckpt["folder"] / "tokenizer_2", model_max_length=77, pad_token="!"),
        unet=ckpt["unet"], scheduler=diffusers.DPMSolverMultistepScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1),
        force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(5 + 1))
    with torch.no_grad():
        image = pipe("an oil painting of a castle", height=64, width=96, num_inference_steps=12, guidance_scale=5.0,
                     latents=noise, output_type="np").images[0]
    ours = np.asarray(Image.open(out / "base" / "0001.png")).astype(int)
    diff = np.abs(ours - (image * 255).round().astype(int))
    print(f"sample.py --model sdxl base vs StableDiffusionXLPipeline: max {diff.max()} / 255, {(diff > 0).mean():.2%} of values differ")
    assert ours.shape == (64, 96, 3) and diff.max() <= 1
    npo = np.asarray(Image.open(out / "npo" / "0001.png")).astype(int)
    assert np.abs(npo - ours).max() > 0  # the offset on the negative model changes the guided sample
    # Euler, the other usual SDXL sampler: the same pipeline with SDXL's EulerDiscreteScheduler config
    sample.main(["--model", "sdxl", "--weights", str(ckpt["folder"]), "--prompts", str(prompts), "--out", str(tmp_path / "euler"),
                 "--neg-ckpt", str(tmp_path / "neg.safetensors"), "--steps", "12", "--height", "64", "--width", "96", "--seed", "5",
                 "--solver", "euler", "--no-progress", "--device", "cpu"])
    pipe.scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                      timestep_spacing="leading", steps_offset=1)
    with torch.no_grad():
        image = pipe("an oil painting of a castle", height=64, width=96, num_inference_steps=12, guidance_scale=5.0,
                     latents=noise, output_type="np").images[0]
    euler = np.asarray(Image.open(tmp_path / "euler" / "base" / "0001.png")).astype(int)
    diff = np.abs(euler - (image * 255).round().astype(int))
    print(f"sample.py --model sdxl --solver euler vs StableDiffusionXLPipeline + EulerDiscreteScheduler: max {diff.max()} / 255")
    assert diff.max() <= 1


def test_train_two_steps_writes_a_delta_that_loads_back(ckpt, bundle, tmp_path):
    data, out = make_data(tmp_path / "data"), tmp_path / "out"
    train.main(["--model", "sdxl", "--weights", str(ckpt["folder"]), "--data", str(data), "--steps", "2", "--batch-size", "2",
                "--resolution", "64", "--out", str(out), "--no-progress", "--device", "cpu",
                "--dtype", "bf16", "--gradient-checkpointing"])  # autocast bf16 with checkpointing, weights fp32
    args = json.loads((out / "args.json").read_text())
    assert (args["rollout_w"], args["lr"], args["weight_decay"]) == (-5.0, 1e-7, 0.0)  # the authors' SDXL recipe
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    base = bundle.denoiser.state_dict()
    delta = load_offset(out / "delta.safetensors", base, bundle.read_weights)  # fingerprint of the same base
    assert sorted(delta) == sorted(base) and any(v.abs().max() > 0 for v in delta.values())


def test_train_defaults_per_model():
    assert (train.parse_args(["--model", "sdxl"]).rollout_w, train.parse_args(["--model", "sdxl"]).resolution) == (-5.0, 1024)
    assert (train.parse_args(["--model", "sd15"]).rollout_w, train.parse_args(["--model", "sd15"]).resolution) == (-1.0, 512)
    assert train.parse_args(["--model", "sdxl", "--rollout-w", "-1", "--resolution", "512"]).rollout_w == -1.0
    s = sample.parse_args(["--model", "sdxl", "--weights", "x"])
    assert (s.solver, s.steps, s.guidance_scale, s.height, s.width) == ("dpmpp_2m", 25, 5.0, 1024, 1024)


# ----------------------------------------------------------------------------- the other family, missing parts


def test_family_mismatches_are_one_line_errors(ckpt, bundle, tmp_path):
    sd15_file = tmp_path / "v1-5-tiny.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "cond_stage_model.transformer.text_model.x": torch.zeros(1),
               "first_stage_model.x": torch.zeros(1)}, sd15_file)
    with pytest.raises(CheckpointError, match="SD1.5 .* not SDXL: use --model sd15") as err:
        load_sdxl(sd15_file, config="tiny", tokenizer=ckpt["tokenizer"])
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="is an SDXL checkpoint .* use --model sdxl") as err:
        load_sd15(ckpt["single"], config="tiny", tokenizer=ckpt["tokenizer"])
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="use --model sdxl"):
        load_sd15(ckpt["folder"])
    broken = tmp_path / "no_text_encoder_2"
    shutil.copytree(ckpt["folder"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(CheckpointError, match="no text_encoder_2/ folder") as err:
        load_sdxl(broken)
    assert "\n" not in str(err.value)
    single = load_file(ckpt["single"])
    save_file({k: v for k, v in single.items() if not k.startswith("conditioner.embedders.1.")}, tmp_path / "no_bigG.safetensors")
    with pytest.raises(CheckpointError, match="no text_2 weights under 'conditioner.embedders.1.model.'"):
        load_sdxl(tmp_path / "no_bigG.safetensors", config="tiny", tokenizer=ckpt["tokenizer"])
    (tmp_path / "truncated.safetensors").write_bytes(ckpt["single"].read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        load_sdxl(tmp_path / "truncated.safetensors", config="tiny", tokenizer=ckpt["tokenizer"])
    with pytest.raises(CheckpointError, match="SD1.5 checkpoint, not an SDXL one"):  # a full SD1.5 UNet as --pos-ckpt
        bundle.read_weights(sd15_file)


def test_lora_for_the_other_family_is_refused(bundle, tmp_path):
    base = bundle.denoiser.state_dict()
    g = torch.Generator().manual_seed(0)
    # SD1.5 attends at the first level (width 320 in the real models, 32 here); SDXL does not: unknown layers
    sd15_lora = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.randn(4, 32, generator=g),
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.randn(32, 4, generator=g)}
    save_file(sd15_lora, tmp_path / "sd15_lora.safetensors")
    with pytest.raises(CheckpointError, match="name no layer of this model.*a LoRA for another model"):
        load_offset(tmp_path / "sd15_lora.safetensors", base)
    # a layer both have, with SD1.5's cross-attention width (768 real, 32 here) instead of SDXL's (2048, 48 here)
    layer = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{layer}.lora.down.weight": torch.randn(4, 32, generator=g), f"{layer}.lora.up.weight": torch.randn(32, 4, generator=g)},
              tmp_path / "wrong_width.safetensors")
    with pytest.raises(CheckpointError, match="does not fit weight .* another model") as err:
        load_offset(tmp_path / "wrong_width.safetensors", base)
    assert "\n" not in str(err.value)


def test_lora_delta_matches_diffusers_peft_loading(ckpt, bundle, tmp_path):
    """A PEFT-format SDXL LoRA (attention, the linear proj_in, the added embedding): our theta + delta equals
    diffusers' UNet after `load_lora_adapter` + `fuse_lora`, lora_alpha from the file's metadata."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (requirements-test.txt)")
    base, g, rank = bundle.denoiser.state_dict(), torch.Generator().manual_seed(4), 4
    layers = ["down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
              "mid_block.attentions.0.proj_in", "add_embedding.linear_1"]
    peft_sd = {}
    for name in layers:
        w = base[name + ".weight"]
        peft_sd[f"unet.{name}.lora_A.weight"] = 0.05 * torch.randn(rank, w.shape[1], generator=g)
        peft_sd[f"unet.{name}.lora_B.weight"] = 0.05 * torch.randn(w.shape[0], rank, generator=g)
    meta = {f"unet.{k}": v for k, v in {"r": rank, "lora_alpha": 8, "target_modules": layers}.items()}
    save_file(peft_sd, tmp_path / "sdxl_lora.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    delta = load_offset(tmp_path / "sdxl_lora.safetensors", base)
    assert sorted(delta) == sorted(f"{n}.weight" for n in layers)
    ours = UNet2DConditionModel(TINY.unet).eval()
    ours.load_state_dict({k: base[k] + delta.get(k, 0) for k in base})
    ref = copy.deepcopy(ckpt["unet"]).eval()
    ref.load_lora_adapter(dict(peft_sd), prefix="unet", adapter_name="npo", metadata=meta)
    ref.fuse_lora(lora_scale=1.0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600])
    ctx = dict(encoder_hidden_states=torch.randn(2, 77, 48, generator=g), text_embeds=torch.randn(2, 32, generator=g),
               time_ids=time_ids((64, 64), (0, 0), (64, 64), 2))
    with torch.no_grad():
        got, plain = ours(x, t, ctx), bundle.denoiser(x, t, ctx)
        fused = ref(x, t, encoder_hidden_states=ctx["encoder_hidden_states"],
                    added_cond_kwargs={k: ctx[k] for k in ("text_embeds", "time_ids")}).sample
    print(f"SDXL LoRA vs diffusers+peft fused: {maxerr(got, fused):.3g} (effect {maxerr(plain, fused):.3g})")
    assert maxerr(got, fused) <= TOL and maxerr(plain, fused) > 1e-3


def test_sdxl_text_presets_match_transformers_layout_and_size():
    """The full `sdxl` preset's two text encoders: transformers' state-dict names and shapes (meta device)."""
    full = PRESETS["sdxl"]
    for cfg, cls, n in ((full.text, transformers.CLIPTextModel, 123_060_480),
                        (full.text_2, transformers.CLIPTextModelWithProjection, 694_659_840)):
        with torch.device("meta"):
            ours, ref = CLIPTextModel(cfg), cls(hf_text_config(cfg))
        theirs = {k: v.shape for k, v in _bare(ref.state_dict()).items() if not k.endswith("position_ids")}
        assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == n


def test_dpo_npo_two_steps_writes_a_lora_that_loads_back(ckpt, bundle, tmp_path):
    """Diffusion-NPO's DPO trainer on SDXL (beta 2000 by default, the authors' SDXL value): 64 px pairs, 2 steps."""
    from test_diffusion_npo import write_pairs

    pairs = write_pairs(tmp_path / "p", n=3, size=(64, 64), mode="RGB", prompts=["a cat", "a red car"])
    out = tmp_path / "npo"
    train.main(["--model", "sdxl", "--weights", str(ckpt["folder"]), "--method", "dpo-npo", "--pairs", str(pairs),
                "--resolution", "64", "--steps", "2", "--batch-size", "2", "--grad-accum", "1", "--out", str(out),
                "--no-progress", "--device", "cpu"])
    assert json.loads((out / "args.json").read_text())["dpo_beta"] == 2000.0
    delta = load_offset(out, bundle.denoiser.state_dict(), bundle.read_weights)
    assert delta and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for k in delta)
