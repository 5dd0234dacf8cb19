"""Memory on paper for SDXL Self-NPO: what autograd saves in one forward of the FULL "sdxl" UNet preset.

    python tests/bench_sdxl_memory.py                    # 1024 px (128 x 128 latents), batch 1, bf16
    python tests/bench_sdxl_memory.py --size 96 --dtype fp32

Runs on the meta device (shapes only, no compute, a few seconds on a CPU). Attention is replaced by a
function that saves what flash attention saves for backward (q, k, v, out and a float32 logsumexp), as
scaled_dot_product_attention does on a GPU in bf16 / fp16; the meta device would otherwise take the math
path and save the attention probabilities. Views of one tensor are counted each time they are saved, so
the numbers are upper bounds. Reported, per sample:
  - kept between checkpointed blocks with gradient checkpointing (what stays alive until backward);
  - the largest single block's saved tensors (what backward recomputes at a time under checkpointing);
  - the sum over all blocks (no checkpointing; the small layers outside the blocks are not counted).
The README's SDXL section adds these to the weights, gradients, AdamW states, EMA target and base copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from npo_min.unet import PRESETS, UNet2DConditionModel  # noqa: E402

SDPA = F.scaled_dot_product_attention


class FlashLikeAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v, saving (q, k, v, out, logsumexp (B, h, N) float32) as flash attention."""

    @staticmethod
    def forward(ctx, q, k, v):
        with torch.no_grad():
            out = SDPA(q, k, v)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("shapes only: this benchmark never runs backward")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="latent side (128 = 1024 px)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    with torch.device("meta"):
        unet = UNet2DConditionModel(PRESETS["sdxl"]).to(dtype).train()
    x = torch.empty(1, 4, args.size, args.size, device="meta", dtype=dtype)
    t = torch.zeros(1, device="meta")
    cond = dict(encoder_hidden_states=torch.empty(1, 77, 2048, device="meta", dtype=dtype),
                text_embeds=torch.empty(1, 1280, device="meta", dtype=dtype), time_ids=torch.zeros(1, 6, device="meta"))
    saved = [0]

    def pack(tensor):
        if not (tensor.requires_grad and tensor.is_leaf):  # parameters are not activations
            saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    blocks = []

    def run_block(module, *inputs):  # UNet2DConditionModel._run: one checkpointable block
        before, saved[0] = saved[0], 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = module(*inputs)
        blocks.append((saved[0], f"{type(module).__name__} {tuple(inputs[0].shape)}"))
        saved[0] = before
        return out

    with mock.patch.object(F, "scaled_dot_product_attention", lambda q, k, v: FlashLikeAttention.apply(q, k, v)):
        with mock.patch.object(unet, "_run", run_block):
            unet(x, t, cond)
        unet.gradient_checkpointing = True
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(x, t, cond)
    largest = max(blocks)
    result = {"kept_between_blocks_gb": saved[0] / 1e9, "largest_block_gb": largest[0] / 1e9, "largest_block": largest[1],
              "all_blocks_gb": sum(b for b, _ in blocks) / 1e9}
    print(f"SDXL UNet, {args.size}x{args.size} latents ({8 * args.size} px), {args.dtype}, per sample: "
          f"kept between checkpointed blocks {result['kept_between_blocks_gb']:.2f} GB; largest block "
          f"{result['largest_block_gb']:.2f} GB ({largest[1]}); all blocks, no checkpointing {result['all_blocks_gb']:.2f} GB")
    return result


if __name__ == "__main__":
    main()
