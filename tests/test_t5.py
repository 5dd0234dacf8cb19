"""npo_min.t5: T5 v1.1 encoder vs transformers' T5EncoderModel, tokenizer vs T5TokenizerFast.

Oracles: transformers 5.23 (test-only). The tokenizer.json is a small SentencePiece-style Unigram
model trained here with the `tokenizers` library (the real one cannot be downloaded here).
"""

import json

import pytest
import torch
from conftest import maxerr, randomize_
from safetensors.torch import save_file

from npo_min.checkpoint import CheckpointError
from npo_min.t5 import PRESETS, T5Config, T5EncoderModel, T5Tokenizer, load_text_encoder, relative_position_bucket

transformers = pytest.importorskip("transformers")


def hf_config(cfg: T5Config):
    return transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance, layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
    )


@pytest.fixture(scope="module")
def pair():
    cfg = PRESETS["tiny"]
    ref = transformers.T5EncoderModel(hf_config(cfg)).eval()
    randomize_(ref, seed=1, std=0.3)
    ours = T5EncoderModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_relative_position_bucket_vs_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)[None, :]
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(relative_position_bucket(rel, 32, 128), ref)


@pytest.mark.parametrize("shape", [(2, 226), (3, 17)])
def test_encoder_parity(pair, shape):
    ours, ref = pair
    ids = torch.randint(0, ours.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(shape[1]))
    with torch.no_grad():
        a, b = ours(ids), ref(input_ids=ids).last_hidden_state
    assert a.shape == (*shape, ours.cfg.d_model)
    assert maxerr(a, b) < 1e-4 * max(1.0, b.abs().max().item()), maxerr(a, b)


def test_same_keys_as_transformers(pair):
    ours, ref = pair
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.shared.weight is ours.encoder.embed_tokens.weight


def test_xxl_param_count_vs_transformers():
    with torch.device("meta"):
        ours = T5EncoderModel("t5-v1_1-xxl")
        ref = transformers.T5EncoderModel(hf_config(PRESETS["t5-v1_1-xxl"]))
    n = sum(p.numel() for p in ours.parameters())  # tied embedding counted once
    assert n == sum(p.numel() for p in ref.parameters()) == 4_762_310_656


@pytest.mark.parametrize("keep", ["shared.weight", "encoder.embed_tokens.weight", "both"])
def test_load_sharded_folder(pair, tmp_path, keep):
    """A transformers-style sharded text_encoder/ folder, with either or both embedding keys."""
    ours, ref = pair
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    if keep != "both":
        sd.pop("encoder.embed_tokens.weight" if keep == "shared.weight" else "shared.weight")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (tmp_path / "config.json").write_text(hf_config(ours.cfg).to_json_string())
    model = load_text_encoder(tmp_path, "tiny")
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert maxerr(model(ids), ours(ids)) == 0.0
    assert model.shared.weight is model.encoder.embed_tokens.weight


def test_load_errors(pair, tmp_path):
    ours, ref = pair
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["shared.weight"] = sd["shared.weight"] + 1
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="differ"):
        load_text_encoder(tmp_path, "tiny")
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "feed_forward_proj": "gated-gelu"}))
    with pytest.raises(CheckpointError, match="d_model=64"):
        load_text_encoder(tmp_path, "tiny")
    (tmp_path / "config.json").write_text(json.dumps({"feed_forward_proj": "relu"}))
    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        load_text_encoder(tmp_path)
    with pytest.raises(ValueError, match="token ids"):
        ours(torch.tensor([[ours.cfg.vocab_size]]))


# ---------------------------------------------------------------- tokenizer

CORPUS = [
    "A panda, dressed in a small, red jacket and a tiny hat, sits on a wooden stool in a serene bamboo forest.",
    "The camera follows behind a white vintage SUV with a black roof rack as it speeds up a steep dirt road.",
    "A street artist, clad in a worn-out denim jacket and a colorful bandana, stands before a vast concrete wall.",
    "In the haunting backdrop of a war-torn city, where ruins and crumbled walls tell a story of devastation.",
    "Café crème, naïve façade, 東京の夜景, 12345 numbers and punctuation!? (brackets) [more] {braces}",
] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A T5-layout tokenizer.json: Unigram with <pad>=0, </s>=1, <unk>=2, NFKC + whitespace collapse,
    WhitespaceSplit + Metaspace, `$A </s>` post-processor, 100 <extra_id_*> sentinels at the end."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", special=True) for i in range(99, -1, -1)])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    return folder


PROMPTS = [
    "",
    "A panda sits on a stool.",
    "  leading and   repeated   spaces\tand\ttabs\n",
    "Café crème, naïve façade, 東京の夜景 ＦＵＬＬＷＩＤＴＨ ① ﬁ ligature, emoji 🐼",
    "unknownwordsxyzqq <extra_id_3> sentinel </s> eos in text <pad>",
    " ".join(CORPUS[:6]),  # > 226 pieces: truncated to 225 + </s>
]


def test_tokenizer_token_for_token(tokenizer_dir):
    ref = transformers.T5TokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    ours = T5Tokenizer(tokenizer_dir)
    expected = ref(PROMPTS, padding="max_length", max_length=226, truncation=True, add_special_tokens=True,
                   return_tensors="pt").input_ids
    got = ours(PROMPTS)
    assert got.shape == (len(PROMPTS), 226) and got.dtype == torch.long
    assert torch.equal(got, expected)
    assert len(ref(PROMPTS[-1]).input_ids) > 226  # the long prompt really is truncated
    assert got[0, 0] == ours.eos_id and (got[0, 1:] == ours.pad_id).all()


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        T5Tokenizer(tmp_path)
