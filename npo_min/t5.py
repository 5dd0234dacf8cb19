"""T5 v1.1 text encoder (the encoder half only) and its SentencePiece-Unigram tokenizer.

CogVideoX conditions on the last hidden state of google's T5 v1.1 XXL encoder (Raffel et al. 2020,
"Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"; v1.1 = gated-GELU
FFN, no parameter sharing between embedding and classifier). Modules are named after transformers'
`T5EncoderModel`, so a diffusers `text_encoder/` folder (sharded `model-0000x-of-0000y.safetensors`
plus `model.safetensors.index.json`) loads strictly:

    shared.weight                                         (vocab, d_model) token embedding
    encoder.embed_tokens.weight                           the same tensor (tied, see below)
    encoder.block.{i}.layer.0.layer_norm.weight           RMSNorm before self-attention
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight          no biases
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   (32 buckets, heads), block 0 only
    encoder.block.{i}.layer.1.layer_norm.weight           RMSNorm before the FFN
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0, wi_1, wo}.weight  gated-GELU FFN
    encoder.final_layer_norm.weight

Tied embedding: `encoder.embed_tokens` IS `shared` (one nn.Embedding registered under both names, as in
transformers), so the state dict lists both keys for one tensor. Saved T5 files usually hold only one of
the two (safetensors refuses shared storage; which one is kept depends on the saving code).
`load_text_encoder` fills the missing key from the present one, and refuses a file holding both keys
with different values (CheckpointError), rather than silently picking one.

The block: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)); final RMSNorm. Attention logits are q.k
WITHOUT the 1/sqrt(d) factor (folded into the initialisation of q in Mesh TensorFlow) plus a learned
bidirectional relative position bias (bucketed |i - j|: 8 exact buckets, 8 log-spaced up to distance
128, per direction), computed once in block 0 and added in every block. No dropout at inference.

fp16 note: transformers clamps activations to the fp16 range after each sub-layer; T5 v1.1 XXL is known
to overflow in fp16. Use bf16 or fp32 (bf16 is what CogVideoX's pipeline loads it in).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from npo_min.checkpoint import CheckpointError, build_loaded, load_state_dict

# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class T5Config:
    """Sizes of a T5 v1.1 encoder. Field names are the transformers config.json keys."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64  # per-head width; inner width = num_heads * d_kv
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "T5Config":
        """Read a transformers `text_encoder/config.json` dict.

        Raises:
            CheckpointError: the config describes something this module does not implement
                (not a gated-GELU v1.1 FFN, a decoder).
        """
        ffn = cfg.get("feed_forward_proj", "gated-gelu")
        if ffn != "gated-gelu" or cfg.get("dense_act_fn", "gelu_new") != "gelu_new":
            raise CheckpointError(f"{where}: feed_forward_proj={ffn!r} is not T5 v1.1's 'gated-gelu' (gelu_new); "
                                  "only T5 v1.1 encoders are supported.")
        if cfg.get("is_decoder", False):
            raise CheckpointError(f"{where}: is_decoder=true; only the T5 encoder is supported.")
        kw = {f: cfg[f] for f in cls.__dataclass_fields__ if f in cfg}
        return cls(**kw)


PRESETS: dict[str, T5Config] = {
    # google/t5-v1_1-xxl encoder = THUDM/CogVideoX-{2b,5b} text_encoder/config.json.
    # 4,762,310,656 parameters (the tied embedding counted once): 19.05 GB in fp32, 9.5 GB in bf16.
    "t5-v1_1-xxl": T5Config(),
    # Tiny random model for the tests (transformers T5Config with the same fields).
    "tiny": T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
}


def get_config(preset: str | T5Config) -> T5Config:
    """A preset name from PRESETS or a config passed through. Raises ValueError on an unknown name."""
    if isinstance(preset, T5Config):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown T5 preset {preset!r}: choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------------
# Model


class T5LayerNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight; no mean, no bias.

    The mean square is taken in float32 whatever the input dtype; the result is cast back to the
    weight's dtype when that is half precision (as transformers does).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)  # (B, L, 1) in fp32
        x = x * torch.rsqrt(var + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of `rel = key_pos - query_pos` (int64, any shape) in 0..num_buckets-1.

    Half the buckets for rel > 0, half for rel <= 0; within a half, |rel| < n/4 gets its own bucket,
    larger |rel| log-spaced buckets up to max_distance (beyond: the last bucket).
    """
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    # log-spaced bucket; |rel| < exact is masked out below (log(0) is never used)
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return bucket + torch.where(rel < exact, rel, large)


class T5Attention(nn.Module):
    """Multi-head self-attention without biases and without the 1/sqrt(d) logit scale."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """`(1, heads, L, L)` additive bias b[h, i, j] = table[bucket(j - i), h]."""
        pos = torch.arange(length, device=device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                          self.cfg.relative_attention_max_distance)  # (L, L)
        return rearrange(self.relative_attention_bias(bucket), "i j h -> 1 h i j")

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.cfg.num_heads
        q, k, v = (rearrange(p(x), "b l (h d) -> b h l d", h=h) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, h, L, d)
        return self.o(rearrange(out, "b h l d -> b l (h d)"))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5DenseGatedActDense(nn.Module):
    """FFN of T5 v1.1: wo(gelu_tanh(wi_0 x) * wi_1 x) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))  # gelu_new = tanh GELU


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias)
        return x + ff.DenseReluDense(ff.layer_norm(x))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens  # the same module as T5EncoderModel.shared (tied)
        self.block = nn.ModuleList([T5Block(cfg, has_relative_attention_bias=(i == 0)) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, L, d_model)
        bias = self.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], x.device)  # (1, h, L, L)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """T5 v1.1 encoder: `(B, L)` token ids -> last hidden state `(B, L, d_model)`.

    No attention mask: CogVideoX feeds all 226 positions, padding included (its pipeline calls the
    encoder with input ids only), so the padding tokens' states take part in attention and are
    part of the conditioning.

    Raises:
        ValueError: ids outside 0..vocab_size-1 or not a 2-D integer tensor.
    """

    def __init__(self, cfg: str | T5Config = "t5-v1_1-xxl"):
        super().__init__()
        self.cfg = get_config(cfg)
        self.shared = nn.Embedding(self.cfg.vocab_size, self.cfg.d_model)
        self.encoder = T5Stack(self.cfg, self.shared)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be a (B, L) integer tensor; got {tuple(input_ids.shape)} {input_ids.dtype}.")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.cfg.vocab_size - 1}; got "
                             f"[{input_ids.min().item()}, {input_ids.max().item()}]: wrong tokenizer for this encoder?")
        return self.encoder(input_ids)


def tie_embedding(sd: dict[str, torch.Tensor], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Fill whichever of `shared.weight` / `encoder.embed_tokens.weight` is missing from the other.

    Raises:
        CheckpointError: both present but different (the file is not a tied T5 encoder).
    """
    a, b = "shared.weight", "encoder.embed_tokens.weight"
    sd = dict(sd)
    if a in sd and b in sd:
        if sd[a].shape != sd[b].shape or not torch.equal(sd[a], sd[b]):
            raise CheckpointError(f"{where}: {a} and {b} differ, but T5EncoderModel ties them; is this a T5 encoder?")
    elif a in sd:
        sd[b] = sd[a]
    elif b in sd:
        sd[a] = sd[b]
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")}  # a full T5 file: keep the encoder
    return sd


