"""CLIP text encoder (SD1.5's ViT-L/14 text tower) and CLIP's byte-level BPE tokenizer.

The modules are named after transformers' `CLIPTextModel` checkpoint layout, so a diffusers
`text_encoder/model.safetensors` loads strictly:

    text_model.embeddings.{token_embedding, position_embedding}.weight
    text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    text_model.encoder.layers.{i}.{layer_norm1, layer_norm2}.{weight,bias}
    text_model.encoder.layers.{i}.mlp.{fc1, fc2}.{weight,bias}
    text_model.final_layer_norm.{weight,bias}
    text_projection.weight                      (only with projection_dim > 0, e.g. SDXL text_encoder_2)

The model is a pre-LayerNorm transformer with a causal mask (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision"). `CLIPAttention`, `CLIPMLP`,
`CLIPEncoderLayer` and `CLIPEncoder` take plain sizes and a `causal` flag, so a CLIP vision tower
(ViT-L/14, ViT-H/14 for the PickScore / HPSv2 scorers) can reuse them from this file.

The tokenizer is built with the `tokenizers` library from a checkpoint's own `vocab.json` and
`merges.txt` (the diffusers `tokenizer/` folder) and reproduces what `transformers.CLIPTokenizer`
returns with `padding="max_length", max_length=77, truncation=True`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn

from npo_min.checkpoint import CheckpointError, load_into, load_state_dict

# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class CLIPTextConfig:
    """Sizes of a CLIP text tower. Field names follow the transformers config.json in brackets."""

    vocab_size: int = 49408  # [vocab_size]
    width: int = 768  # [hidden_size]
    layers: int = 12  # [num_hidden_layers]
    heads: int = 12  # [num_attention_heads]
    mlp_width: int = 3072  # [intermediate_size]
    max_positions: int = 77  # [max_position_embeddings]
    act: str = "quick_gelu"  # [hidden_act]: "quick_gelu" (OpenAI weights) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5  # [layer_norm_eps]
    projection_dim: int = 0  # [projection_dim] of CLIPTextModelWithProjection; 0 = no text_projection

    @classmethod
    def from_hf(cls, cfg: dict, with_projection: bool = False) -> "CLIPTextConfig":
        """Read a transformers `text_encoder/config.json` dict (missing keys keep our defaults)."""
        names = dict(vocab_size="vocab_size", width="hidden_size", layers="num_hidden_layers",
                     heads="num_attention_heads", mlp_width="intermediate_size",
                     max_positions="max_position_embeddings", act="hidden_act", layer_norm_eps="layer_norm_eps")
        kw = {ours: cfg[theirs] for ours, theirs in names.items() if theirs in cfg}
        if with_projection:
            kw["projection_dim"] = cfg.get("projection_dim", 512)
        return cls(**kw)


PRESETS: dict[str, CLIPTextConfig] = {
    # OpenAI CLIP ViT-L/14 text tower: runwayml/stable-diffusion-v1-5 text_encoder/config.json
    # (= openai/clip-vit-large-patch14 text_config). 123,060,480 parameters.
    "sd15": CLIPTextConfig(),
    # OpenCLIP ViT-bigG/14 text tower with its projection: SDXL text_encoder_2 (CLIPTextModelWithProjection,
    # stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json; open_clip ViT-bigG-14.json).
    "sdxl_g": CLIPTextConfig(width=1280, layers=32, heads=20, mlp_width=5120, act="gelu", projection_dim=1280),
}

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


def get_config(preset: str | CLIPTextConfig) -> CLIPTextConfig:
    """A preset name from PRESETS or a config passed through. Raises ValueError on an unknown name."""
    if isinstance(preset, CLIPTextConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown CLIP text preset {preset!r}: choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------------
# Transformer blocks shared by the text tower and (later) the vision tower


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # "gelu" is the exact (erf) GELU


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (all with bias)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}.")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D). `causal`: token i attends to tokens 0..i only (text tower)."""
        # (B, L, H*d) -> (B, H, L, d) for each of q, k, v
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # softmax(q k^T / sqrt(d)) v
        return self.out_proj(rearrange(y, "b h l d -> b l (h d)"))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}: choose one of {sorted(ACTIVATIONS)}.")
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, mlp_width, act)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """A stack of `CLIPEncoderLayer`s (`encoder.layers.{i}`)."""

    def __init__(self, layers: int, width: int, heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(width, heads, mlp_width, act, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool, num_layers: int | None = None) -> torch.Tensor:
        """Run the first `num_layers` layers (all by default). x: (B, L, D) -> (B, L, D)."""
        for layer in self.layers[:num_layers]:
            x = layer(x, causal)
        return x


# ----------------------------------------------------------------------------------------------
# Text tower


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, L) int64 -> (B, L, D)."""
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    """`text_model`: embeddings -> causal encoder -> final_layer_norm."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg.layers, cfg.width, cfg.heads, cfg.mlp_width, cfg.act, cfg.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text encoder; with `cfg.projection_dim > 0` also CLIPTextModelWithProjection's head."""

    def __init__(self, cfg: CLIPTextConfig = PRESETS["sd15"]):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def run_layers(self, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """Embeddings and the first `layers - clip_skip` encoder layers, before final_layer_norm.

        Args:
            input_ids: (B, L) int64 token ids in [0, vocab_size), L <= max_positions (77).
            clip_skip: number of final layers to skip, in [0, layers].

        Returns:
            (B, L, width) hidden states in the model's dtype (transformers' `hidden_states[-1 - clip_skip]`).

        Raises:
            ValueError: wrong ids shape / dtype / range, or clip_skip out of range.
        """
        cfg, ids = self.cfg, input_ids
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be a (B, L) integer tensor, got {ids.dtype} {tuple(ids.shape)}.")
        if ids.shape[1] > cfg.max_positions:
            raise ValueError(f"input_ids has {ids.shape[1]} tokens, more than max_positions={cfg.max_positions}.")
        if ids.numel() and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{ids.min()}, {ids.max()}].")
        if not 0 <= clip_skip <= cfg.layers:
            raise ValueError(f"clip_skip must be in [0, {cfg.layers}], got {clip_skip}.")
        x = self.text_model.embeddings(input_ids)  # (B, L, D)
        return self.text_model.encoder(x, causal=True, num_layers=cfg.layers - clip_skip)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 0, final_norm: bool = True) -> torch.Tensor:
        """Per-token prompt embeddings (B, L) ids -> (B, L, width), as diffusers' pipelines compute them.

        clip_skip=0 with final_norm: the last layer + final_layer_norm (`last_hidden_state`, SD1.5).
        clip_skip=1 with final_norm: the penultimate layer's output, then final_layer_norm, exactly
        StableDiffusionPipeline's `clip_skip=1`. SDXL's pipelines take the penultimate layer without
        the norm: clip_skip=1, final_norm=False. See run_layers for ranges and errors.
        """
        x = self.run_layers(input_ids, clip_skip)
        return self.text_model.final_layer_norm(x) if final_norm else x

    @staticmethod
    def pool(hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Features at the end-of-text token: (B, L, D), (B, L) -> (B, D).

        The EOS token has the largest id in CLIP's vocabulary (49407), so its position is the argmax
        of the ids (the first one if the padding is EOS too), as in CLIP and in transformers when
        config.json has the legacy `eos_token_id: 2` (SD1.5 and SDXL text encoders do).
        """
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]

    def encode(
        self, input_ids: torch.Tensor, clip_skip: int = 0, final_norm: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and pooled features in one pass.

        Returns:
            hidden: (B, L, width), as `forward(input_ids, clip_skip, final_norm)`.
            pooled: (B, width) = final_layer_norm(last layer) at the EOS token (transformers'
                `pooler_output`, whatever clip_skip is), then text_projection -> (B, projection_dim)
                when the config has one (CLIPTextModelWithProjection's `text_embeds`).
        """
        x = self.run_layers(input_ids, clip_skip)
        last = x
        for layer in self.text_model.encoder.layers[self.cfg.layers - clip_skip:]:
            last = layer(last, causal=True)
        norm = self.text_model.final_layer_norm
        hidden = norm(x) if final_norm else x
        pooled = self.pool(norm(last), input_ids)
        if self.cfg.projection_dim:
            pooled = self.text_projection(pooled)
        return hidden, pooled


# ----------------------------------------------------------------------------------------------
# Loading

SINGLE_FILE_PREFIX = "cond_stage_model.transformer."  # SD1.x single-file checkpoints (.ckpt / .safetensors)


def to_official_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one key map into the transformers layout of the module docstring.

    - SD single-file checkpoint: keep only keys under `cond_stage_model.transformer.`, prefix removed.
    - transformers >= 5 saves a bare CLIPTextModel without the `text_model.` prefix: add it back.
    - drop the non-trainable `text_model.embeddings.position_ids` buffer older exports contain.
    """
    if any(k.startswith(SINGLE_FILE_PREFIX) for k in sd):
        sd = {k[len(SINGLE_FILE_PREFIX):]: v for k, v in sd.items() if k.startswith(SINGLE_FILE_PREFIX)}
    if not any(k.startswith("text_model.") for k in sd):
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k != "text_model.embeddings.position_ids"}


def _check_folder_config(folder: Path, cfg: CLIPTextConfig) -> None:
    """If the folder has a transformers config.json, it must describe the same architecture as cfg."""
    path = folder / "config.json"
    if not path.exists():
        return
    raw = json.loads(path.read_text())
    theirs = CLIPTextConfig.from_hf(raw, with_projection=bool(cfg.projection_dim))
    diff = {k: (v, getattr(cfg, k)) for k, v in asdict(theirs).items() if v != getattr(cfg, k)}
    if diff:
        shown = ", ".join(f"{k}: config.json {a!r} vs preset {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path} does not match the chosen preset ({shown}): pick the matching preset.")


def load_text_encoder(
    path: str | os.PathLike, preset: str | CLIPTextConfig = "sd15", dtype: torch.dtype = torch.float32
) -> CLIPTextModel:
    """Build a CLIPTextModel and strictly load its weights, in eval mode with gradients off.

    Args:
        path: a diffusers / transformers `text_encoder/` folder (maybe sharded; its config.json, if any,
            is checked against the preset), a `.safetensors` file, or an SD1.x single-file checkpoint
            (keys under `cond_stage_model.transformer.`). SDXL single files keep their second encoder
            in OpenCLIP's own layout (`conditioner.embedders.1.model.`), which this loader does not map.
        preset: a name from PRESETS or a CLIPTextConfig.
        dtype: parameter dtype (float32, float16 or bfloat16).

    Raises:
        CheckpointError: missing path, missing / unexpected keys, wrong shapes, or a config.json that
            does not match the preset.
        ValueError: unknown preset.
    """
    cfg = get_config(preset)
    if Path(path).is_dir():
        _check_folder_config(Path(path), cfg)
    sd = to_official_keys(load_state_dict(path))
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model = model.to_empty(device="cpu").to(dtype)  # uninitialised storage; every tensor is overwritten below
    load_into(model, sd, what=f"CLIPTextModel ({preset if isinstance(preset, str) else 'custom config'})")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Tokenizer

# CLIP's pre-tokenization: the special tokens, English contractions, runs of letters, single digits,
# runs of other non-space characters. Everything else (whitespace) is dropped.
CLIP_SPLIT_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer: `tokenizer(prompts) -> (B, max_length)` int64 ids.

    Pipeline: NFC, whitespace runs -> one space, lowercase; split with CLIP_SPLIT_PATTERN; map each
    UTF-8 byte to a printable unicode character (GPT-2 byte-level alphabet); BPE with merges where the
    last symbol of a word carries the `</w>` suffix; then `<|startoftext|> ... <|endoftext|>`,
    truncated to max_length keeping the end token, padded with `pad_token` to max_length.

    Args:
        vocab: token -> id (vocab.json).
        merges: BPE merges in priority order (merges.txt without its `#version` header).
        pad_token: "<|endoftext|>" for SD1.5's tokenizer, "!" for SDXL's tokenizer_2.
        max_length: 77 for every CLIP text tower.

    Unlike OpenAI's original tokenizer (but like transformers' one, which diffusers uses) there is no
    ftfy text repair and no HTML unescaping. Like transformers, the bos / eos / pad tokens are
    registered as special tokens: their literal text in a prompt maps to their id (so with pad "!"
    a "!" in a prompt becomes id 0, not "!</w>").

    Raises:
        ValueError: a special token is not in the vocabulary, or max_length < 2.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 pad_token: str = EOS_TOKEN, max_length: int = 77):
        for tok in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if tok not in vocab:
                raise ValueError(f"special token {tok!r} is not in the vocabulary.")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (start + end token), got {max_length}.")
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN], vocab[pad_token]
        self.max_length = max_length

        bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=EOS_TOKEN)
        tk = Tokenizer(bpe)
        tk.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            # invert=True: the pattern describes the pieces to keep; what lies between them is removed.
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            # The pieces are already split, so only the byte -> unicode mapping is needed here.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        specials = dict.fromkeys([BOS_TOKEN, EOS_TOKEN, pad_token])  # ordered, without duplicates
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tk.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
            special_tokens=[(BOS_TOKEN, self.bos_id), (EOS_TOKEN, self.eos_id)],
        )
        tk.enable_truncation(max_length)  # counts the two added tokens: at most max_length - 2 text tokens
        tk.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)
        self.tokenizer = tk

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """prompts: one string or a list of B strings -> (B, max_length) int64 ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        encodings = self.tokenizer.encode_batch(list(prompts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.int64).reshape(len(prompts), self.max_length)


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Parse merges.txt: one `left right` pair a line; a `#version` header line and blank lines skipped."""
    merges = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected two symbols, got {line!r}.")
        merges.append((parts[0], parts[1]))
    return merges


def load_tokenizer(folder: str | os.PathLike, pad_token: str | None = None, max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIPTokenizer from a diffusers `tokenizer/` (or `tokenizer_2/`) folder.

    Reads `vocab.json` and `merges.txt`; pad_token=None takes `pad_token` from tokenizer_config.json
    or special_tokens_map.json when present, else "<|endoftext|>".

    Raises:
        FileNotFoundError: the folder, vocab.json or merges.txt is missing (the message names the file).
    """
    folder = Path(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found: a CLIP tokenizer folder needs vocab.json and merges.txt "
                "(pass the checkpoint's tokenizer/ folder)."
            )
    if pad_token is None:
        pad_token = EOS_TOKEN
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                pad = json.loads((folder / name).read_text(encoding="utf-8")).get("pad_token")
                if pad is not None:
                    pad_token = pad["content"] if isinstance(pad, dict) else pad
                    break
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    return CLIPTokenizer(vocab, read_merges(folder / "merges.txt"), pad_token=pad_token, max_length=max_length)
