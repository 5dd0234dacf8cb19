"""The SD UNet's original single-file key layout (CompVis LDM, `model.diffusion_model.*` of
`v1-5-pruned-emaonly.safetensors` and `sd_xl_base_1.0.safetensors`) against the diffusers names our UNet uses
(npo_min/unet.py): the one named key map of the UNet, read by unet.read_unet_weights, npo_min/sdxl.py and the
kohya-ss LoRA names (offsets.py, export.py)."""

from __future__ import annotations

import re

import torch

from .unet import UNetConfig


# Inside an LDM ResBlock (ldm/modules/diffusionmodules/openaimodel.py) -> diffusers ResnetBlock2D.
LDM_RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
              "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}


def ldm_unet_prefixes(cfg: UNetConfig) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) for every block of `cfg`, in model order.

    LDM numbers its blocks flat, diffusers per level (L = layers_per_block, n levels):
      input_blocks.0.0                  conv_in
      input_blocks.{i}.0 / .1           down_blocks.{l}.resnets.{j} / .attentions.{j}, i = 1 + l (L + 1) + j
      input_blocks.{i}.0.op             down_blocks.{l}.downsamplers.0.conv, i = 1 + l (L + 1) + L, l < n - 1
      middle_block.0 / .1 / .2          mid_block.resnets.0 / attentions.0 / resnets.1
      output_blocks.{i}.0 / .1          up_blocks.{l}.resnets.{j} / .attentions.{j}, i = l (L + 1) + j
      output_blocks.{i}.{1 or 2}.conv   up_blocks.{l}.upsamplers.0.conv (j = L; index 2 after an attention)
      time_embed.{0,2}, out.{0,2}       time_embedding.linear_{1,2}, conv_norm_out, conv_out
      label_emb.0.{0,2}                 add_embedding.linear_{1,2} (SDXL's `text_time` embedding)
    Transformer (SpatialTransformer) internals have the same names in both layouts (SDXL's linear
    proj_in / proj_out too).
    """
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    if cfg.addition_embed_type == "text_time":
        pairs += [("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
    i = 1
    for level, attn in enumerate(cfg.cross_attn):
        for j in range(L):
            pairs.append((f"input_blocks.{i}.0.", f"down_blocks.{level}.resnets.{j}."))
            if attn:
                pairs.append((f"input_blocks.{i}.1.", f"down_blocks.{level}.attentions.{j}."))
            i += 1
        if level < n - 1:
            pairs.append((f"input_blocks.{i}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."))
            i += 1
    pairs += [("middle_block.0.", "mid_block.resnets.0."), ("middle_block.1.", "mid_block.attentions.0."),
              ("middle_block.2.", "mid_block.resnets.1.")]
    i = 0
    for level, attn in enumerate(reversed(cfg.cross_attn)):
        for j in range(L + 1):
            pairs.append((f"output_blocks.{i}.0.", f"up_blocks.{level}.resnets.{j}."))
            if attn:
                pairs.append((f"output_blocks.{i}.1.", f"up_blocks.{level}.attentions.{j}."))
            if j == L and level < n - 1:
                pairs.append((f"output_blocks.{i}.{2 if attn else 1}.conv.", f"up_blocks.{level}.upsamplers.0.conv."))
            i += 1
    return pairs


def ldm_layer_names(layers) -> dict[str, str]:
    """Diffusers module name -> LDM module name, for the layers of an SD-style UNet named in diffusers' layout
    (e.g. `down_blocks.1.resnets.0.conv1` -> `input_blocks.4.0.in_layers.2`), what kohya-ss SDXL LoRAs name.

    layers: the UNet's module (or state-dict) names. The block structure that `ldm_unet_prefixes` needs
    (levels, layers per block, attention per level, SDXL's added embedding) is read from them; names no
    rule knows are left out. Returns {} for a model without `down_blocks` (not an SD-style UNet).
    """
    layers = {k.removesuffix(".weight").removesuffix(".bias") for k in layers}
    levels = {int(m[1]) for k in layers if (m := re.match(r"down_blocks\.(\d+)\.", k))}
    if not levels:
        return {}
    n = max(levels) + 1
    per_block = 1 + max(int(m[1]) for k in layers if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    cfg = UNetConfig(block_out_channels=(1,) * n, layers_per_block=per_block,  # widths unused by the key map
                     cross_attn=tuple(any(k.startswith(f"down_blocks.{l}.attentions.") for k in layers) for l in range(n)),
                     addition_embed_type="text_time" if any(k.startswith("add_embedding.") for k in layers) else None)
    pairs = sorted(ldm_unet_prefixes(cfg), key=lambda p: -len(p[1]))  # longest diffusers prefix first
    out = {}
    for name in layers:
        for old, new in pairs:
            if (name + ".").startswith(new):
                rest = (name + ".")[len(new):]
                if ".resnets." in new:
                    rest = next((rest.replace(b, a, 1) for a, b in LDM_RESNET.items() if rest.startswith(b)), rest)
                out[name] = (old + rest).removesuffix(".")
                break
    return out


def ldm_unet_to_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename an LDM-layout UNet state dict (`model.diffusion_model.` already removed) to diffusers names.

    Rules from `ldm_unet_prefixes(cfg)` plus the ResBlock renames in LDM_RESNET. Tensors are passed
    through untouched (`proj_in/proj_out` are 1x1 convs in both SD1.x layouts, linears in both SDXL ones). A key no rule knows
    keeps its name, so a strict load then reports it by name.
    """
    pairs = sorted(ldm_unet_prefixes(cfg), key=lambda p: -len(p[0]))  # longest first: `...0.op.` before `...0.`
    out = {}
    for key, value in sd.items():
        for old, new in pairs:
            if key.startswith(old):
                rest = key[len(old):]
                if ".resnets." in new:
                    rest = next((rest.replace(a, b, 1) for a, b in LDM_RESNET.items() if rest.startswith(a)), rest)
                key = new + rest
                break
        out[key] = value
    return out
