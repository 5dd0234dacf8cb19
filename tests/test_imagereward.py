"""eval.t2i.imagereward against transformers' BLIP towers and BERT tokenizers (tiny random configs).

Oracles: `BlipTextModel` (transformers' port of BLIP's med.py BertModel; built with is_decoder=True so
its layers get cross-attention, run with is_decoder=False, i.e. bidirectionally, as ImageReward does),
`BlipVisionModel` (same pre-LN ViT with fused qkv as BLIP's timm ViT; only the names differ), and
`BertTokenizerLegacy` (the pure-Python BertTokenizer ImageReward ran with) plus the fast `BertTokenizer`.
The vocabulary is a small hand-written vocab.txt; if weights/imagereward/vocab.txt exists the
tokenizer is also checked on the real bert-base-uncased vocabulary.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transformers
from eval.t2i.imagereward import (
    IGNORED_KEYS,
    PRESETS,
    BertTokenizer,
    ImageRewardConfig,
    ImageRewardModel,
    ImageReward,
    preprocess,
    read_vocab,
)
from eval.t2i.scorers import RewardMLP
from npo_min.checkpoint import CheckpointError, load_into
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

TOL = 1e-5  # max abs error vs transformers in float32
REAL_VOCAB = Path(__file__).resolve().parents[1] / "weights" / "imagereward" / "vocab.txt"

# A small WordPiece vocabulary: the special tokens first as in BERT, then punctuation, digits, letters
# and their ## continuations (so almost every ASCII word splits), some whole words and prefixes
# (longest match first), a few CJK characters (others become [UNK]).
VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    + list("0123456789") + [f"##{d}" for d in "0123456789"]
    + list("abcdefghijklmnopqrstuvwxyz") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    + ["a", "photo", "of", "an", "astro", "##naut", "astronaut", "riding", "horse", "on", "mars", "cafe",
       "creme", "brulee", "the", "cat", "dog", "in", "at", "night", "##s", "##ing", "##ed", "##ly", "un",
       "##believ", "##able", "well", "known", "4k", "trending", "art", "##station", "super", "##cal",
       "猫", "東", "京", "ω", "##ω", "ε", "##ε", "##γ", "##α", "##μ"]
)
VOCAB = list(dict.fromkeys(VOCAB))  # "a" appears twice above; ids stay line numbers of the written file
TINY = ImageRewardConfig(
    image_size=32, patch_size=8, vision_width=48, vision_layers=2, vision_heads=4, vision_mlp_width=192,
    vocab_size=len(VOCAB) + 2, text_width=64, text_layers=2, text_heads=4, text_mlp_width=128,
    max_positions=40, head_widths=(96, 32, 16, 8),
)
PROMPTS = [
    "A photo of an astronaut riding a horse on Mars, 4k, trending on ArtStation!!",
    "Café crème brûlée, naïve résumé — Ångström",
    "一只猫 sitting in 東京 at night",
    "don't   stop\tbelievin'\nnow UNBELIEVABLY",
    "",
    "   ",
    "STRAßE über Ωμέγα ÉCOLE",
    "emoji 🐱🚀 and ☃ snowman",
    "[SEP] literal [ENC] and [DEC] and [cls] [CLS] [MASK]",
    "x" * 101,  # longer than WordPiece's 100 characters: [UNK]
    "x" * 100,
    "supercalifragilistic well-known e-mail's",
    "a " * 50,  # truncated to 35 tokens
    "hello\x00world\u200bzero\ufeffwidth \u00a0nbsp",
    "3.14159 $100 #hashtag @user (parens) [brackets] {braces} ##s",
    "İstanbul Kraków Øresund Œuvre ﬁligree ｆｕｌｌｗｉｄｔｈ",
    "\u0301combining first, tab\u3000ideographic space",
    "The quick brown fox jumps over the lazy dog " * 3,
]


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough for non-uniform attention and non-trivial LayerNorm affines."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name.lower() and name.endswith("weight")
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if is_norm else 0.0))
    return model


def maxerr(a, b):
    return (a - b).abs().max().item()


def hf_text_model(cfg: ImageRewardConfig) -> transformers.BlipTextModel:
    hcfg = transformers.BlipTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, encoder_hidden_size=cfg.vision_width,
        intermediate_size=cfg.text_mlp_width, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_positions,
        layer_norm_eps=cfg.text_eps, hidden_act="gelu", is_decoder=True,  # is_decoder: build crossattention
        bos_token_id=None, eos_token_id=None, sep_token_id=None, pad_token_id=0,
    )
    return transformers.BlipTextModel(hcfg, add_pooling_layer=False).eval()


def hf_vision_model(cfg: ImageRewardConfig) -> transformers.BlipVisionModel:
    hcfg = transformers.BlipVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp_width, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        layer_norm_eps=cfg.vision_eps, hidden_act="gelu",
    )
    return transformers.BlipVisionModel(hcfg).eval()


def vision_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers BlipVisionModel names -> BLIP's timm ViT names (`blip.visual_encoder.*`)."""
    fixed = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
             "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
             "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
             "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    parts = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
             "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out = {}
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        _, _, i, rest = k.split(".", 3)  # encoder.layers.{i}.{rest}
        module, param = rest.rsplit(".", 1)
        out[f"blocks.{i}.{parts[module]}.{param}"] = v
    return out


