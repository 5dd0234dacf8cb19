"""CLIP image tower / CLIPModel, the OpenCLIP key map, and the PickScore / HPSv2.1 / aesthetic scorers.

Oracles:
- transformers' CLIPModel / CLIPVisionModelWithProjection / CLIPImageProcessor / CLIPTokenizer;
- OpenCLIP's own `CLIP` model and `SimpleTokenizer` from the installed open-clip-torch wheel.
  `import open_clip` fails here (its package __init__ needs torchvision), so `open_clip_modules`
  imports only `open_clip/model.py` and `open_clip/tokenizer.py` under a private package name,
  with throw-away stand-ins for the two names they import from packages that are not installed
  (torchvision's FrozenBatchNorm2d, used only to freeze ResNet towers, and ftfy.fix_text, replaced
  by NFC normalization, which is all ftfy changes in the prompts used here). The stand-ins are
  removed from sys.modules right after the import. If even that fails, those tests skip and the
  layout is still covered by the transformers round trip (test_open_clip_map_round_trip).
- HPSv2's ResizeMaxSize and torchvision's Resize + CenterCrop (OpenAI CLIP) cannot be imported
  (no torchvision): they are re-derived here from their published arithmetic (emulate_*).

All models are tiny and random. Tolerances: 1e-5 max abs error on features (float32), 1e-6 on
preprocessed pixels (both sides resize with pillow, so the pixels are identical up to float
rounding; a torch-interpolate resize would differ by up to a few 1/255 instead).
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import io
import json
import sys
import types
import unicodedata
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transformers
from npo_min.checkpoint import CheckpointError, load_into
from npo_min.clip import CLIPTextConfig
from npo_min.clip_vision import CLIP_PRESETS, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
from eval.t2i.clip_checkpoints import load_clip, load_clip_vision, open_clip_to_hf
from npo_min.clip_tokenizer import load_tokenizer
from eval.t2i import scorers
from eval.t2i.scorers import Aesthetic, HPSv21, PickScore, RewardMLP, preprocess_clip, preprocess_hps

TOL = 1e-5
PIXEL_TOL = 1e-6


def tiny_config(act: str = "gelu", image_size: int = 224, patch: int = 32, proj: int = 16,
                vocab: int = 1000) -> CLIPConfig:
    return CLIPConfig(
        CLIPTextConfig(vocab_size=vocab, width=32, layers=2, heads=4, mlp_width=64, act=act, projection_dim=proj),
        CLIPVisionConfig(image_size=image_size, patch_size=patch, width=48, layers=2, heads=4, mlp_width=96, act=act,
                         projection_dim=proj),
    )


def hf_config(cfg: CLIPConfig, **kw) -> transformers.CLIPConfig:
    """transformers' config of the same architecture (text eos_token_id 2: argmax pooling, as OpenCLIP)."""
    t, v = cfg.text, cfg.vision
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.layers,
                         num_attention_heads=t.heads, intermediate_size=t.mlp_width, hidden_act=t.act,
                         max_position_embeddings=t.max_positions, layer_norm_eps=t.layer_norm_eps, eos_token_id=2,
                         bos_token_id=0, pad_token_id=1),
        vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                           num_hidden_layers=v.layers, num_attention_heads=v.heads, intermediate_size=v.mlp_width,
                           hidden_act=v.act, layer_norm_eps=v.layer_norm_eps),
        projection_dim=t.projection_dim, **kw,
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough for non-uniform attention and non-trivial LayerNorm affines."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(2.5)
                continue
            is_norm_weight = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if is_norm_weight else 0.0))
    return model


def hf_clip(cfg: CLIPConfig, seed: int = 0) -> transformers.CLIPModel:
    return randomize_(transformers.CLIPModel(hf_config(cfg, attn_implementation="eager")).eval(), seed)


