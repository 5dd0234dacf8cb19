"""ImageReward v1.0: a BLIP-based human-preference reward for text-to-image samples.

Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation". The model scores one (image, prompt) pair:

    image (PIL) -> resize shortest side to 224 (bicubic), center crop 224, RGB, CLIP mean/std
        -> BLIP ViT-L/16 `blip.visual_encoder`                  -> (B, 197, 1024) image tokens
    prompt -> bert-base-uncased WordPiece, [CLS] ... [SEP], padded / truncated to 35 tokens
        -> BERT-base `blip.text_encoder` whose every layer also cross-attends to the image tokens
        -> feature of the first token ([CLS])                    -> (B, 768)
        -> `mlp.layers`: Linear 768-1024-128-64-16-1, no activations (dropout only, off at eval):
           scorers.RewardMLP, the same head as the LAION aesthetic predictor's
        -> r, reported as (r - 0.16717362830052426) / 1.0333394966054072.

Modules are named after the official checkpoint `ImageReward.pt` (THUDM/ImageReward), which is a
plain state dict of the ImageReward package's `ImageReward` module, so it loads strictly:

    blip.visual_encoder.{cls_token, pos_embed, patch_embed.proj.{weight,bias}}
    blip.visual_encoder.blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}
    blip.visual_encoder.norm.{weight,bias}
    blip.text_encoder.embeddings.{word_embeddings, position_embeddings, LayerNorm}.*
    blip.text_encoder.encoder.layer.{i}.attention.self.{query,key,value}.*      (self-attention)
    blip.text_encoder.encoder.layer.{i}.attention.output.{dense,LayerNorm}.*
    blip.text_encoder.encoder.layer.{i}.crossattention.self.{query,key,value}.* (key/value: 1024 -> 768)
    blip.text_encoder.encoder.layer.{i}.crossattention.output.{dense,LayerNorm}.*
    blip.text_encoder.encoder.layer.{i}.{intermediate.dense, output.dense, output.LayerNorm}.*
    mlp.layers.{0,2,4,6,7}.{weight,bias}                        (1, 3, 5 are the Dropout slots)

plus IGNORED_KEYS, which inference does not use. The ViT is BLIP's (pre-LayerNorm, fused qkv, exact
GELU, eps 1e-6); the text tower is BLIP's `med.py` BertModel (post-LayerNorm, eps 1e-12, no token-type
embeddings) run bidirectionally. The WordPiece tokenizer (bert-base-uncased `vocab.txt`, 30522 lines,
plus BLIP's `[DEC]` / `[ENC]` as ids 30522 / 30523) keeps [CLS] first, as ImageReward's `score` does.

Use:  scorer = ImageReward.load("weights/imagereward");  scorer.score(images, prompts) -> (N,)
(the Scorer interface of scorers.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn

from eval.t2i import WEIGHTS_DIR
from eval.t2i.scorers import RewardMLP, Scorer, resize_shortest_center_crop, to_normalized_tensor
from npo_min.checkpoint import CheckpointError, build_loaded, load_state_dict

# Config


@dataclass(frozen=True)
class ImageRewardConfig:
    """Sizes of ImageReward. Defaults: v1.0 (BLIP ViT-L/16 at 224 px + BLIP's BERT-base med_config)."""

    # vision tower: BLIP create_vit('large', 224)
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp_width: int = 4096  # mlp_ratio 4
    vision_eps: float = 1e-6
    # text tower: med_config.json (BertConfig), encoder_width = vision_width
    vocab_size: int = 30524  # bert-base-uncased's 30522 + [DEC] + [ENC]
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp_width: int = 3072
    max_positions: int = 512
    text_eps: float = 1e-12
    max_length: int = 35  # tokenizer: padding="max_length", truncation=True, max_length=35
    # reward head and the normalisation of its output
    head_widths: tuple[int, ...] = (1024, 128, 64, 16)
    reward_mean: float = 0.16717362830052426
    reward_std: float = 1.0333394966054072

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
        for width, heads, what in ((self.vision_width, self.vision_heads, "vision"),
                                   (self.text_width, self.text_heads, "text")):
            if width % heads:
                raise ValueError(f"{what} width {width} is not divisible by its {heads} heads.")
        if len(self.head_widths) != 4:
            raise ValueError(f"head_widths must hold 4 widths (official layout mlp.layers.{{0,2,4,6,7}}), "
                             f"got {self.head_widths}.")
        if not 2 <= self.max_length <= self.max_positions:
            raise ValueError(f"max_length must be in [2, max_positions={self.max_positions}], got {self.max_length}.")


PRESETS: dict[str, ImageRewardConfig] = {"v1.0": ImageRewardConfig()}


def get_config(preset: str | ImageRewardConfig) -> ImageRewardConfig:
    """A preset name from PRESETS or a config passed through. Raises ValueError on an unknown name."""
    if isinstance(preset, ImageRewardConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown ImageReward preset {preset!r}: choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]


# Vision tower: BLIP's ViT (`blip.visual_encoder`)


class ViTAttention(nn.Module):
    """Self-attention with one fused `qkv` projection (output channels ordered q, k, v; heads inside each)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(rearrange(y, "b h n d -> b n (h d)"))


class ViTMlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = ViTMlp(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: a conv with kernel = stride = patch size (`patch_embed.proj`)."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, H/p * W/p, D), patches in row-major order."""
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class VisionTransformer(nn.Module):
    """`blip.visual_encoder`: [class token, patches] + learned positions -> blocks -> final LayerNorm."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.image_size = cfg.image_size
        n_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.vision_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, cfg.vision_width))
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.vision_width, cfg.vision_heads, cfg.vision_mlp_width, cfg.vision_eps)
            for _ in range(cfg.vision_layers)
        )
        self.norm = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, 3, S, S) normalised images, S = image_size -> (B, 1 + (S/p)^2, vision_width).

        Raises:
            ValueError: wrong shape (the position table is fixed to S x S inputs).
        """
        s = self.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be (B, 3, {s}, {s}), got {tuple(pixel_values.shape)}.")
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# Text tower: BLIP's med.py BertModel with cross-attention (`blip.text_encoder`)


class BertEmbeddings(nn.Module):
    """Word + learned absolute position embeddings, then LayerNorm (med.py has no token-type embeddings)."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, L) -> (B, L, D)."""
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[: input_ids.shape[1]]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Multi-head attention (`*.self`): queries from the text, keys / values from `context`.

    For self-attention context is the text itself (kv_width = width); for cross-attention it is
    the image tokens (kv_width = vision width, 1024 in v1.0).
    """

    def __init__(self, width: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, L, D), context: (B, M, kv_width), mask: additive, broadcastable to (B, H, L, M) -> (B, L, D)."""
        q = rearrange(self.query(x), "b l (h d) -> b h l d", h=self.heads)
        k = rearrange(self.key(context), "b m (h d) -> b h m d", h=self.heads)
        v = rearrange(self.value(context), "b m (h d) -> b h m d", h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return rearrange(y, "b h l d -> b l (h d)")


class BertAddNorm(nn.Module):
    """`*.output`: LayerNorm(residual + dense(x)) (post-LN BERT; dropout sits before the sum in training)."""

    def __init__(self, in_width: int, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class BertAttention(nn.Module):
    """`attention` / `crossattention`: BertSelfAttention (`self`) followed by BertAddNorm (`output`)."""

    def __init__(self, width: int, heads: int, kv_width: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(width, heads, kv_width)
        self.output = BertAddNorm(width, width, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class BertIntermediate(nn.Module):
    """`intermediate`: dense -> exact GELU."""

    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.dense = nn.Linear(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Self-attention over the text, cross-attention to the image tokens, feed-forward; each post-LN."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        w, eps = cfg.text_width, cfg.text_eps
        self.attention = BertAttention(w, cfg.text_heads, w, eps)
        self.crossattention = BertAttention(w, cfg.text_heads, cfg.vision_width, eps)
        self.intermediate = BertIntermediate(w, cfg.text_mlp_width)
        self.output = BertAddNorm(cfg.text_mlp_width, w, eps)

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D); image_embeds: (B, M, vision_width); text_mask: (B, 1, 1, L) additive."""
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image_embeds, None)  # every image token is attended (all-ones mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """`encoder.layer.{i}`."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.text_layers))


class BertModel(nn.Module):
    """`blip.text_encoder`: bidirectional BERT whose layers cross-attend to image tokens (no pooler)."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: torch.Tensor) -> torch.Tensor:
        """Text features conditioned on the image.

        Args:
            input_ids: (B, L) integer ids in [0, vocab_size), L <= max_positions.
            attention_mask: (B, L), 1 for real tokens, 0 for padding (padded keys are not attended).
            image_embeds: (B, M, vision_width), the visual encoder's output.

        Returns:
            (B, L, text_width) `last_hidden_state`.

        Raises:
            ValueError: wrong shapes, dtype or id range.
        """
        cfg, ids = self.cfg, input_ids
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be a (B, L) integer tensor, got {ids.dtype} {tuple(ids.shape)}.")
        if ids.shape[1] > cfg.max_positions:
            raise ValueError(f"input_ids has {ids.shape[1]} tokens, more than max_positions={cfg.max_positions}.")
        if ids.numel() and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{ids.min()}, {ids.max()}].")
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(ids.shape)}.")
        if image_embeds.ndim != 3 or image_embeds.shape[0] != ids.shape[0] or image_embeds.shape[2] != cfg.vision_width:
            raise ValueError(f"image_embeds must be ({ids.shape[0]}, M, {cfg.vision_width}), "
                             f"got {tuple(image_embeds.shape)}.")
        x = self.embeddings(ids)
        # med.py's extended mask: 0 where attended, -10000 at padding, added to the scores.
        text_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        image_embeds = image_embeds.to(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, image_embeds, text_mask)
        return x


# The whole model


class BLIP(nn.Module):
    """`blip`: the two towers ImageReward uses from BLIP_Pretrain."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.visual_encoder = VisionTransformer(cfg)
        self.text_encoder = BertModel(cfg)


class ImageRewardModel(nn.Module):
    """ImageReward: (pixel_values, input_ids, attention_mask) -> normalised reward (B,)."""

    def __init__(self, cfg: ImageRewardConfig = PRESETS["v1.0"]):
        super().__init__()
        self.cfg = cfg
        self.blip = BLIP(cfg)
        self.mlp = RewardMLP(cfg.text_width, cfg.head_widths)

    def features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
        """The [CLS] (first-token) feature of the image-conditioned text encoder: (B, text_width)."""
        image_embeds = self.blip.visual_encoder(pixel_values)
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_embeds)
        return hidden[:, 0]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) in float32: (mlp(features) - reward_mean) / reward_std.

        pixel_values: (B, 3, S, S) from `preprocess`; input_ids, attention_mask: (B, max_length) from
        the tokenizer. The values are standardised with the raw reward's mean and std over ImageReward's
        own data, so most lie within a few units of 0 (SD1.5 averages about 0.11 in Self-NPO Table 2).
        """
        raw = self.mlp(self.features(pixel_values, input_ids, attention_mask)).float()  # (B,)
        return (raw - self.cfg.reward_mean) / self.cfg.reward_std


# Tokenizer

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
DEC, ENC = "[DEC]", "[ENC]"  # added by BLIP's init_tokenizer: bos_token, additional_special_tokens


def read_vocab(path: str | os.PathLike) -> list[str]:
    """vocab.txt -> tokens, line n holding id n (as transformers' load_vocab: text mode, '\\n' stripped).

    Raises:
        ValueError: a token occurs twice (ids would no longer be line numbers).
    """
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise ValueError(f"{path}: token {dup!r} occurs more than once.")
    return tokens


class BertTokenizer:
    """bert-base-uncased WordPiece as BLIP sets it up: `tokenizer(prompts) -> (input_ids, attention_mask)`.

    Pipeline (BERT's BasicTokenizer + WordpieceTokenizer): drop control characters and map whitespace
    to spaces, put spaces around CJK ideographs, lowercase, NFD and strip accents; split on whitespace
    and around each punctuation character; WordPiece each word greedily longest-match-first with `##`
    continuations (a word with no full split, or longer than 100 characters, becomes [UNK]). Then
    [CLS] ... [SEP], truncated to max_length keeping [SEP], padded with [PAD] (id 0) to max_length.
    [PAD] [UNK] [CLS] [SEP] [MASK] [DEC] [ENC] are special: their literal, case-sensitive text in a
    prompt maps to their id. [DEC] and [ENC] get ids len(vocab) and len(vocab) + 1.

    Args:
        vocab: the tokens of vocab.txt in id order (`read_vocab`).
        max_length: 35 for ImageReward.

    Raises:
        ValueError: duplicate tokens, a required special token is missing, or [DEC] / [ENC] is already in it.
    """

    def __init__(self, vocab: list[str], max_length: int = 35):
        ids = {t: i for i, t in enumerate(vocab)}
        if len(ids) != len(vocab):
            raise ValueError("the vocabulary has duplicate tokens: ids must be line numbers of vocab.txt.")
        for tok in (PAD, UNK, CLS, SEP, MASK):
            if tok not in ids:
                raise ValueError(f"special token {tok} is not in the vocabulary.")
        for tok in (DEC, ENC):
            if tok in ids:
                raise ValueError(f"{tok} is already in the vocabulary: BLIP adds it after the last token.")
        self.max_length = max_length
        self.vocab_size = len(vocab) + 2  # rows of the word-embedding table
        self.dec_id, self.enc_id = len(vocab), len(vocab) + 1

        tk = Tokenizer(models.WordPiece(vocab=ids, unk_token=UNK, max_input_chars_per_word=100))
        tk.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t in (PAD, UNK, CLS, SEP, MASK, DEC, ENC)])
        assert (tk.token_to_id(DEC), tk.token_to_id(ENC)) == (self.dec_id, self.enc_id)
        tk.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", special_tokens=[(CLS, ids[CLS]), (SEP, ids[SEP])])
        tk.enable_truncation(max_length)  # counts [CLS] and [SEP]
        tk.enable_padding(length=max_length, pad_id=ids[PAD], pad_token=PAD)
        self.tokenizer = tk

    def __call__(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One string or B strings -> input_ids (B, max_length) int64, attention_mask (B, max_length) int64."""
        if isinstance(prompts, str):
            prompts = [prompts]
        enc = self.tokenizer.encode_batch(list(prompts))
        shape = (len(prompts), self.max_length)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64).reshape(shape)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64).reshape(shape)
        return ids, mask


# Image preprocessing

def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """PIL image -> (3, size, size) float32, exactly as ImageReward's torchvision transform:

    Resize(size, BICUBIC) (shortest side), CenterCrop(size) (offsets rounded with Python's round),
    convert("RGB") (after the crop, as upstream), ToTensor, Normalize(CLIP mean, std).

    Raises:
        TypeError: not a PIL image.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}.")
    return to_normalized_tensor(resize_shortest_center_crop(image, size, crop_rounding="round").convert("RGB"))


# Loading and scoring

DEFAULT_DIR = WEIGHTS_DIR / "imagereward"  # where weights/README.md puts it
CHECKPOINT_NAME = "ImageReward.pt"
VOCAB_NAME = "vocab.txt"
# Keys of ImageReward.pt that inference does not use: BLIP_Pretrain's contrastive projections (only
# its BLIP-score baseline uses them) and med.py's persistent `position_ids` buffer (= arange(512)).
IGNORED_KEYS = (
    "blip.vision_proj.weight", "blip.vision_proj.bias",
    "blip.text_proj.weight", "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)


def to_official_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one key map: drop IGNORED_KEYS (if present); everything else must already be official."""
    return {k: v for k, v in sd.items() if k not in IGNORED_KEYS}


class ImageReward(Scorer):
    """A loaded ImageReward (the Scorer interface): `model` (eval, no grad), the tokenizer, preprocessing.

    score(images, prompts) -> (N,) float32 rewards of the (images[i], prompts[i]) pairs, `batch_size` at a time.
    """

    def __init__(self, model: ImageRewardModel, tokenizer: BertTokenizer, batch_size: int = 16):
        super().__init__(model, batch_size)
        self.tokenizer = tokenizer

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([preprocess(im, self.model.cfg.image_size) for im in images])  # (B, 3, S, S)
        ids, mask = self.tokenizer(prompts)  # (B, max_length) each
        return self.model(pixels.to(self.device), ids.to(self.device), mask.to(self.device))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             batch_size: int = 16, preset: str | ImageRewardConfig | None = None) -> "ImageReward":
        """Build ImageReward, strictly load `ImageReward.pt` and the tokenizer from `vocab.txt`.

        Args:
            path: a folder holding ImageReward.pt (THUDM/ImageReward) and vocab.txt (bert-base-uncased,
                30522 lines), or the .pt file itself with vocab.txt beside it. The .pt is read with
                torch.load(weights_only=True); a top-level 'state_dict' entry is unwrapped.
            device: where the model runs.
            dtype: parameter dtype (float32 reproduces the published numbers; rewards are returned in float32).
            batch_size: pairs per forward pass.
            preset: a name from PRESETS or an ImageRewardConfig; None: "v1.0".

        Raises:
            CheckpointError: a missing file (the message says where to put it), missing / unexpected keys,
                wrong shapes, or a vocab.txt whose size does not fit the word-embedding table.
            ValueError: unknown preset, batch_size < 1.
        """
        preset = "v1.0" if preset is None else preset
        cfg = get_config(preset)
        path = Path(path)
        ckpt = path if path.suffix in (".pt", ".pth") else path / CHECKPOINT_NAME
        vocab_path = ckpt.parent / VOCAB_NAME
        if not ckpt.is_file():
            raise CheckpointError(
                f"ImageReward checkpoint not found: {ckpt}. Put ImageReward.pt (THUDM/ImageReward) at "
                f"{DEFAULT_DIR / CHECKPOINT_NAME}, or pass the folder that holds it.")
        if not vocab_path.is_file():
            raise CheckpointError(
                f"tokenizer vocabulary not found: {vocab_path}. Put bert-base-uncased's vocab.txt (30522 lines) "
                f"next to the checkpoint, e.g. {DEFAULT_DIR / VOCAB_NAME}.")
        tokenizer = BertTokenizer(read_vocab(vocab_path), max_length=cfg.max_length)
        if tokenizer.vocab_size != cfg.vocab_size:
            raise CheckpointError(
                f"{vocab_path} has {tokenizer.vocab_size - 2} tokens; with [DEC] and [ENC] that is "
                f"{tokenizer.vocab_size}, but the model has {cfg.vocab_size} word embeddings: "
                "use bert-base-uncased's vocab.txt (30522 lines).")
        sd = to_official_keys(load_state_dict(ckpt))
        what = f"ImageReward ({preset if isinstance(preset, str) else 'custom config'})"
        model = build_loaded(ImageRewardModel, cfg, sd, dtype, what).to(device).requires_grad_(False)
        return cls(model, tokenizer, batch_size)