@pytest.fixture(scope="module")
def towers():
    """(transformers vision, transformers text, our ImageRewardModel) with identical random weights."""
    vref = randomize_(hf_vision_model(TINY), seed=1)
    tref = randomize_(hf_text_model(TINY), seed=2)
    head = randomize_(RewardMLP(TINY.text_width, TINY.head_widths), seed=3)
    model = ImageRewardModel(TINY).eval()
    sd = {f"blip.visual_encoder.{k}": v for k, v in vision_to_official(vref.state_dict()).items()}
    sd |= {f"blip.text_encoder.{k}": v for k, v in tref.state_dict().items()}
    sd |= {f"mlp.{k}": v for k, v in head.state_dict().items()}
    load_into(model, sd, "tiny ImageReward")
    return vref, tref, model, sd


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(seed))


def text_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with [CLS] first and padding of varied length (attention_mask 0 on the padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY.vocab_size, (n, TINY.max_length), generator=g)
    ids[:, 0] = VOCAB.index("[CLS]")
    mask = torch.ones_like(ids)
    for row, length in enumerate([TINY.max_length, 2, 9, 20][:n]):
        ids[row, length:], mask[row, length:] = 0, 0
    return ids, mask


def write_vocab(folder: Path, tokens=VOCAB) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def blip_tokenizers(vocab_file: Path):
    """BLIP's init_tokenizer on top of the slow (what ImageReward ran) and fast transformers tokenizers."""
    out = []
    for tok in (BertTokenizerLegacy(vocab_file=str(vocab_file)), transformers.BertTokenizer(vocab=str(vocab_file))):
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        out.append(tok)
    return out


# ---------------------------------------------------------------------------------------------- towers


