"""Benchmark: where the SD1.5 UNet's time goes, its physical limit, Self-NPO step cost and training memory.

    python tests/bench_self_npo.py                                # everything, full sd15, 2 threads (tens of minutes)
    python tests/bench_self_npo.py --only flops gemm profile      # sections by name
    python tests/bench_self_npo.py --config tiny --repeats 1 --ks 1 2   # smoke run (tests/test_benchmarks.py)

Sections (random weights, float32, CPU, batch 1, --threads torch threads):
  flops    FLOPs per forward at 32x32 and 64x64 latents, counted by torch.utils.flop_counter (convolutions,
           matmuls, attention; an add / norm / activation is not counted), attention in its math form.
  gemm     the measured peak GEMM rate: the best of torch.mm on square fp32 matrices (1024..3072).
  forward  one no-grad forward and one forward+backward, ours and diffusers' UNet2DConditionModel on the
           same weights (interleaved, medians), each as seconds and as the fraction of the GEMM peak it reaches
           (FLOPs / time / peak; fwd+bwd counted by the same counter).
  profile  one forward of ours under torch.profiler: self CPU time per operator class (conv, matmul, SDPA,
           GroupNorm, LayerNorm, elementwise, other).
  inplace  one no-grad forward of ours at batch 2 (CFG's batched pass), eager against the same forwards with
           GroupNorm -> SiLU and the residual adds done in place (the eager form of a fused GroupNorm+SiLU:
           one activation buffer fewer per norm), interleaved, with the max difference (0: same values).
  tdft     one Self-NPO TDFT step (self_npo.truncated_rollout + tdft_loss + backward; from noise, rollout
           w = -1 so each rollout evaluation is one batch-B forward) for each K in --ks, and one plain
           denoising fine-tuning step (self_npo.denoising_loss + backward). Beside each: the prediction from
           FLOPs ((K + 1) no-grad forwards + one forward+backward, over the GEMM peak) and from the measured
           forward / forward+backward times of `forward`. Target = the student itself (the EMA copy has the
           same cost; the optimizer and EMA update are left out of every row alike).
  memory   peak RSS of one fwd+bwd (32x32), one subprocess each: ours and diffusers, with and without gradient
           checkpointing, fp32 and bf16 autocast; "extra" = peak - RSS after loading the weights.

Every number of a section is measured in the same run, rows interleaved, so a busy machine slows all alike;
on a shared machine the times are contended (the ratios are what to read). A benchmark: it asserts nothing.
Imports diffusers (a test-only oracle) only in the forward and memory sections.
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
from npo_min.pipelines.sd15 import PRESETS  # noqa: E402
from npo_min.schedule import NoiseSchedule  # noqa: E402
from npo_min.self_npo import SelfNPOConfig, denoising_loss, tdft_loss, truncated_rollout  # noqa: E402
from npo_min.unet import UNet2DConditionModel  # noqa: E402

SECTIONS = ("flops", "gemm", "forward", "profile", "inplace", "tdft", "memory")
GIB = 2**30


def unet_config(config: str):
    return PRESETS[config].unet


def diffusers_unet(cfg):
    """diffusers' UNet2DConditionModel with the same architecture (tests/conftest.unet_kwargs), on meta."""
    import diffusers  # test-only oracle
    from conftest import unet_kwargs  # tests/ is on sys.path when this runs as a script

    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**unet_kwargs(cfg))


def load(kind: str, config: str, weights: str) -> torch.nn.Module:
    """A model on meta, then the weights assigned in place (RSS = one set of weights)."""
    if kind == "ours":
        with torch.device("meta"):
            model = UNet2DConditionModel(unet_config(config))
    else:
        model = diffusers_unet(unet_config(config))
    model.load_state_dict({k: v.clone() for k, v in load_file(weights).items()}, strict=True, assign=True)
    return model.train()


def call(kind, model, x, t, ctx):
    return model(x, t, ctx) if kind == "ours" else model(x, t, encoder_hidden_states=ctx).sample


def inputs(config: str, size: int, batch: int = 1, device="cpu"):
    cfg, g = unet_config(config), torch.Generator().manual_seed(0)
    return (torch.randn(batch, cfg.in_channels, size, size, generator=g), torch.full((batch,), 500),
            torch.randn(batch, 77, cfg.cross_attention_dim, generator=g))


