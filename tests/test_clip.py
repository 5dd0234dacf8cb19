"""npo_min.clip against transformers' CLIPTextModel / CLIPTokenizer and diffusers' encode_prompt.

The tokenizer tests need CLIP's real BPE vocabulary. It comes from the `open-clip-torch` wheel,
which ships `open_clip/bpe_simple_vocab_16e6.txt.gz`; install it without its dependencies (only the
data file is read, open_clip is never imported):

    pip install --no-deps open-clip-torch==3.3.0
"""

import json
import types

import pytest
import torch
from safetensors.torch import save_file

import transformers
from npo_min.checkpoint import CheckpointError, load_into
from npo_min.clip import (
    PRESETS,
    CLIPTextConfig,
    CLIPTextModel,
    load_text_encoder,
    to_official_keys,
)
from npo_min.clip_tokenizer import load_tokenizer

TOL = 1e-5  # max abs error vs transformers in float32
TINY = CLIPTextConfig(vocab_size=1000, width=64, layers=3, heads=4, mlp_width=256, projection_dim=32)


def hf_text_config(cfg: CLIPTextConfig, **kw) -> transformers.CLIPTextConfig:
    """The transformers config of the same architecture (eos_token_id 2: the legacy argmax pooling of SD)."""
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_width, max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.act, layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.projection_dim or 512,
        eos_token_id=2, **kw,
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough for non-uniform attention and non-trivial LayerNorm affines."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model


def maxerr(a, b):
    return (a - b).abs().max().item()


def token_ids(cfg: CLIPTextConfig, seed: int = 0) -> torch.Tensor:
    """(4, 77) ids below the top id; the top id (our stand-in EOS) at varied places, then EOS padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size - 1, (4, cfg.max_positions), generator=g)
    for row, eos in enumerate((1, 9, 40, cfg.max_positions - 1)):
        ids[row, eos:] = cfg.vocab_size - 1
    return ids


@pytest.fixture(scope="module")
def pair():
    """(transformers CLIPTextModelWithProjection, ours) with identical random weights (TINY config)."""
    ref = transformers.CLIPTextModelWithProjection(hf_text_config(TINY, attn_implementation="eager")).eval()
    randomize_(ref)
    ours = CLIPTextModel(TINY).eval()
    load_into(ours, ref.state_dict(), "tiny CLIP text model")
    return ref, ours


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_text_model_matches_transformers(act):
    cfg = CLIPTextConfig(vocab_size=1000, width=64, layers=2, heads=4, mlp_width=128, act=act)
    ref = randomize_(transformers.CLIPTextModel(hf_text_config(cfg, attn_implementation="eager")).eval(), seed=1)
    ours = CLIPTextModel(cfg).eval()
    load_into(ours, to_official_keys(ref.state_dict()), "tiny CLIP text model")  # bare layout of transformers 5
    ids = token_ids(cfg)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hidden, pooled = ours.encode(ids)
        skip1 = ours(ids, clip_skip=1)
        skip1_ref = ref.final_layer_norm(out.hidden_states[-2])
    errs = dict(hidden=maxerr(hidden, out.last_hidden_state), pooled=maxerr(pooled, out.pooler_output),
                clip_skip1=maxerr(skip1, skip1_ref))
    assert max(errs.values()) <= TOL, errs
    assert maxerr(skip1, hidden) > 1e-2  # clip_skip changes the output at all


def test_with_projection_and_every_clip_skip(pair):
    ref, ours = pair
    ids = token_ids(TINY, seed=2)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hs, norm = out.hidden_states, ref.text_model.final_layer_norm  # hs: embeddings + one per layer
        assert len(hs) == TINY.layers + 1
        for skip in range(TINY.layers + 1):
            hidden, embeds = ours.encode(ids, clip_skip=skip)
            assert maxerr(hidden, norm(hs[-(skip + 1)])) <= TOL, skip
            assert maxerr(embeds, out.text_embeds) <= TOL, skip  # pooled always from the last layer
            raw = hs[-(skip + 1)]  # before the final norm: values up to ~15, so the tolerance is relative
            assert maxerr(ours(ids, clip_skip=skip, final_norm=False), raw) <= TOL * raw.abs().max(), skip
        assert maxerr(ours(ids), out.last_hidden_state) <= TOL


def test_pool_takes_first_eos():
    hidden = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)
    ids = torch.tensor([[7, 3, 9, 9, 9], [7, 9, 0, 0, 0]])  # 9 = EOS (largest id); pads 9 or 0 ("!")
    assert CLIPTextModel.pool(hidden, ids).flatten().tolist() == [2.0, 6.0]


def test_forward_rejects_bad_inputs(pair):
    _, ours = pair
    ids = token_ids(TINY)
    with pytest.raises(ValueError, match="clip_skip"):
        ours(ids, clip_skip=TINY.layers + 1)
    with pytest.raises(ValueError, match="clip_skip"):
        ours(ids, clip_skip=-1)
    with pytest.raises(ValueError, match="max_positions"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        ours(torch.full((1, 77), 1000))
    with pytest.raises(ValueError, match="integer"):
        ours(ids.float())


@pytest.mark.parametrize("preset,hf_class", [
    ("sd15", transformers.CLIPTextModel), ("sdxl_g", transformers.CLIPTextModelWithProjection)])
def test_preset_layout_and_parameter_count(preset, hf_class):
    """Same parameter names and count as transformers' model of the same config (both on meta)."""
    cfg = PRESETS[preset]
    hcfg = hf_text_config(cfg)
    assert CLIPTextConfig.from_hf(hcfg.to_dict(), with_projection=bool(cfg.projection_dim)) == cfg
    with torch.device("meta"):
        ours, ref = CLIPTextModel(cfg), hf_class(hcfg)
    ref_sd = to_official_keys(ref.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref_sd.items()}
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters())
    if preset == "sd15":
        assert n_ours == 123_060_480  # the published size of CLIP ViT-L/14's text tower


