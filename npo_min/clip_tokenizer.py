"""CLIP's byte-level BPE tokenizer, built with the `tokenizers` library.

From a checkpoint's own `vocab.json` and `merges.txt` (the diffusers `tokenizer/` folder), or
OpenAI's `bpe_simple_vocab_16e6.txt.gz`; reproduces what `transformers.CLIPTokenizer` returns with
`padding="max_length", max_length=77, truncation=True` (tests/test_clip.py, token for token).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
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
        pad_id: pad with this id instead, without registering any pad token as special (OpenCLIP's
            tokenizer pads with 0 while a "!" in a prompt stays "!</w>"); None = the id of pad_token.

    Unlike OpenAI's original tokenizer (but like transformers' one, which diffusers uses) there is no
    ftfy text repair and no HTML unescaping. Like transformers, the bos / eos / pad tokens are
    registered as special tokens: their literal text in a prompt maps to their id (so with pad "!"
    a "!" in a prompt becomes id 0, not "!</w>").

    Raises:
        ValueError: a special token is not in the vocabulary, or max_length < 2.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 pad_token: str = EOS_TOKEN, max_length: int = 77, pad_id: int | None = None):
        if pad_id is not None:
            pad_token = EOS_TOKEN  # only the id is used: nothing else becomes special
        for tok in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if tok not in vocab:
                raise ValueError(f"special token {tok!r} is not in the vocabulary.")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (start + end token), got {max_length}.")
        self.bos_id, self.eos_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
        self.pad_id = vocab[pad_token] if pad_id is None else pad_id
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
        tk.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)  # the id is what counts
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


def byte_alphabet() -> list[str]:
    """CLIP's (= GPT-2's) byte -> printable character table, in vocabulary order.

    Printable Latin-1 bytes map to themselves and come first; the other 68 bytes (controls, space,
    ...) map to chr(256), chr(257), ... in byte order and follow.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


CLIP_NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of its BPE file (vocabulary 49408)


def read_bpe_file(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from OpenAI CLIP's / OpenCLIP's `bpe_simple_vocab_16e6.txt.gz`.

    The file is a header line, then one merge a line. The vocabulary is built as CLIP builds it:
    the 256 byte symbols, the same with `</w>`, the concatenation of each merge, then the start and
    end tokens (ids 49406, 49407 with the full file).
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:1 + CLIP_NUM_MERGES]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{path}: expected two symbols a line, got {' '.join(bad[0])!r}.")
    units = byte_alphabet()
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def load_tokenizer(
    folder: str | os.PathLike, pad_token: str | None = None, max_length: int = 77, pad_id: int | None = None
) -> CLIPTokenizer:
    """Build a CLIPTokenizer from a diffusers `tokenizer/` (or `tokenizer_2/`) folder or a BPE file.

    A folder: reads `vocab.json` and `merges.txt`; pad_token=None takes `pad_token` from
    tokenizer_config.json or special_tokens_map.json when present, else "<|endoftext|>".
    A `.txt.gz` file: OpenAI's / OpenCLIP's `bpe_simple_vocab_16e6.txt.gz` (see read_bpe_file).
    pad_id: see CLIPTokenizer (0 reproduces OpenCLIP's padding).

    Raises:
        FileNotFoundError: the folder, vocab.json or merges.txt is missing (the message names the file).
    """
    folder = Path(folder)
    if folder.is_file() and folder.name.endswith(".gz"):
        vocab, merges = read_bpe_file(folder)
        return CLIPTokenizer(vocab, merges, pad_token=pad_token or EOS_TOKEN, max_length=max_length, pad_id=pad_id)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found: a CLIP tokenizer folder needs vocab.json and merges.txt "
                "(pass the checkpoint's tokenizer/ folder, or CLIP's bpe_simple_vocab_16e6.txt.gz)."
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
    return CLIPTokenizer(vocab, read_merges(folder / "merges.txt"), pad_token=pad_token, max_length=max_length,
                         pad_id=pad_id)