def fwd(kind, model, x, t, ctx):
    with torch.no_grad():
        return call(kind, model, x, t, ctx)


def fwd_bwd(kind, model, x, t, ctx):
    call(kind, model, x, t, ctx).square().mean().backward()
    for p in model.parameters():
        p.grad = None


def count_flops(fn) -> int:
    """FLOPs of fn() by torch.utils.flop_counter, attention in its math form (so CPU SDPA is counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fns: dict, repeats: int, warmup: bool = True) -> dict:
    """{name: median seconds}: one warm-up each (if warmup), then the fns interleaved `repeats` times."""
    for f in fns.values() if warmup else ():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------- sections


def section_flops(args, res):
    with torch.device("meta"):
        model = UNet2DConditionModel(unet_config(args.config)).train()
    for size in args.flop_sizes:
        x, t, ctx = (a.to("meta") for a in inputs(args.config, size))
        res[f"flops_fwd_{size}"] = count_flops(lambda: fwd("ours", model, x, t, ctx))
        res[f"flops_fwdbwd_{size}"] = count_flops(lambda: call("ours", model, x, t, ctx).sum().backward())
        print(f"FLOPs per forward at {size}x{size} latents (batch 1): {res[f'flops_fwd_{size}'] / 1e9:.1f} GFLOP; "
              f"forward+backward {res[f'flops_fwdbwd_{size}'] / 1e9:.1f} GFLOP "
              f"({res[f'flops_fwdbwd_{size}'] / res[f'flops_fwd_{size}']:.2f}x)")


def section_gemm(args, res):
    best = 0.0
    for n in args.gemm_sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(max(3, args.repeats)):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    res["gemm_peak"] = best
    print(f"peak GEMM rate (best torch.mm, fp32, {args.threads} threads): {best / 1e9:.1f} GFLOP/s")


def section_forward(args, res):
    x, t, ctx = inputs(args.config, args.size)
    models = {kind: load(kind, args.config, args.weights) for kind in ("ours", "diffusers")}
    with torch.no_grad():
        diff = (fwd("ours", models["ours"], x, t, ctx) - fwd("diffusers", models["diffusers"], x, t, ctx)).abs().max().item()
    fns = {}
    for kind, m in models.items():
        fns[f"{kind} fwd"] = lambda kind=kind, m=m: fwd(kind, m, x, t, ctx)
        fns[f"{kind} fwd+bwd"] = lambda kind=kind, m=m: fwd_bwd(kind, m, x, t, ctx)
    times = timed(fns, args.repeats)
    res["forward"] = times
    flops = {"fwd": count_flops(lambda: fwd("ours", models["ours"], x, t, ctx)),
             "fwd+bwd": count_flops(lambda: fwd_bwd("ours", models["ours"], x, t, ctx))}
    peak = res.get("gemm_peak")
    print(f"\nforward at {args.size}x{args.size}, batch 1 (max |ours - diffusers| = {diff:.2g}); medians of {args.repeats}")
    print(f"{'':18} {'s':>8} {'GFLOP/s':>8} {'of peak':>8}")
    for name, s in times.items():
        f = flops[name.split()[1]]
        print(f"{name:18} {s:8.3f} {f / s / 1e9:8.1f} {(f / s / peak if peak else float('nan')):8.1%}")
    for mode in ("fwd", "fwd+bwd"):
        print(f"ratio ours / diffusers, {mode}: {times[f'ours {mode}'] / times[f'diffusers {mode}']:.3f}")
    if peak:
        print(f"physical limit (FLOPs / peak GEMM rate): fwd {flops['fwd'] / peak:.3f} s, fwd+bwd {flops['fwd+bwd'] / peak:.3f} s")


CATEGORIES = [  # operator name fragments -> class (first match)
    ("conv", ("conv",)), ("SDPA", ("scaled_dot_product", "flash_attention", "_softmax", "softmax")),
    ("matmul", ("addmm", "::mm", "bmm", "matmul", "linear", "baddbmm")), ("GroupNorm", ("group_norm",)),
    ("LayerNorm", ("layer_norm",)),
    ("elementwise", ("add", "mul", "silu", "gelu", "div", "sub", "cat", "copy_", "exp", "sin", "cos", "clone",
                     "contiguous", "upsample", "pow", "neg", "sigmoid", "fill", "zero", "empty", "chunk", "split")),
]


def section_profile(args, res):
    from torch.profiler import ProfilerActivity, profile

    model = load("ours", args.config, args.weights)
    x, t, ctx = inputs(args.config, args.size)
    fwd("ours", model, x, t, ctx)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fwd("ours", model, x, t, ctx)
    classes: dict[str, float] = {}
    ops: dict[str, float] = {}
    for e in prof.key_averages():
        cls = next((c for c, frags in CATEGORIES if any(f in e.key for f in frags)), "other")
        classes[cls] = classes.get(cls, 0.0) + e.self_cpu_time_total
        ops[e.key] = e.self_cpu_time_total
    total = sum(classes.values())
    res["profile"] = {k: v / 1e6 for k, v in classes.items()}
    print(f"\nprofile of one forward of ours at {args.size}x{args.size} (self CPU time, torch.profiler)")
    for cls, us in sorted(classes.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:12} {us / 1e6:8.3f} s {us / total:7.1%}")
    print("  top operators: " + ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8]))


def inplace_forwards():
    """No-grad forwards of the resnet block, transformer block and GEGLU with GroupNorm -> SiLU fused in place and
    in-place residual adds (the eager stand-in for a fused GroupNorm+SiLU kernel); the same values bit for bit."""
    import torch.nn.functional as F

    from npo_min import unet as U

    orig = {c: c.forward for c in (U.ResnetBlock2D, U.BasicTransformerBlock, U.GEGLU)}

    def resnet(self, x, temb):
        if torch.is_grad_enabled():
            return orig[U.ResnetBlock2D](self, x, temb)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h += self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))

    def block(self, x, context):
        if torch.is_grad_enabled():
            return orig[U.BasicTransformerBlock](self, x, context)
        x = x + self.attn1(self.norm1(x))
        x += self.attn2(self.norm2(x), context)
        x += self.ff(self.norm3(x))
        return x

    def geglu(self, x):
        if torch.is_grad_enabled():
            return orig[U.GEGLU](self, x)
        h, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(h)

    return orig, {U.ResnetBlock2D: resnet, U.BasicTransformerBlock: block, U.GEGLU: geglu}


def section_inplace(args, res):
    model = load("ours", args.config, args.weights)
    x, t, ctx = inputs(args.config, args.size, batch=2)  # the batched [c', c] pass of CFG sampling
    eager, fused = inplace_forwards()

    def run(forwards):
        for cls, f in forwards.items():
            cls.forward = f
        try:
            return fwd("ours", model, x, t, ctx)
        finally:
            for cls, f in eager.items():
                cls.forward = f

    diff = (run(eager) - run(fused)).abs().max().item()
    times = timed({"eager": lambda: run(eager), "in place": lambda: run(fused)}, args.repeats)
    res["inplace"] = times | {"max_diff": diff}
    print(f"\nno-grad forward at {args.size}x{args.size}, batch 2, eager vs GroupNorm+SiLU and residual adds in place "
          f"(max difference {diff:.2g}), medians of {args.repeats}: eager {times['eager']:.3f} s, in place "
          f"{times['in place']:.3f} s, ratio {times['in place'] / times['eager']:.3f}")


def section_tdft(args, res):
    model = load("ours", args.config, args.weights)
    x0, _, ctx = inputs(args.config, args.size)
    null = torch.zeros_like(ctx)
    schedule = NoiseSchedule.sd()
    g = torch.Generator().manual_seed(0)

    def tdft(k):
        cfg = SelfNPOConfig(k=k, start="noise")
        x_t, t, target = truncated_rollout(model, x0, ctx, null, schedule, cfg, g)
        tdft_loss(model, x_t, t, target, ctx, null, schedule, cfg, g).backward()
        for p in model.parameters():
            p.grad = None

    def plain():
        denoising_loss(model, x0, ctx, schedule, g).backward()
        for p in model.parameters():
            p.grad = None

    fns = {"plain fine-tuning": plain, **{f"TDFT K={k}": (lambda k=k: tdft(k)) for k in args.ks}}
    plain()  # the warm-up: one fwd+bwd warms every kernel the TDFT rows use (K = 25 is 27 forwards: not run twice)
    times = timed(fns, args.repeats, warmup=False)
    res["tdft"] = times
    x, t, _ = inputs(args.config, args.size)
    f_fwd = count_flops(lambda: fwd("ours", model, x, t, ctx))
    f_fb = count_flops(lambda: fwd_bwd("ours", model, x, t, ctx))
    fw = res.get("forward", {})
    t_fwd, t_fb = fw.get("ours fwd"), fw.get("ours fwd+bwd")
    peak = res.get("gemm_peak")
    print(f"\nSelf-NPO step cost at {args.size}x{args.size}, batch 1, from noise (medians of {args.repeats})")
    print(f"{'':18} {'measured s':>10} {'GFLOP':>8} {'FLOPs/peak s':>12} {'from fwd times s':>16}")
    for name, s in times.items():
        k = None if name.startswith("plain") else int(name.split("=")[1])
        flops = f_fb + (0 if k is None else (k + 1) * f_fwd)
        by_peak = f"{flops / peak:12.3f}" if peak else f"{'-':>12}"
        by_time = f"{t_fb + (0 if k is None else (k + 1) * t_fwd):16.3f}" if t_fwd else f"{'-':>16}"
        print(f"{name:18} {s:10.3f} {flops / 1e9:8.1f} {by_peak} {by_time}")


def status(field: str) -> int:
    """A /proc/self/status entry in bytes (VmRSS, VmHWM); bench_guidance and bench_unet use it too."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_worker(args, kind: str, ckpt: bool, dtype: str) -> None:
    """Subprocess: load, reset the peak-RSS counter, one fwd+bwd, print JSON."""
    model = load(kind, args.config, args.weights)
    if ckpt:
        if kind == "ours":
            model.gradient_checkpointing = True
        else:
            model.enable_gradient_checkpointing()
    x, t, ctx = inputs(args.config, args.size)
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = call(kind, model, x, t, ctx)
    out.float().square().mean().backward()
    print(json.dumps({"rss_before": before, "peak": status("VmHWM")}))