# ---------------------------------------------------------------------------------------------- loading


def test_load_transformers_folder_sharded(pair, tmp_path):
    ref, ours = pair
    bare = randomize_(transformers.CLIPTextModel(hf_text_config(TINY)), seed=3)
    bare.save_pretrained(tmp_path / "text_encoder", max_shard_size="100KB")
    assert (tmp_path / "text_encoder" / "model.safetensors.index.json").exists()
    cfg = CLIPTextConfig(**{**TINY.__dict__, "projection_dim": 0})
    loaded = load_text_encoder(tmp_path / "text_encoder", preset=cfg)
    ids = token_ids(TINY)
    with torch.no_grad():
        assert maxerr(loaded(ids), bare(ids).last_hidden_state) <= TOL
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_diffusers_layout_and_dtype(pair, tmp_path):
    """A diffusers text_encoder/ folder: `text_model.` keys, maybe the old position_ids buffer."""
    ref, ours = pair
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, folder / "model.safetensors")
    ref.config.to_json_file(folder / "config.json")
    loaded = load_text_encoder(folder, preset=TINY, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k].to(torch.bfloat16)), k


def test_load_single_file_checkpoint(pair, tmp_path):
    ref, ours = pair
    cfg = CLIPTextConfig(**{**TINY.__dict__, "projection_dim": 0})
    sd = {f"cond_stage_model.transformer.{k}": v.contiguous() for k, v in ref.state_dict().items()
          if k.startswith("text_model.")}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model.diffusion_model.conv_in.weight"] = torch.zeros(4, 4, 3, 3)  # the UNet of the same file
    save_file(sd, tmp_path / "sd15.safetensors")
    loaded = load_text_encoder(tmp_path / "sd15.safetensors", preset=cfg)
    ids = token_ids(TINY)
    with torch.no_grad():
        assert maxerr(loaded(ids), ref.text_model(ids).last_hidden_state) <= TOL


