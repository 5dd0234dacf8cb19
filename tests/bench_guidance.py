"""Benchmark: NPO-guided sampling steps, one-pass (npo_min/batched_offsets.py) vs two models vs plain CFG.

    python tests/bench_guidance.py                          # full sd15 UNet, 32x32 latents, batch 1 and 2, 2 threads
    python tests/bench_guidance.py --device cuda --dtype fp16 --size 64
    python tests/bench_guidance.py --config tiny --repeats 1 # smoke run (tests/test_benchmarks.py)

One "step" is one call of guidance.guided_denoiser at guidance scale 7.5: the denoiser work of one solver
step (the solver's own arithmetic is the same for every row). Rows, all on the same random weights:

  cfg        plain CFG: one UNet, one batched [c', c] pass
  two-model  NPO as the authors' pipelines: a second UNet holding theta + delta (delta = the rank-8 LoRA
             below, merged), c on one, c' on the other (guidance.negative_model)
  lora-r8    one-pass NPO with the authors' LoRA shape: rank 8 on to_q / to_k / to_v / to_out.0 of every
             attention (the released sd15_beta500_2kiter.safetensors shape), as factors
  svd-r64    one-pass NPO with a full delta cut to rank 64 (what `sample.py --delta-rank 64` makes): rank-64
             factors on every Linear / Conv weight, dense offsets on every bias and norm parameter

Time: the rows run interleaved in one process (A, B, C, D, A, ...) after a warm-up, so a busy machine slows
all alike; each row's FLOPs per step are counted too (the floor its time cannot beat relative to CFG's); the
median over --repeats is reported, as wall-clock seconds and as the process's CPU seconds
(time.process_time, all threads: on a shared machine the steadier measure of the work). Peak memory (CPU): one subprocess per row, the kernel's
peak-RSS counter (VmHWM) reset after the base weights are loaded, then the row is built (the second UNet,
the factors) and one step runs; "peak" = the whole process at its highest. On CUDA: torch.cuda.max_memory_allocated
over the same, in-process. A benchmark, not a test: it prints, it asserts nothing.
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
from npo_min.batched_offsets import LowRankOffset, npo_denoisers  # noqa: E402
from npo_min.guidance import guided_denoiser  # noqa: E402
from npo_min.pipelines.sd15 import PRESETS  # noqa: E402
from npo_min.unet import UNet2DConditionModel  # noqa: E402
from bench_self_npo import count_flops, status  # noqa: E402  (tests/, beside this script)

ROWS = ("cfg", "two-model", "lora-r8", "svd-r64")
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load(config: str, weights: str, device: str, dtype: torch.dtype) -> UNet2DConditionModel:
    """The UNet on meta, then the weights assigned in place (RSS = one set of weights)."""
    with torch.device("meta"):
        model = UNet2DConditionModel(PRESETS[config].unet)
    sd = {k: v.clone() for k, v in load_file(weights).items()}  # load_file maps lazily: make it resident
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device, dtype).eval().requires_grad_(False)


def factors(model, layers, rank: int, seed: int, dense_1d: bool = False) -> LowRankOffset:
    """Random factors (product about 5% of the weight's scale) on the named layers; dense 1-d offsets if asked."""
    g, mods, out = torch.Generator().manual_seed(seed), dict(model.named_modules()), LowRankOffset()
    for name in layers:
        w = mods[name].weight
        r = min(rank, w.shape[0], w[0].numel())
        up = 0.05 * w.float().std().cpu() / r**0.5 * torch.randn(w.shape[0], r, generator=g)
        out.factors[name] = (up, torch.randn(r, w[0].numel(), generator=g))  # (out, r), (r, in * kh * kw)
    if dense_1d:
        out.dense = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items() if v.ndim == 1}
    return out


def attention_layers(model) -> list[str]:
    return [n for n, _ in model.named_modules() if n.endswith(ATTN) and ".attn" in n]


def weight_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def make_row(row: str, model):
    """(pos, neg) denoisers of a row, built on `model` (theta)."""
    if row == "cfg":
        return model, model
    if row == "two-model":
        lora = factors(model, attention_layers(model), 8, seed=1)
        pos, neg, _ = npo_denoisers(model, delta=lora.to_dense(model.state_dict()), one_pass=False)
        return pos, neg
    off = factors(model, attention_layers(model), 8, seed=1) if row == "lora-r8" else \
        factors(model, weight_layers(model), 64, seed=2, dense_1d=True)
    pos, neg, _ = npo_denoisers(model, delta=off, one_pass=True)
    return pos, neg


def make_step(pos, neg, config: str, batch: int, size: int, device: str, dtype: torch.dtype):
    cfg, g = PRESETS[config].unet, torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g).to(device, dtype)
    cond = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    null = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    denoise = guided_denoiser(pos, neg, cond, null, 7.5)

    def step():
        with torch.no_grad():
            out = denoise(x, t)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return step


def worker(args, row: str, batch: int) -> None:
    """Subprocess: load theta, reset the peak counter, build the row, one step; print JSON."""
    torch.set_num_threads(args.threads)
    model = load(args.config, args.weights, args.device, DTYPES[args.dtype])
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    pos, neg = make_row(row, model)
    step = make_step(pos, neg, args.config, batch, args.size, args.device, DTYPES[args.dtype])
    step()
    print(json.dumps({"rss_before": before, "peak": status("VmHWM")}))