def maxerr(a, b) -> float:
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def token_ids(vocab: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    """(n, 77) ids below the top id; the top id (the EOS) at varied places, then 0 padding (OpenCLIP style)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (n, 77), generator=g)
    for row, eos in enumerate((1, 9, 40, 76)[:n]):
        ids[row, eos] = vocab - 1
        ids[row, eos + 1:] = 0
    return ids


def pixels(cfg: CLIPConfig, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    return torch.randn(n, 3, s, s, generator=g)


# ---------------------------------------------------------------------------------------------- test images


def real_image(w: int, h: int, seed: int = 0, mode: str = "RGB", fmt: str = "PNG") -> Image.Image:
    """A photo-like image (gradients, shapes, noise) saved as PNG / JPEG and decoded again."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1), 127 + 127 * np.sin((xx + 2 * yy) / 9.0)], -1)
    arr[(xx - w / 3) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 4) ** 2] = (250, 40, 30)  # a red disc
    arr = (arr + rng.normal(0, 12, arr.shape)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return Image.open(io.BytesIO(buf.getvalue()))


IMAGE_SIZES = [(512, 512), (640, 360), (360, 640), (333, 777), (225, 301), (100, 60), (224, 227), (227, 224)]


def emulate_resize_max_size(img: Image.Image, size: int = 224) -> np.ndarray:
    """HPSv2's ResizeMaxSize(224, fill=0) on a non-degenerate PIL image, as (H, W, 3) uint8.

    scale = 224 / max(h, w); new (h, w) = round(dim * scale); bicubic resize; pad
    [left, top, right, bottom] = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2] with 0.
    """
    rgb = img.convert("RGB")
    width, height = rgb.size
    scale = size / float(max(height, width))
    new_h, new_w = (round(d * scale) for d in (height, width))
    arr = np.asarray(rgb.resize((new_w, new_h), Image.BICUBIC))
    pad_h, pad_w = size - new_h, size - new_w
    return np.pad(arr, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))


def emulate_torchvision_resize_center_crop(img: Image.Image, size: int = 224) -> np.ndarray:
    """torchvision Resize(224, BICUBIC) + CenterCrop(224) on a PIL image (OpenAI CLIP's preprocess)."""
    rgb = img.convert("RGB")
    w, h = rgb.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    arr = np.asarray(rgb.resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return arr[top:top + size, left:left + size]


def normalize_hwc(arr: np.ndarray) -> torch.Tensor:
    x = torch.tensor(arr, dtype=torch.float64).permute(2, 0, 1) / 255.0
    mean, std = torch.tensor(scorers.CLIP_MEAN, dtype=torch.float64), torch.tensor(scorers.CLIP_STD, dtype=torch.float64)
    return ((x - mean[:, None, None]) / std[:, None, None]).float()


# ---------------------------------------------------------------------------------------------- toy BPE


def byte_units() -> list[str]:
    """GPT-2 / CLIP byte alphabet in vocabulary order (printable Latin-1 first, then chr(256 + i))."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


TOY_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("a", "n</w>"), ("t", "h"), ("th", "e</w>")]


def write_toy_bpe(folder: Path) -> tuple[Path, Path, int]:
    """A small CLIP-format BPE: `bpe.txt.gz` (OpenAI / OpenCLIP format) and a transformers
    `tokenizer/` folder (vocab.json, merges.txt) describing the same vocabulary. Returns (gz, folder, size)."""
    folder.mkdir(parents=True, exist_ok=True)
    gz = folder / "bpe.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("#version: toy\n" + "\n".join(" ".join(m) for m in TOY_MERGES))  # open_clip reads "" as a merge
    units = byte_units()
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in TOY_MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    tok = folder / "tokenizer"
    tok.mkdir(exist_ok=True)
    (tok / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in TOY_MERGES) + "\n")
    return gz, tok, len(tokens)


TOY_VOCAB = 512 + len(TOY_MERGES) + 2
PROMPTS = ["a cat and the dog", "The Dog!", "&amp; html &lt;b&gt; entities", "  spaced \t out  ", "x" * 300, ""]


# ---------------------------------------------------------------------------------------------- OpenCLIP oracle


@pytest.fixture(scope="module")
def open_clip_modules():
    """(open_clip.model, open_clip.tokenizer) of the installed wheel, imported without its package __init__."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed: pip install --no-deps open-clip-torch==3.3.0")
    root = list(spec.submodule_search_locations)[0]
    tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})  # only used to freeze ResNet towers
    tv.ops, ops.misc = ops, misc
    ftfy = types.ModuleType("ftfy")
    ftfy.fix_text = lambda text: unicodedata.normalize("NFC", text)
    stand_ins = {"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc, "ftfy": ftfy}
    stand_ins = {k: v for k, v in stand_ins.items() if k not in sys.modules}
    pkg = types.ModuleType("_open_clip_oracle")
    pkg.__path__ = [root]
    sys.modules.update(stand_ins)
    sys.modules["_open_clip_oracle"] = pkg
    try:
        model = importlib.import_module("_open_clip_oracle.model")
        tokenizer = importlib.import_module("_open_clip_oracle.tokenizer")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"open_clip's model.py cannot be imported here ({e!r})")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    return model, tokenizer