def test_load_errors(pair, tmp_path):
    ref, _ = pair
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    missing = dict(sd)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+text_model.encoder.layers.1.mlp.fc2.bias"):
        load_text_encoder(tmp_path / "missing.safetensors", preset=TINY)
    save_file({**sd, "text_model.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\s+text_model.extra.weight"):
        load_text_encoder(tmp_path / "extra.safetensors", preset=TINY)
    with pytest.raises(CheckpointError, match="shape mismatches"):  # the sd15 preset is 768 wide
        load_text_encoder(tmp_path / "extra.safetensors", preset="sd15")
    with pytest.raises(CheckpointError, match="not found"):
        load_text_encoder(tmp_path / "nope", preset=TINY)
    with pytest.raises(ValueError, match="unknown CLIP text preset"):
        load_text_encoder(tmp_path / "extra.safetensors", preset="sd99")
    # A config.json whose head count differs cannot be caught by the shapes: it must fail loudly.
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_file(sd, folder / "model.safetensors")
    ref.config.to_json_file(folder / "config.json")
    with pytest.raises(CheckpointError, match="heads: config.json 4 vs preset 2"):
        load_text_encoder(folder, preset=CLIPTextConfig(**{**TINY.__dict__, "heads": 2}))


# ---------------------------------------------------------------------------------------------- tokenizer


# `clip_vocab` (CLIP's vocab.json + merges.txt from open_clip's BPE file) is a fixture in conftest.py.


PROMPTS = [
    "a photo of a cat",
    "A Portrait of an Astronaut riding a horse, highly detailed, 8k, trending on ArtStation!!!",
    "don't stop, it's John's car; we'll see - I'm sure they've gone & you'd agree (maybe?)",
    "3.14159 + 2,718 = 5.86; 1999-12-31 at 23:59 #100 $5 50% 1st 2nd 1/2",
    "Café naïve résumé Ünïcödé ñandú São Paulo Zürich Ørsted",
    "cafe\u0301 (decomposed) vs café (composed)",
    "emoji 😀🐱‍👤 👍🏽 ❤️ ☃",
    "中文 猫 東京タワー 한국어 русский текст العربية हिन्दी",
    "   lots\tof \n\n whitespace\u00a0and\u3000ideographic space   ",
    "UPPER lower MiXeD İstanbul straße ﬁne",
    "<|endoftext|> inside and <|startoftext|> too",
    "wow!hello!! !",
    "&amp; html &lt;b&gt; \\backslash \"quotes\" 'single' `tick`",
    "",
    "   ",
    "a very long prompt that keeps going " * 15,
]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers(clip_vocab, pad):
    """Token for token vs transformers.CLIPTokenizer as diffusers calls it (SD1.5 pad / SDXL tokenizer_2 pad)."""
    ref = transformers.CLIPTokenizer.from_pretrained(clip_vocab, pad_token=pad)
    expected = torch.tensor(ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids)
    ours = load_tokenizer(clip_vocab, pad_token=pad)(PROMPTS)
    assert ours.dtype == torch.int64 and ours.shape == (len(PROMPTS), 77)
    bad = [p for p, a, b in zip(PROMPTS, ours, expected) if not torch.equal(a, b)]
    assert not bad, bad


def test_tokenizer_known_ids(clip_vocab):
    """Known ids of OpenAI's vocabulary; empty prompt; truncation keeps the end token."""
    tok = load_tokenizer(clip_vocab)
    ids = tok(["a photo of a cat", "", "cat " * 100])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    assert ids[1, :2].tolist() == [49406, 49407] and (ids[1, 2:] == 49407).all()
    assert ids[2].tolist() == [49406] + [2368] * 75 + [49407]
    assert tok("a cat").shape == (1, 77)
    bang = load_tokenizer(clip_vocab, pad_token="!")("a cat")
    assert bang[0, :4].tolist() == [49406, 320, 2368, 49407] and (bang[0, 4:] == 0).all()


def test_load_tokenizer_reads_pad_from_config(clip_vocab, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((clip_vocab / name).read_bytes())
    assert load_tokenizer(tmp_path).pad_id == 49407
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    assert load_tokenizer(tmp_path).pad_id == 0  # SDXL's tokenizer_2


def test_load_tokenizer_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="'!' is not in the vocabulary"):
        load_tokenizer(tmp_path, pad_token="!")


# ---------------------------------------------------------------------------------------------- diffusers


class _TextEncoderWithTextModel(transformers.CLIPTextModel):
    """transformers 5's CLIPTextModel exposed under `.text_model` as in transformers 4.

    diffusers 0.42.1's encode_prompt reaches `text_encoder.text_model.final_layer_norm` for clip_skip,
    which transformers 5 moved to `text_encoder.final_layer_norm`.
    """

    @property
    def text_model(self):
        return self


def test_prompt_embeddings_match_diffusers_encode_prompt(clip_vocab):
    """Tokenizer + encoder end to end vs StableDiffusionPipeline.encode_prompt, clip_skip None / 1 / 2."""
    from diffusers import StableDiffusionPipeline

    cfg = CLIPTextConfig(width=32, layers=3, heads=4, mlp_width=64)  # the real 49408-token vocabulary
    te = randomize_(_TextEncoderWithTextModel(hf_text_config(cfg, attn_implementation="eager")).eval(), seed=4)
    ours = CLIPTextModel(cfg).eval()
    load_into(ours, to_official_keys(te.state_dict()), "CLIP text model")
    stub = types.SimpleNamespace(
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip_vocab, model_max_length=77), text_encoder=te)
    prompts = ["a photo of a cat", "A castle on a hill, oil painting", "word " * 90]
    tok = load_tokenizer(clip_vocab)
    for clip_skip in (None, 1, 2):
        with torch.no_grad():
            expected, _ = StableDiffusionPipeline.encode_prompt(
                stub, prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                clip_skip=clip_skip)
            got = ours(tok(prompts), clip_skip=clip_skip or 0)
        assert maxerr(got, expected) <= TOL, clip_skip