def section_memory(args, res):
    rows = [(kind, ckpt, dtype) for dtype in args.dtypes for ckpt in (False, True) for kind in ("ours", "diffusers")]
    out = {}
    for kind, ckpt, dtype in rows:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--size", str(args.size),
               "--threads", str(args.threads), "--weights", args.weights, "--worker", kind, str(int(ckpt)), dtype]
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[(kind, ckpt, dtype)] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"  {kind} checkpointing={ckpt} {dtype}: peak {out[(kind, ckpt, dtype)]['peak'] / GIB:.2f} GiB", flush=True)
    res["memory"] = {f"{k} ckpt={c} {d}": v for (k, c, d), v in out.items()}
    print(f"\ntraining memory, one fwd+bwd at {args.size}x{args.size}, batch 1 (peak RSS; extra = peak - weights loaded)")
    print(f"{'dtype':6} {'checkpointing':13} {'ours GiB':>9} {'extra':>7} {'diffusers GiB':>14} {'extra':>7} {'ours/diff extra':>16}")
    for dtype in args.dtypes:
        for ckpt in (False, True):
            o, d = out[("ours", ckpt, dtype)], out[("diffusers", ckpt, dtype)]
            eo, ed = o["peak"] - o["rss_before"], d["peak"] - d["rss_before"]
            print(f"{dtype:6} {str(ckpt):13} {o['peak'] / GIB:9.2f} {eo / GIB:7.2f} {d['peak'] / GIB:14.2f} {ed / GIB:7.2f} "
                  f"{eo / max(ed, 1):16.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd15", choices=sorted(PRESETS), help="UNet preset (tiny: a smoke run)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--size", type=int, default=32, help="latent side of the timed sections")
    p.add_argument("--flop-sizes", type=int, nargs="+", default=[32, 64], help="latent sides for the FLOP count")
    p.add_argument("--gemm-sizes", type=int, nargs="+", default=[1024, 2048, 3072])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 25], help="TDFT truncation K values")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"], help="memory: fp32 and / or bf16 autocast")
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return memory_worker(args, args.worker[0], bool(int(args.worker[1])), args.worker[2])
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.weights = str(Path(tmp) / "unet.safetensors")
        torch.manual_seed(0)
        model = UNet2DConditionModel(unet_config(args.config))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.weights)
        print(f"{args.config} UNet, {sum(v.numel() for v in model.state_dict().values()):,} parameters, float32, "
              f"{args.threads} threads; sections {' '.join(args.only)}")
        del model
        for name in SECTIONS:  # in this order: later sections use the peak rate and forward times
            if name in args.only:
                globals()[f"section_{name}"](args, res)
    return res


if __name__ == "__main__":
    main()