def report(results: dict, what: str) -> None:
    gib = 2**30
    print(f"\n{'batch':>5} {'row':10} {'s/step':>8} {'x cfg':>6} {'CPU s':>8} {'x cfg':>6} {'peak GiB':>9} {'x cfg':>6}   all times (s)   [{what}]")
    for batch, res in results.items():
        c = res["cfg"]
        for row, r in res.items():
            time_ = (f"{r['median_s']:8.3f} {r['median_s'] / c['median_s']:6.3f} {r['median_cpu_s']:8.3f} "
                     f"{r['median_cpu_s'] / c['median_cpu_s']:6.3f}") if "median_s" in r else f"{'-':>8} {'-':>6} {'-':>8} {'-':>6}"
            mem = f"{r['peak'] / gib:9.2f} {r['peak'] / c['peak']:6.3f}" if "peak" in r else f"{'-':>9} {'-':>6}"
            print(f"{batch:5d} {row:10} {time_} {mem}   " + " ".join(f"{t:.2f}" for t in r.get("times_s", [])))
        if "flops" in c:
            print("      FLOPs per step (torch.utils.flop_counter, attention in its math form), x cfg: " + ", ".join(
                f"{row} {r['flops'] / 1e9:.1f} G ({r['flops'] / c['flops']:.3f})" for row, r in res.items()))
        if "vs_two_model" in res["lora-r8"]:
            print(f"      one-pass lora-r8 vs two-model output: relative max difference {res['lora-r8']['vs_two_model']:.2g}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd15", choices=sorted(PRESETS), help="UNet preset (tiny: a smoke run)")
    p.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px images)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="prompts per step (the UNet sees twice as many)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row and batch (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-time", action="store_true", help="skip the timing (memory only)")
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("ROW", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args, args.worker[0], int(args.worker[1]))

    torch.set_num_threads(args.threads)
    dtype, cuda = DTYPES[args.dtype], args.device.startswith("cuda")
    results = {b: {r: {} for r in ROWS} for b in args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        args.weights = str(Path(tmp) / "unet.safetensors")
        torch.manual_seed(0)
        model = UNet2DConditionModel(PRESETS[args.config].unet)  # default PyTorch init: random but well scaled
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.weights)
        n_params = sum(v.numel() for v in model.state_dict().values())
        lora, svd = factors(model, attention_layers(model), 8, 1), factors(model, weight_layers(model), 64, 2, dense_1d=True)
        print(f"{args.config} UNet ({n_params:,} parameters), latents {args.size}x{args.size}, {args.dtype} on {args.device}, "
              f"{args.threads} threads, {args.repeats} timed steps per row; guidance scale 7.5\n"
              f"lora-r8: {len(lora.factors)} layers, {lora.numel():,} parameters ({4 * lora.numel() / 2**20:.1f} MiB fp32); "
              f"svd-r64: {len(svd.factors)} layers + {len(svd.dense)} dense 1-d tensors, {svd.numel():,} parameters")
        del model, lora, svd

        for batch in args.batch if not args.no_time else ():  # time: all rows in one process, interleaved
            base = load(args.config, args.weights, args.device, dtype)
            # one theta for all rows: the one-pass hooks act only inside their own denoiser's calls, and the
            # two-model row (no eta) leaves theta as it is and adds its copy
            rows = {row: make_step(*make_row(row, base), args.config, batch, args.size, args.device, dtype) for row in ROWS}
            outs = {row: step().float() for row, step in rows.items()}  # warm-up
            for row, step in rows.items():  # the FLOP floor of each row (the one-pass rows' low-rank work included)
                results[batch][row]["flops"] = count_flops(step)
            # the lora-r8 and two-model rows hold the same theta_neg: the same result
            results[batch]["lora-r8"]["vs_two_model"] = ((outs["lora-r8"] - outs["two-model"]).abs().max()
                                                         / outs["two-model"].abs().max()).item()
            times, cpu = {row: [] for row in ROWS}, {row: [] for row in ROWS}
            for _ in range(args.repeats):
                for row, step in rows.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    step()
                    times[row].append(time.perf_counter() - start)
                    cpu[row].append(time.process_time() - start_cpu)
                    print(f"  batch {batch} {row}: {times[row][-1]:.2f} s, CPU {cpu[row][-1]:.2f} s", flush=True)
            for row in ROWS:
                results[batch][row]["median_s"] = statistics.median(times[row])
                results[batch][row]["times_s"] = times[row]
                results[batch][row]["median_cpu_s"] = statistics.median(cpu[row])
            del rows, base, outs

        for batch in args.batch:  # memory: a subprocess per row
            for row in ROWS:
                if args.no_memory:
                    continue
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    model = load(args.config, args.weights, args.device, dtype)
                    before = torch.cuda.memory_allocated()
                    make_step(*make_row(row, model), args.config, batch, args.size, args.device, dtype)()
                    results[batch][row].update(rss_before=before, peak=torch.cuda.max_memory_allocated())
                    del model
                    continue
                cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--size", str(args.size),
                       "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
                       "--weights", args.weights, "--worker", row, str(batch)]
                run = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results[batch][row].update(json.loads(run.stdout.strip().splitlines()[-1]))
                print(f"  batch {batch} {row}: peak {results[batch][row]['peak'] / 2**30:.2f} GiB", flush=True)

    report(results, "GPU allocated" if cuda else "RSS")
    return results


if __name__ == "__main__":
    main()