def open_clip_model(oc_model, cfg: CLIPConfig, seed: int = 0):
    """OpenCLIP `CLIP` with the architecture of cfg, random weights."""
    t, v = cfg.text, cfg.vision
    assert t.act == v.act
    model = oc_model.CLIP(
        embed_dim=t.projection_dim,
        vision_cfg=dict(image_size=v.image_size, layers=v.layers, width=v.width, head_width=v.width // v.heads,
                        mlp_ratio=v.mlp_width / v.width, patch_size=v.patch_size),
        text_cfg=dict(context_length=t.max_positions, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                      layers=t.layers, mlp_ratio=t.mlp_width / t.width),
        quick_gelu=t.act == "quick_gelu",
    )
    return randomize_(model.eval(), seed)


# ---------------------------------------------------------------------------------------------- model parity


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_model_matches_transformers(act):
    cfg = tiny_config(act, image_size=56, patch=14)
    ref = hf_clip(cfg, seed=1)
    ours = CLIPModel(cfg).eval()
    load_into(ours, ref.state_dict(), "tiny CLIPModel")
    px, ids = pixels(cfg), token_ids(cfg.text.vocab_size)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=px)
        errs = dict(
            image=maxerr(ours.get_image_features(px), ref.get_image_features(px).pooler_output),
            text=maxerr(ours.get_text_features(ids), ref.get_text_features(ids).pooler_output),
            logits=maxerr(ours(px, ids), out.logits_per_image) / out.logits_per_image.abs().max().item(),
            logit_scale=maxerr(ours.logit_scale, ref.logit_scale),
        )
    print(f"CLIPModel vs transformers ({act}): {errs}")
    assert max(errs.values()) <= TOL, errs
    # the vision tower alone = transformers' CLIPVisionModelWithProjection on the same weights
    vcfg = transformers.CLIPVisionConfig(**{**ref.config.vision_config.to_dict(), "projection_dim": cfg.vision.projection_dim})
    vref = transformers.CLIPVisionModelWithProjection(vcfg).eval()
    vref.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith(("vision_model.", "visual_proj"))})
    vision = CLIPVisionModel(cfg.vision).eval()
    load_into(vision, vref.state_dict(), "tiny CLIPVisionModel")
    with torch.no_grad():
        assert maxerr(vision(px), vref(pixel_values=px).image_embeds) <= TOL