def test_vision_tower_matches_blip_vision_model(towers):
    vref, _, model, _ = towers
    x = pixels(3)
    with torch.no_grad():
        ref = vref(pixel_values=x).last_hidden_state  # post_layernorm over all tokens, as BLIP's `norm`
        ours = model.blip.visual_encoder(x)
    assert ours.shape == (3, (TINY.image_size // TINY.patch_size) ** 2 + 1, TINY.vision_width)
    assert maxerr(ours, ref) <= TOL


def test_text_tower_matches_blip_text_model(towers):
    vref, tref, model, _ = towers
    ids, mask = text_inputs(4)
    image_embeds = torch.randn(4, 17, TINY.vision_width, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = tref(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                   encoder_attention_mask=torch.ones(4, 17, dtype=torch.long), is_decoder=False).last_hidden_state
        ours = model.blip.text_encoder(ids, mask, image_embeds)
        other = model.blip.text_encoder(ids, mask, image_embeds.flip(0))
    assert maxerr(ours, ref) <= TOL
    assert maxerr(ours[:, 0], other[:, 0]) > 1e-2  # the [CLS] feature does depend on the image


def test_text_tower_ignores_padding_and_is_bidirectional(towers):
    _, _, model, _ = towers
    ids, mask = text_inputs(4)
    image_embeds = torch.randn(4, 17, TINY.vision_width, generator=torch.Generator().manual_seed(6))
    changed = ids.clone()
    changed[mask == 0] = 7  # other ids under the padding: no effect on real tokens
    later = ids.clone()
    later[:, 1] = 9  # a later real token changes the first token's feature (no causal mask)
    with torch.no_grad():
        h = model.blip.text_encoder(ids, mask, image_embeds)
        h_pad = model.blip.text_encoder(changed, mask, image_embeds)
        h_later = model.blip.text_encoder(later, mask, image_embeds)
    real = mask.bool()
    assert maxerr(h[real], h_pad[real]) <= 1e-6
    assert maxerr(h[:, 0], h_later[:, 0]) > 1e-2


def test_reward_matches_composed_oracle(towers):
    """Whole model vs transformers towers + the head written out as five matrix products."""
    vref, tref, model, sd = towers
    x = pixels(4, seed=7)
    ids, mask = text_inputs(4, seed=8)
    with torch.no_grad():
        image_embeds = vref(pixel_values=x).last_hidden_state
        feats = tref(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                     encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
                     is_decoder=False).last_hidden_state[:, 0]
        r = feats
        for i in (0, 2, 4, 6, 7):
            r = r @ sd[f"mlp.layers.{i}.weight"].T + sd[f"mlp.layers.{i}.bias"]
        expected = (r.squeeze(1) - 0.16717362830052426) / 1.0333394966054072
        got = model(x, ids, mask)
    assert got.shape == (4,) and got.dtype == torch.float32
    assert maxerr(got, expected) <= TOL * max(1.0, expected.abs().max().item())


def test_head_is_affine_with_official_keys():
    head = randomize_(RewardMLP(768), seed=4).eval()
    assert [k for k in head.state_dict() if k.endswith("weight")] == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
    assert [tuple(head.state_dict()[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 768, generator=g), torch.randn(5, 768, generator=g)
    with torch.no_grad():  # no activation anywhere: head(0.3 a + 0.7 b) = 0.3 head(a) + 0.7 head(b)
        lhs, rhs = head(0.3 * a + 0.7 * b), 0.3 * head(a) + 0.7 * head(b)
    assert maxerr(lhs, rhs) <= 1e-4 * head(a).abs().max().item()


def test_v1_preset_sizes():
    cfg = PRESETS["v1.0"]
    assert (cfg.reward_mean, cfg.reward_std) == (0.16717362830052426, 1.0333394966054072)
    assert (cfg.image_size, cfg.max_length, cfg.vocab_size) == (224, 35, 30524)
    with torch.device("meta"):
        model = ImageRewardModel(cfg)
    sd = model.state_dict()
    n = sum(v.numel() for v in sd.values())
    # 446,206,689 parameters; with ImageReward.pt's unused vision_proj / text_proj (459,264) that is
    # 446,665,953 float32 values = 1.787 GB, the size of the published checkpoint.
    assert n == 446_206_689
    assert sd["blip.visual_encoder.pos_embed"].shape == (1, 197, 1024)
    assert sd["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"].shape == (768, 1024)
    assert sd["blip.text_encoder.embeddings.word_embeddings.weight"].shape == (30524, 768)
    assert not any("token_type" in k or "pooler" in k for k in sd)


def test_tower_input_errors(towers):
    _, _, model, _ = towers
    ids, mask = text_inputs(2)
    emb = torch.zeros(2, 17, TINY.vision_width)
    with pytest.raises(ValueError, match="pixel_values"):
        model.blip.visual_encoder(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="integer"):
        model.blip.text_encoder(ids.float(), mask, emb)
    with pytest.raises(ValueError, match=r"\[0, "):
        model.blip.text_encoder(torch.full_like(ids, TINY.vocab_size), mask, emb)
    with pytest.raises(ValueError, match="max_positions"):
        model.blip.text_encoder(torch.zeros(2, 41, dtype=torch.long), torch.ones(2, 41), emb)
    with pytest.raises(ValueError, match="attention_mask"):
        model.blip.text_encoder(ids, mask[:, :5], emb)
    with pytest.raises(ValueError, match="image_embeds"):
        model.blip.text_encoder(ids, mask, torch.zeros(2, 17, 8))


# ---------------------------------------------------------------------------------------------- tokenizer


def check_tokenizer(vocab_file: Path):
    ours = BertTokenizer(read_vocab(vocab_file), max_length=35)
    ids, mask = ours(PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), 35) and ids.dtype == torch.int64
    for ref in blip_tokenizers(vocab_file):
        assert ref.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [ours.dec_id, ours.enc_id]
        out = ref(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        for i, p in enumerate(PROMPTS):
            assert ids[i].tolist() == out.input_ids[i].tolist(), (type(ref).__name__, p)
            assert mask[i].tolist() == out.attention_mask[i].tolist(), (type(ref).__name__, p)
    return ours, ids, mask


def test_tokenizer_matches_transformers(tmp_path):
    ours, ids, mask = check_tokenizer(write_vocab(tmp_path))
    assert (ours.dec_id, ours.enc_id, ours.vocab_size) == (len(VOCAB), len(VOCAB) + 1, len(VOCAB) + 2)
    cls, sep, unk = VOCAB.index("[CLS]"), VOCAB.index("[SEP]"), VOCAB.index("[UNK]")
    assert (ids[:, 0] == cls).all()  # ImageReward keeps [CLS] first (no [ENC] swap)
    # the test's coverage, so the comparison above is not vacuous
    assert mask.sum(1).max() == 35 and mask[PROMPTS.index("")].tolist() == [1, 1] + [0] * 33
    assert (ids == unk).any() and (ids == ours.enc_id).any() and (ids == ours.dec_id).any()
    assert ids[PROMPTS.index("x" * 101), 1] == unk and ids[PROMPTS.index("x" * 100), 1] == VOCAB.index("x")
    assert ids[0, :4].tolist() == [cls, VOCAB.index("a"), VOCAB.index("photo"), VOCAB.index("of")]
    assert ids[PROMPTS.index("a " * 50), 34] == sep


@pytest.mark.skipif(not REAL_VOCAB.is_file(), reason=f"no real bert-base-uncased vocab at {REAL_VOCAB}")
def test_tokenizer_matches_transformers_real_vocab():
    ours, ids, _ = check_tokenizer(REAL_VOCAB)
    assert (ours.dec_id, ours.enc_id) == (30522, 30523)
    assert ids[0, 0] == 101


def test_tokenizer_rejects_bad_vocab():
    with pytest.raises(ValueError, match=r"\[SEP\]"):
        BertTokenizer(["[PAD]", "[UNK]", "[CLS]", "[MASK]", "a"])
    with pytest.raises(ValueError, match=r"\[ENC\]"):
        BertTokenizer(VOCAB + ["[ENC]"])
    with pytest.raises(ValueError, match="duplicate"):
        BertTokenizer(VOCAB + ["a"])


def test_read_vocab_keeps_line_numbers(tmp_path):
    path = write_vocab(tmp_path, ["[PAD]", " ", "\\", "a", "##\\"])
    assert read_vocab(path) == ["[PAD]", " ", "\\", "a", "##\\"]
    (tmp_path / "dup.txt").write_text("a\nb\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match="more than once"):
        read_vocab(tmp_path / "dup.txt")


# ---------------------------------------------------------------------------------------------- preprocessing


def random_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def normalized(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    return (x - mean) / std


# (w, h) -> resize size and crop box, worked out by hand from torchvision's Resize(224) + CenterCrop(224):
# long side int(224 * long / short); offsets round((new - 224) / 2), Python rounding (56.5 -> 56).
CROPS = {
    (301, 200): ((337, 224), (56, 0, 280, 224)),
    (200, 301): ((224, 337), (0, 56, 224, 280)),
    (227, 100): ((508, 224), (142, 0, 366, 224)),
    (225, 224): ((225, 224), (0, 0, 224, 224)),
    (512, 512): ((224, 224), (0, 0, 224, 224)),
}


@pytest.mark.parametrize("size", list(CROPS))
def test_preprocess_resize_and_center_crop(size):
    img = random_image(*size)
    new_size, box = CROPS[size]
    expected = normalized(img.resize(new_size, Image.BICUBIC).crop(box))
    got = preprocess(img)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    assert maxerr(got, expected) <= 1e-6


def test_preprocess_identity_size_and_modes():
    img = random_image(224, 224, seed=1)
    assert maxerr(preprocess(img), normalized(img)) <= 1e-6  # no resampling at 224 x 224
    gray = preprocess(random_image(100, 150, "L", seed=2))
    assert gray.shape == (3, 224, 224)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    unnorm = gray * std + mean
    assert maxerr(unnorm[0], unnorm[1]) <= 1e-5 and maxerr(unnorm[0], unnorm[2]) <= 1e-5
    rgba = random_image(300, 300, "RGBA", seed=3)
    expected = normalized(rgba.resize((224, 224), Image.BICUBIC).convert("RGB"))  # RGB after resampling
    assert maxerr(preprocess(rgba), expected) <= 1e-6
    assert preprocess(random_image(64, 48), size=32).shape == (3, 32, 32)
    with pytest.raises(TypeError, match="PIL"):
        preprocess(np.zeros((8, 8, 3), np.uint8))


# ---------------------------------------------------------------------------------------------- loading


def write_checkpoint(folder: Path, sd: dict[str, torch.Tensor], extra: bool = True, wrap: bool = False) -> Path:
    """ImageReward.pt as the official package saves it: the module's state dict, plus its unused keys."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = dict(sd)
    if extra:
        sd["blip.vision_proj.weight"] = torch.zeros(8, TINY.vision_width)
        sd["blip.vision_proj.bias"] = torch.zeros(8)
        sd["blip.text_proj.weight"] = torch.zeros(8, TINY.text_width)
        sd["blip.text_proj.bias"] = torch.zeros(8)
        sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(TINY.max_positions)[None]
    torch.save({"state_dict": sd} if wrap else sd, folder / "ImageReward.pt")
    write_vocab(folder)
    return folder


def test_load_and_score_end_to_end(towers, tmp_path):
    vref, tref, _, sd = towers
    assert set(IGNORED_KEYS) >= {"blip.vision_proj.weight", "blip.text_encoder.embeddings.position_ids"}
    scorer = ImageReward.load(write_checkpoint(tmp_path / "ir", sd), preset=TINY, batch_size=2)
    assert not scorer.model.training and not any(p.requires_grad for p in scorer.model.parameters())
    images = [random_image(40, 40, seed=1), random_image(70, 33, seed=2), random_image(33, 90, "L", seed=3)]
    prompts = PROMPTS[:2] + ["a cat at night"]
    got = scorer.score(images, prompts)

    slow, _ = blip_tokenizers(tmp_path / "ir" / "vocab.txt")
    text = slow(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    x = torch.stack([preprocess(im, TINY.image_size) for im in images])
    with torch.no_grad():
        emb = vref(pixel_values=x).last_hidden_state
        feats = tref(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=emb,
                     encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                     is_decoder=False).last_hidden_state[:, 0]
        r = feats
        for i in (0, 2, 4, 6, 7):
            r = r @ sd[f"mlp.layers.{i}.weight"].T + sd[f"mlp.layers.{i}.bias"]
    expected = (r.squeeze(1) - 0.16717362830052426) / 1.0333394966054072
    assert got.shape == (3,) and maxerr(got, expected) <= TOL * max(1.0, expected.abs().max().item())
    assert got.std() > 1e-3  # different pairs, different scores
    singles = torch.cat([scorer.score([im], [p]) for im, p in zip(images, prompts)])
    assert maxerr(singles, got) <= 1e-5  # batching does not change a pair's score
    assert scorer.score([], []).shape == (0,)

    # the .pt path itself, a 'state_dict' wrapper, and no unused keys all load the same weights
    scorer2 = ImageReward.load(write_checkpoint(tmp_path / "wrapped", sd, extra=False, wrap=True) / "ImageReward.pt",
                               preset=TINY, batch_size=3)
    scorer.batch_size = 3
    assert torch.equal(scorer2.score(images, prompts), scorer.score(images, prompts))


def test_score_errors(towers, tmp_path):
    _, _, _, sd = towers
    scorer = ImageReward.load(write_checkpoint(tmp_path, sd), preset=TINY)
    img = random_image(32, 32)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score([img, img], ["a"])
    with pytest.raises(TypeError, match="PIL"):
        scorer.score([torch.zeros(3, 32, 32)], ["a"])
    with pytest.raises(TypeError, match="str"):
        scorer.score([img], [None])
    scorer.batch_size = 0
    with pytest.raises(ValueError, match="batch_size"):
        scorer.score([img], ["a"])
    with pytest.raises(ValueError, match="batch_size"):
        ImageReward(scorer.model, scorer.tokenizer, batch_size=0)


def test_load_errors(towers, tmp_path):
    _, _, _, sd = towers
    with pytest.raises(CheckpointError, match=r"ImageReward\.pt.*weights/imagereward/ImageReward\.pt"):
        ImageReward.load(tmp_path / "empty", preset=TINY)
    folder = write_checkpoint(tmp_path / "novocab", sd)
    (folder / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match=r"vocab\.txt.*weights/imagereward/vocab\.txt"):
        ImageReward.load(folder, preset=TINY)

    missing = {k: v for k, v in sd.items() if k != "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+blip\.text_encoder\.encoder\.layer\.1\."):
        ImageReward.load(write_checkpoint(tmp_path / "missing", missing), preset=TINY)
    unexpected = {**sd, "blip.itm_head.weight": torch.zeros(2, TINY.text_width)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\s+blip\.itm_head\.weight"):
        ImageReward.load(write_checkpoint(tmp_path / "unexpected", unexpected), preset=TINY)
    with pytest.raises(CheckpointError, match="shape mismatches"):  # a v1.0-sized table in a tiny model
        bad = {**sd, "blip.visual_encoder.pos_embed": torch.zeros(1, 197, TINY.vision_width)}
        ImageReward.load(write_checkpoint(tmp_path / "shape", bad), preset=TINY)

    folder = write_checkpoint(tmp_path / "wrongvocab", sd)
    write_vocab(folder, VOCAB + ["extra"])
    with pytest.raises(CheckpointError, match="word embeddings"):
        ImageReward.load(folder, preset=TINY)
    with pytest.raises(ValueError, match="unknown ImageReward preset"):
        ImageReward.load(folder, preset="v2")


def test_config_validation():
    with pytest.raises(ValueError, match="patch_size"):
        ImageRewardConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="heads"):
        ImageRewardConfig(text_width=65)
    with pytest.raises(ValueError, match="head_widths"):
        ImageRewardConfig(head_widths=(8, 4))
    assert math.isclose(TINY.reward_std, 1.0333394966054072)
