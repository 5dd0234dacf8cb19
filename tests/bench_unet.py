"""Benchmark: our SD1.5 UNet vs diffusers' UNet2DConditionModel, same random weights, CPU, float32.

    python tests/bench_unet.py                      # 32x32 latents (256 px), batch 1, 5 repeats
    python tests/bench_unet.py --size 64 --repeats 3 --threads 2

Times one forward and one forward+backward (loss = mean of the output squared; fresh gradients each
time) of the FULL "sd15" preset (859,520,964 parameters). The two models run interleaved in one process
(A, B, A, B, ...) after a warm-up, so a busy machine slows both alike; the median is reported.
Peak memory is measured in a separate subprocess per model and mode: the kernel's peak-RSS counter
(VmHWM in /proc/self/status) is reset after the weights are loaded (`echo 5 > /proc/self/clear_refs`),
so "peak" = weights + everything the pass allocates, and "extra" = peak - RSS before the pass.

This is a benchmark, not runtime code: it imports diffusers (a test-only oracle), like tests/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from npo_min.unet import PRESETS, UNet2DConditionModel  # noqa: E402
from bench_self_npo import status  # noqa: E402  (tests/, beside this script)

CFG = PRESETS["sd15"]


def diffusers_unet():
    """diffusers' UNet2DConditionModel with the SD1.5 config (unet/config.json of stable-diffusion-v1-5), on meta."""
    import diffusers  # test-only oracle, imported only here

    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, cross_attention_dim=768)


def load(kind: str, weights: str) -> torch.nn.Module:
    """A model on meta, then the weights assigned in place (no second copy; RSS = one set of weights)."""
    if kind == "ours":
        with torch.device("meta"):
            model = UNet2DConditionModel(CFG)
    else:
        model = diffusers_unet()
    sd = {k: v.clone() for k, v in load_file(weights).items()}  # load_file maps the file lazily: make it resident
    model.load_state_dict(sd, strict=True, assign=True)
    return model.train()  # train mode as in fine-tuning (no dropout in either: SD1.5 has none)


def make_step(kind: str, model, size: int, backward: bool):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, size, size, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])

    def step():
        with torch.set_grad_enabled(backward):
            out = model(x, t, context) if kind == "ours" else model(x, t, encoder_hidden_states=context).sample
            if backward:
                out.square().mean().backward()
                for p in model.parameters():
                    p.grad = None
        return out

    return step


def worker(kind: str, weights: str, size: int, backward: bool, threads: int) -> None:
    """Subprocess: load, reset the peak-RSS counter, run warm-up + one pass, print JSON."""
    torch.set_num_threads(threads)
    step = make_step(kind, load(kind, weights), size, backward)
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    step()
    print(json.dumps({"rss_before": before, "peak": status("VmHWM")}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px images)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per model and mode (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--worker", nargs=3, metavar=("KIND", "WEIGHTS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, weights, mode = args.worker
        return worker(kind, weights, args.size, mode == "fwd+bwd", args.threads)

    torch.set_num_threads(args.threads)
    print(f"SD1.5 UNet ({sum(v.numel() for v in diffusers_unet().state_dict().values()):,} parameters), "
          f"latents 1x4x{args.size}x{args.size}, float32, {args.threads} threads, {args.repeats} repeats")
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "unet.safetensors")
        torch.manual_seed(0)
        model = UNet2DConditionModel(CFG)  # default PyTorch init: random but well scaled
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        del model
        models = {kind: load(kind, weights) for kind in ("ours", "diffusers")}
        with torch.no_grad():  # same weights, same output
            outs = {kind: make_step(kind, m, args.size, False)() for kind, m in models.items()}
        print(f"max abs diff of the outputs: {(outs['ours'] - outs['diffusers']).abs().max().item():.3g}")

        results = {}
        for mode in ("fwd", "fwd+bwd"):
            steps = {kind: make_step(kind, m, args.size, mode == "fwd+bwd") for kind, m in models.items()}
            times = {kind: [] for kind in steps}
            for r in range(args.repeats + 1):
                for kind, step in steps.items():
                    start = time.perf_counter()
                    step()
                    if r:  # r = 0 is the warm-up
                        times[kind].append(time.perf_counter() - start)
            results[mode] = {kind: {"median_s": statistics.median(ts), "times_s": ts} for kind, ts in times.items()}
        del models, steps

        for mode in ("fwd", "fwd+bwd"):
            for kind in ("ours", "diffusers"):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--size", str(args.size), "--threads", str(args.threads),
                       "--worker", kind, weights, mode]
                run = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
                results[mode][kind].update(json.loads(run.stdout.strip().splitlines()[-1]))

    gib = 2**30
    print(f"\n{'mode':8} {'model':10} {'median s':>9} {'peak GiB':>9} {'extra GiB':>10}   all times (s)")
    for mode, res in results.items():
        for kind, r in res.items():
            extra = r["peak"] - r["rss_before"]
            print(f"{mode:8} {kind:10} {r['median_s']:9.3f} {r['peak'] / gib:9.2f} {extra / gib:10.2f}   "
                  + " ".join(f"{t:.2f}" for t in r["times_s"]))
        o, d = res["ours"], res["diffusers"]
        print(f"{mode:8} ratio ours/diffusers: time {o['median_s'] / d['median_s']:.3f}, peak memory {o['peak'] / d['peak']:.3f}, "
              f"extra memory {(o['peak'] - o['rss_before']) / max(1, d['peak'] - d['rss_before']):.3f}")


if __name__ == "__main__":
    main()
