"""Shared test fixtures and helpers: CLIP's real vocabulary, diffusers configs of our model configs.

The tokenizer tests need CLIP's BPE vocabulary. It comes from the `open-clip-torch` wheel, which ships
`open_clip/bpe_simple_vocab_16e6.txt.gz`; install it without its dependencies (only the data file is
read, open_clip is never imported):

    pip install --no-deps open-clip-torch==3.3.0

Helpers are plain functions (`from conftest import unet_kwargs`): pytest puts tests/ on sys.path.
"""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from npo_min.unet import UNetConfig
from npo_min.vae import VAEConfig

OPEN_CLIP_INSTALL = "pip install --no-deps open-clip-torch==3.3.0"

# The test models are tiny and CI machines are shared: with 2 OpenMP threads per process on a busy
# 2-core machine, a tiny UNet forward measured 30x slower than with one thread (spin-waiting threads).
torch.set_num_threads(1)


def byte_alphabet() -> list[str]:
    """CLIP's (= GPT-2's) byte -> printable character table, in vocabulary order.

    Printable Latin-1 bytes map to themselves and come first; the other 68 bytes map to 256, 257, ...
    in byte order and follow.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@pytest.fixture(scope="session")
def clip_vocab(tmp_path_factory) -> Path:
    """A folder with CLIP's vocab.json and merges.txt, derived from open_clip's BPE file."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the CLIP BPE vocabulary ships with open-clip-torch: {OPEN_CLIP_INSTALL}")
    bpe_file = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe_file.exists():
        pytest.skip(f"{bpe_file} is missing: reinstall with {OPEN_CLIP_INSTALL}")
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    merges = lines[1:1 + 49152 - 256 - 2]  # line 0 is a header; CLIP uses the first 48894 merges
    units = byte_alphabet()
    vocab = units + [u + "</w>" for u in units] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 49408
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def maxerr(a, b) -> float:
    return (a - b).abs().max().item()


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter: norm weights ~ 1 + std N(0, 1), everything else std N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(std * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def unet_kwargs(cfg: UNetConfig) -> dict:
    """diffusers UNet2DConditionModel(**kwargs) of the same architecture (SD1.x / SDXL: heads = attention_head_dim)."""
    return dict(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attn)),
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.num_heads, cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups,
        transformer_layers_per_block=cfg.transformer_depth, use_linear_projection=cfg.use_linear_projection,
    ) | (dict(addition_embed_type=cfg.addition_embed_type, addition_time_embed_dim=cfg.addition_time_embed_dim,
              projection_class_embeddings_input_dim=cfg.projection_input_dim) if cfg.addition_embed_type else {})


def vae_kwargs(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
    )


def diffusers_unet_to_ldm(sd: dict, cfg: UNetConfig) -> dict:
    """Inverse of unet_ldm.ldm_unet_to_diffusers, to write single-file test checkpoints (tests only)."""
    from npo_min.unet_ldm import LDM_RESNET, ldm_unet_prefixes

    pairs = sorted(ldm_unet_prefixes(cfg), key=lambda p: -len(p[1]))
    out = {}
    for key, value in sd.items():
        for old, new in pairs:
            if key.startswith(new):
                rest = key[len(new):]
                if ".resnets." in new:
                    rest = next((rest.replace(b, a, 1) for a, b in LDM_RESNET.items() if rest.startswith(b)), rest)
                key = old + rest
                break
        out[key] = value
    return out


def write_random_digits_base(folder: Path) -> Path:
    """A random digits model (torch seed 0) in the shipped layout (keys unet.*, class_embedding.*) as
    folder/model.safetensors; returns folder. Used by the CLI tests that need a base but not a trained one."""
    from npo_min.checkpoint import save_safetensors
    from npo_min.digits import build_digits_model

    torch.manual_seed(0)
    unet, embed = build_digits_model()
    sd = {f"unet.{k}": v for k, v in unet.state_dict().items()} | {f"class_embedding.{k}": v for k, v in embed.state_dict().items()}
    save_safetensors(sd, folder / "model.safetensors")
    return folder