def load_text_encoder(path: str | os.PathLike, preset: str | T5Config | None = None,
                      dtype: torch.dtype = torch.float32) -> T5EncoderModel:
    """Load a T5 encoder from a transformers folder (`text_encoder/`, sharded or not) or one file.

    Args:
        path: the folder (its config.json is read when `preset` is None and checked against the
            preset otherwise) or a `.safetensors` file.
        preset: name from PRESETS, a T5Config, or None (use the folder's config.json).
        dtype: float32, or bfloat16 to halve the 19 GB of T5-XXL (what CogVideoX runs it in).

    Raises:
        CheckpointError: missing / unexpected keys, wrong shapes, an untied embedding pair, or a
            config.json that disagrees with the preset (the differing field is named).
    """
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else None
    file_cfg = T5Config.from_hf(json.loads(cfg_file.read_text()), str(cfg_file)) if cfg_file and cfg_file.exists() else None
    if preset is None:
        if file_cfg is None:
            raise CheckpointError(f"{path}: no config.json next to the weights; pass a preset (e.g. 't5-v1_1-xxl').")
        cfg = file_cfg
    else:
        cfg = get_config(preset)
        if file_cfg is not None and file_cfg != cfg:
            diff = [f"{f}={getattr(file_cfg, f)} (preset {getattr(cfg, f)})" for f in cfg.__dataclass_fields__
                    if getattr(file_cfg, f) != getattr(cfg, f)]
            raise CheckpointError(f"{cfg_file} does not match the T5 preset: {', '.join(diff)}.")
    sd = tie_embedding(load_state_dict(path), str(path))
    return build_loaded(T5EncoderModel, cfg, sd, dtype, "T5EncoderModel")


# ----------------------------------------------------------------------------------------------
# Tokenizer


class T5Tokenizer:
    """T5's SentencePiece-Unigram tokenizer read from a `tokenizer.json` with the `tokenizers` package.

    `tokenizer(prompts) -> (B, max_length)` int64 ids, as CogVideoX's pipeline calls transformers'
    T5TokenizerFast (`padding="max_length", max_length=226, truncation=True, add_special_tokens=True`):
    the pieces of the prompt (normalizer, Metaspace pre-tokenizer and Unigram model all from the
    file), truncated to max_length - 1, then `</s>`, then `<pad>` up to max_length. An empty
    prompt is `[</s>, <pad>, ...]`.

    The official CogVideoX `tokenizer/` folder ships only `spiece.model` (SentencePiece protobuf),
    not `tokenizer.json`. Convert it once, on a machine with transformers, sentencepiece and protobuf:

        python -c "from transformers import T5TokenizerFast as T; T.from_pretrained('DIR').save_pretrained('DIR')"

    which writes DIR/tokenizer.json next to spiece.model.

    Raises:
        FileNotFoundError: no tokenizer.json (with the conversion command above).
        ValueError: `</s>` or `<pad>` not in the vocabulary, or max_length < 1.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 226):
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(
                f"{file} not found. CogVideoX ships only spiece.model; convert once with transformers: "
                f"python -c \"from transformers import T5TokenizerFast as T; T.from_pretrained('{path}').save_pretrained('{path}')\"")
        self.tok = Tokenizer.from_file(str(file))
        self.tok.no_truncation()
        self.tok.no_padding()
        self.eos_id, self.pad_id = self.tok.token_to_id("</s>"), self.tok.token_to_id("<pad>")
        if self.eos_id is None or self.pad_id is None:
            raise ValueError(f"{file}: '</s>' or '<pad>' is not in the vocabulary; not a T5 tokenizer.")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1; got {max_length}.")
        self.max_length = max_length

    def encode(self, prompt: str) -> list[int]:
        """Ids of one prompt: pieces[:max_length - 1] + [</s>] + [<pad>] * rest."""
        ids = self.tok.encode(prompt, add_special_tokens=False).ids[: self.max_length - 1] + [self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return torch.tensor([self.encode(p) for p in prompts], dtype=torch.long)  # (B, max_length)