def test_clip_model_rejects_bad_inputs():
    cfg = tiny_config(image_size=56, patch=14)
    model = CLIPModel(cfg).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, 56, 56\)"):
        model.get_image_features(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="float"):
        model.get_image_features(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        model.get_text_features(torch.full((1, 77), 1000))
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPConfig(CLIPTextConfig(projection_dim=768), CLIPVisionConfig(projection_dim=1024))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        CLIPVisionConfig(image_size=225)


@pytest.mark.parametrize("preset,n_params", [("vit_l_14", 427_616_513), ("vit_h_14", 986_109_441)])
def test_clip_presets_layout_and_parameter_count(preset, n_params):
    """Same names and shapes as transformers' CLIPModel of that config (both on meta); published sizes."""
    cfg = CLIP_PRESETS[preset]
    hcfg = hf_config(cfg)
    text = CLIPTextConfig.from_hf(hcfg.text_config.to_dict())  # without a projection: it sits in CLIPModel's config
    assert CLIPConfig(replace(text, projection_dim=hcfg.projection_dim), cfg.vision) == cfg
    assert CLIPVisionConfig.from_hf(hcfg.vision_config.to_dict(), hcfg.projection_dim) == cfg.vision
    with torch.device("meta"):
        ours, ref = CLIPModel(preset), transformers.CLIPModel(hcfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == n_params


# ---------------------------------------------------------------------------------------------- OpenCLIP layout


def hf_to_open_clip_by_hand(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel keys -> OpenCLIP's, written from open_clip/model.py + transformer.py:
    VisionTransformer(conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks,
    ln_post, proj), text tower at top level (token_embedding, positional_embedding, transformer,
    ln_final, text_projection), ResidualAttentionBlock(ln_1, attn=nn.MultiheadAttention, ln_2,
    mlp=Sequential(c_fc, gelu, c_proj)); proj matrices are used as x @ proj."""
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        tower, _, rest = k.partition(".")
        pre = "visual." if tower == "vision_model" else ""
        if ".encoder.layers." in k:
            i, name = rest.split("encoder.layers.")[1].split(".", 1)
            blk = f"{pre}transformer.resblocks.{i}."
            if name.startswith("self_attn.") and name.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                continue  # fused below
            name = (name.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("self_attn.out_proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc")
                    .replace("mlp.fc2", "mlp.c_proj"))
            out[blk + name] = v
            if name == "ln_1.weight":
                for kind in ("weight", "bias"):
                    p = f"{tower}.encoder.layers.{i}.self_attn."
                    out[f"{blk}attn.in_proj_{kind}"] = torch.cat([sd[p + f"{x}_proj.{kind}"] for x in "qkv"])
            continue
        simple = {
            "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
            "vision_model.embeddings.class_embedding": "visual.class_embedding",
            "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
            "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
            "vision_model.post_layernorm.weight": "visual.ln_post.weight",
            "vision_model.post_layernorm.bias": "visual.ln_post.bias",
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
            "logit_scale": "logit_scale",
        }
        if k in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if k.startswith("visual") else "text_projection"] = v.T.contiguous()
        else:
            out[simple[k]] = v
    return out


def test_open_clip_layout_matches_open_clip(open_clip_modules, tmp_path):
    """OpenCLIP's own CLIP -> an HPS-style .pt ('state_dict', `module.` prefix) -> load_clip: same features
    as open_clip's encode_image / encode_text, and transformers' CLIPModel reads the mapped dict too."""
    oc_model, _ = open_clip_modules
    cfg = tiny_config("gelu", image_size=56, patch=14)
    oc = open_clip_model(oc_model, cfg, seed=2)
    sd = oc.state_dict()
    assert {"visual.conv1.weight", "visual.proj", "text_projection", "logit_scale",
            "transformer.resblocks.0.attn.in_proj_weight"} <= set(sd)  # the layout the brief describes
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "hps.pt")
    ours = load_clip(tmp_path / "hps.pt", cfg)
    ref = transformers.CLIPModel(hf_config(cfg, attn_implementation="eager")).eval()
    ref.load_state_dict(open_clip_to_hf(sd), strict=True)
    px, ids = pixels(cfg), token_ids(cfg.text.vocab_size)
    with torch.no_grad():
        img, txt = oc.encode_image(px), oc.encode_text(ids)
        errs = dict(
            image=maxerr(ours.get_image_features(px), img), text=maxerr(ours.get_text_features(ids), txt),
            logit_scale=maxerr(ours.logit_scale, oc.logit_scale),
            hf_image=maxerr(ref.get_image_features(px).pooler_output, img),
            hf_text=maxerr(ref.get_text_features(ids).pooler_output, txt),
        )
    print(f"OpenCLIP layout vs open_clip.CLIP: {errs}")
    assert max(errs.values()) <= TOL, errs


def test_open_clip_map_round_trip(tmp_path):
    """transformers weights -> OpenCLIP layout (by hand, from open_clip's module definitions) -> open_clip_to_hf."""
    cfg = tiny_config("quick_gelu", image_size=56, patch=14)
    ref = hf_clip(cfg, seed=3)
    sd = ref.state_dict()
    oc_sd = hf_to_open_clip_by_hand(sd)
    assert len(oc_sd) < len(sd)  # q, k, v fused
    back = open_clip_to_hf({**oc_sd, "attn_mask": torch.zeros(77, 77)})  # the buffer older saves hold is dropped
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    torch.save({"state_dict": oc_sd}, tmp_path / "oc.pt")  # no `module.` prefix this time
    ours = load_clip(tmp_path / "oc.pt", cfg)
    px = pixels(cfg)
    with torch.no_grad():
        assert maxerr(ours.get_image_features(px), ref.get_image_features(px).pooler_output) <= TOL
    torch.save({"state_dict": {**oc_sd, "visual.ln_extra.weight": torch.ones(3)}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\s+visual.ln_extra.weight"):
        load_clip(tmp_path / "bad.pt", cfg)


def test_load_clip_folders_and_errors(tmp_path):
    cfg = tiny_config("gelu", image_size=56, patch=14)
    ref = hf_clip(cfg, seed=4)
    ref.save_pretrained(tmp_path / "clip")
    px, ids = pixels(cfg), token_ids(cfg.text.vocab_size)
    ours = load_clip(tmp_path / "clip", cfg, dtype=torch.float32)
    vision = load_clip_vision(tmp_path / "clip", cfg.vision)  # text keys ignored
    with torch.no_grad():
        expected = ref.get_image_features(px).pooler_output
        assert maxerr(ours.get_image_features(px), expected) <= TOL
        assert maxerr(vision(px), expected) <= TOL
        assert maxerr(ours.get_text_features(ids), ref.get_text_features(ids).pooler_output) <= TOL
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    # a folder with only pytorch_model.bin (older hub exports)
    (tmp_path / "bin").mkdir()
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert torch.equal(load_clip(tmp_path / "bin", cfg).visual_projection.weight, ref.visual_projection.weight)
    # config.json disagreeing on something the shapes cannot show
    heads2 = CLIPConfig(cfg.text, CLIPVisionConfig(**{**cfg.vision.__dict__, "heads": 2}))
    with pytest.raises(CheckpointError, match="num_attention_heads: config.json 4 vs preset 2"):
        load_clip(tmp_path / "clip", heads2)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_clip(tmp_path / "bin", "vit_l_14")
    with pytest.raises(CheckpointError, match="not found"):
        load_clip(tmp_path / "nope.pt", cfg)
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        load_clip(tmp_path / "clip", "vit_x")


# ---------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG")])
def test_preprocess_clip_matches_clip_image_processor(mode, fmt):
    proc = transformers.CLIPImageProcessor()  # the PIL backend here (no torchvision): as PickScore's processor
    errs = {}
    for k, (w, h) in enumerate(IMAGE_SIZES):
        img = real_image(w, h, seed=k, mode=mode, fmt=fmt)
        ref = torch.tensor(proc(images=img, return_tensors="np")["pixel_values"][0])
        ours = preprocess_clip(img)
        assert ours.shape == ref.shape == (3, 224, 224)
        errs[(w, h)] = maxerr(ours, ref)
    assert max(errs.values()) <= PIXEL_TOL, errs


def test_preprocess_hps_matches_resize_max_size():
    for k, (w, h) in enumerate(IMAGE_SIZES):
        img = real_image(w, h, seed=k, fmt="JPEG" if k % 2 else "PNG")
        ours = preprocess_hps(img)
        assert ours.shape == (3, 224, 224)
        assert maxerr(ours, normalize_hwc(emulate_resize_max_size(img))) <= PIXEL_TOL, (w, h)
    # wide image: black (pixel 0, i.e. -mean/std after normalization) bands above and below
    x = preprocess_hps(real_image(640, 320))
    black = -torch.tensor(scorers.CLIP_MEAN) / torch.tensor(scorers.CLIP_STD)
    assert torch.allclose(x[:, :56], black[:, None, None].expand(3, 56, 224)) and torch.allclose(x[:, -56:], x[:, :56])
    assert not torch.allclose(x[:, 56:57], black[:, None, None].expand(3, 1, 224))


def test_aesthetic_crop_matches_torchvision_center_crop():
    for k, (w, h) in enumerate(IMAGE_SIZES):
        img = real_image(w, h, seed=k)
        ours = preprocess_clip(img, crop_rounding="round")
        assert maxerr(ours, normalize_hwc(emulate_torchvision_resize_center_crop(img))) <= PIXEL_TOL, (w, h)
    # 224 x 227: extra 3 rows -> transformers crops from row 1, torchvision from row round(1.5) = 2
    img = real_image(224, 227)
    assert maxerr(preprocess_clip(img, crop_rounding="round"), preprocess_clip(img)) > 0.01


# ---------------------------------------------------------------------------------------------- tokenizers


def test_bpe_file_vocabulary_matches_open_clip(open_clip_modules):
    """read_bpe_file on the wheel's bpe_simple_vocab_16e6.txt.gz = SimpleTokenizer's encoder (49408 ids)."""
    _, oc_tok = open_clip_modules
    ref = oc_tok.SimpleTokenizer()
    path = Path(oc_tok.default_bpe())
    tok = load_tokenizer(path, pad_id=0)
    vocab = tok.tokenizer.get_vocab()
    expected = {t: i for t, i in ref.encoder.items() if not t.startswith("<")}
    assert len(vocab) == len(ref.encoder) == 49408
    assert all(vocab[t] == i for t, i in expected.items())
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.sot_token_id, ref.eot_token_id, 0) == (49406, 49407, 0)


def test_hps_tokenization_matches_open_clip(open_clip_modules):
    """HPSv2.1 prompts: OpenCLIP's SimpleTokenizer (context 77, zero padding) on the real vocabulary."""
    _, oc_tok = open_clip_modules
    ref = oc_tok.SimpleTokenizer()
    tok = load_tokenizer(Path(oc_tok.default_bpe()), pad_id=0)
    prompts = PROMPTS + [
        "A Portrait of an Astronaut riding a horse, highly detailed, 8k, trending on ArtStation!!!",
        "don't stop, it's John's car; we'll see - I'm sure (maybe?) 3.14 1999-12-31 #100 50%",
        "Café naïve ÜNÏCÖDÉ cafe\u0301 中文 猫 русский", "wow!hello!! !", "emoji 😀 👍🏽", "word " * 90,
    ]
    ours = tok([scorers.clean_prompt_open_clip(p) for p in prompts])
    expected = ref(prompts)
    bad = [p for p, a, b in zip(prompts, ours, expected) if not torch.equal(a, b)]
    assert not bad, bad
    assert (expected[0, 10:] == 0).all()


# ---------------------------------------------------------------------------------------------- scorer formulas


@pytest.fixture(scope="module")
def toy_bpe(tmp_path_factory):
    return write_toy_bpe(tmp_path_factory.mktemp("bpe"))


def scorer_images(n: int = 5) -> list[Image.Image]:
    sizes = [(512, 512), (640, 480), (300, 500), (224, 224), (1024, 576), (96, 128)]
    return [real_image(*sizes[k % len(sizes)], seed=10 + k) for k in range(n)]


SCORER_PROMPTS = ["a cat", "the dog and a cat", "&lt;the&gt; cat", "dog " * 60, ""]


def test_pickscore_matches_transformers_pipeline(toy_bpe, tmp_path, monkeypatch):
    """PickScore's reference: CLIPProcessor-style inputs, logit_scale.exp() * (text_embs @ image_embs.T)."""
    _, tok_dir, vocab = toy_bpe
    cfg = tiny_config("gelu", vocab=vocab)
    ref = hf_clip(cfg, seed=5)
    ref.save_pretrained(tmp_path / "pickscore")
    monkeypatch.setitem(scorers.PRESETS, "pickscore", cfg)  # the real one is vit_h_14
    images = scorer_images()
    with torch.no_grad():
        px = transformers.CLIPImageProcessor()(images=images, return_tensors="pt")["pixel_values"]
        ids = transformers.CLIPTokenizer.from_pretrained(tok_dir)(
            SCORER_PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt").input_ids
        expected = ref(input_ids=ids, pixel_values=px).logits_per_image.diagonal()
    ours = PickScore.load(tmp_path / "pickscore", tok_dir, batch_size=2).score(images, SCORER_PROMPTS)
    assert ours.shape == (5,) and ours.dtype == torch.float32
    err = maxerr(ours, expected)
    print(f"PickScore vs transformers: {err:.2e} (scores {ours.tolist()})")
    assert err <= TOL * 100  # scores are up to logit_scale.exp() ~ 12 in magnitude here: ~1e-4 abs
    assert ours.std() > 0.1


def test_hpsv21_matches_open_clip(toy_bpe, open_clip_modules, tmp_path, monkeypatch):
    """HPSv2's reference: 100 * normalize(encode_image(ResizeMaxSize image)) . normalize(encode_text(tokens))."""
    gz, _, vocab = toy_bpe
    oc_model, oc_tok = open_clip_modules
    cfg = tiny_config("gelu", vocab=vocab)
    oc = open_clip_model(oc_model, cfg, seed=6)
    torch.save({"state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()}}, tmp_path / "HPS_v2.1.pt")
    monkeypatch.setitem(scorers.PRESETS, "hpsv21", cfg)
    images = scorer_images()
    with torch.no_grad():
        px = torch.stack([normalize_hwc(emulate_resize_max_size(im)) for im in images])
        ids = oc_tok.SimpleTokenizer(bpe_path=str(gz))(SCORER_PROMPTS)
        img = torch.nn.functional.normalize(oc.encode_image(px), dim=-1)
        txt = torch.nn.functional.normalize(oc.encode_text(ids), dim=-1)
        expected = 100 * (img * txt).sum(-1)
    ours = HPSv21.load(tmp_path / "HPS_v2.1.pt", gz, batch_size=3).score(images, SCORER_PROMPTS)
    err = maxerr(ours, expected)
    print(f"HPSv2.1 vs open_clip: {err:.2e} (scores {ours.tolist()})")
    assert err <= TOL * 100  # scores up to 100 in magnitude: ~1e-4 abs
    assert ours.std() > 0.1


def test_hpsv21_matches_transformers_without_open_clip(toy_bpe, tmp_path, monkeypatch):
    """The same formula with transformers as the model oracle (runs even where open_clip cannot)."""
    gz, tok_dir, vocab = toy_bpe
    cfg = tiny_config("gelu", vocab=vocab)
    ref = hf_clip(cfg, seed=7)
    torch.save({"state_dict": hf_to_open_clip_by_hand(ref.state_dict())}, tmp_path / "hps.pt")
    monkeypatch.setitem(scorers.PRESETS, "hpsv21", cfg)
    images = scorer_images(3)
    prompts = SCORER_PROMPTS[:3]
    with torch.no_grad():
        px = torch.stack([normalize_hwc(emulate_resize_max_size(im)) for im in images])
        ids = transformers.CLIPTokenizer.from_pretrained(tok_dir)(
            [" ".join(p.replace("&lt;", "<").replace("&gt;", ">").split()) for p in prompts],
            padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        img = torch.nn.functional.normalize(ref.get_image_features(px).pooler_output, dim=-1)
        txt = torch.nn.functional.normalize(ref.get_text_features(ids).pooler_output, dim=-1)
    ours = HPSv21.load(tmp_path / "hps.pt", gz).score(images, prompts)
    assert maxerr(ours, 100 * (img * txt).sum(-1)) <= TOL * 100


def test_aesthetic_matches_independent_computation(tmp_path, monkeypatch):
    """improved-aesthetic-predictor: MLP(l2-normalized CLIP image embedding) with numpy matmuls."""
    cfg = tiny_config("quick_gelu", proj=768)
    ref = hf_clip(cfg, seed=8)
    ref.save_pretrained(tmp_path / "clip-l")
    head = randomize_(RewardMLP(), seed=9)
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert sorted(head.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("bias", "weight")]
    images = scorer_images()
    with torch.no_grad():
        px = torch.stack([normalize_hwc(emulate_torchvision_resize_center_crop(im)) for im in images])
        emb = ref.get_image_features(px).pooler_output.double().numpy()
    x = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    sd = {k: v.double().numpy() for k, v in head.state_dict().items()}
    for i in (0, 2, 4, 6, 7):  # no activations between the layers
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    ours = Aesthetic(load_clip_vision(tmp_path / "clip-l", cfg.vision), head.eval(), batch_size=2).score(
        images, [""] * len(images))
    err = maxerr(ours, x[:, 0])
    print(f"Aesthetic vs numpy: {err:.2e} (scores {ours.tolist()})")
    assert err <= TOL and ours.std() > 1e-3
    monkeypatch.setitem(scorers.PRESETS, "aesthetic", cfg)  # the real one is vit_l_14
    loaded = Aesthetic.load(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", tmp_path / "clip-l", batch_size=4)
    assert maxerr(loaded.score(images, SCORER_PROMPTS), ours) <= TOL  # prompts are ignored


def test_score_checks_lengths_and_batching(toy_bpe, tmp_path):
    _, tok_dir, vocab = toy_bpe
    cfg = tiny_config("gelu", vocab=vocab)
    model = CLIPModel(cfg)
    load_into(model, hf_clip(cfg, seed=11).state_dict())
    images = scorer_images()
    one = PickScore(model.eval(), load_tokenizer(tok_dir), batch_size=1).score(images, SCORER_PROMPTS)
    many = PickScore(model.eval(), load_tokenizer(tok_dir), batch_size=64).score(images, SCORER_PROMPTS)
    assert maxerr(one, many) <= TOL
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        PickScore(model, load_tokenizer(tok_dir)).score(images, SCORER_PROMPTS[:4])
    assert PickScore(model, load_tokenizer(tok_dir)).score([], []).shape == (0,)
