"""Smoke tests: each benchmark script runs end to end on the tiny preset and returns its measurements.

The benchmarks themselves (full sd15, minutes) are never run by CI; their numbers are in README.md with the
commands that produced them. The memory sections start subprocesses: those runs are marked slow.
"""

import math

import pytest

import torch

import bench_guidance
import bench_self_npo


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The scripts set torch's thread count (--threads, default 2); later tests in this process must not inherit it
    (tests/test_resume.py compares an in-process run with single-threaded subprocesses bit for bit)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_guidance_tiny(capsys):
    res = bench_guidance.main(["--config", "tiny", "--size", "8", "--batch", "1", "--repeats", "1", "--no-memory"])
    rows = res[1]
    assert set(rows) == set(bench_guidance.ROWS) and all(r["median_s"] > 0 for r in rows.values())
    assert rows["lora-r8"]["vs_two_model"] <= 1e-5  # one pass = two models, in the benchmark's own setting
    assert rows["two-model"]["flops"] == rows["cfg"]["flops"] < rows["lora-r8"]["flops"] < rows["svd-r64"]["flops"]
    assert "one-pass lora-r8 vs two-model" in capsys.readouterr().out


def test_bench_self_npo_tiny(capsys):
    res = bench_self_npo.main(["--config", "tiny", "--only", "flops", "gemm", "forward", "profile", "inplace", "tdft", "--size", "8",
                               "--flop-sizes", "8", "--gemm-sizes", "128", "--ks", "1", "2", "--repeats", "1"])
    assert res["flops_fwd_8"] > 0 and res["flops_fwdbwd_8"] > 1.5 * res["flops_fwd_8"] and res["gemm_peak"] > 0
    assert set(res["tdft"]) == {"plain fine-tuning", "TDFT K=1", "TDFT K=2"} and all(math.isfinite(v) for v in res["tdft"].values())
    assert {"conv", "matmul"} <= set(res["profile"])
    assert res["inplace"]["max_diff"] == 0 and res["inplace"]["eager"] > 0  # the in-place forwards change no value
    assert "ratio ours / diffusers" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_memory_sections_tiny():
    res = bench_guidance.main(["--config", "tiny", "--size", "8", "--batch", "1", "--repeats", "1"])
    assert all(r["peak"] >= r["rss_before"] > 0 for r in res[1].values())
    res = bench_self_npo.main(["--config", "tiny", "--only", "memory", "--size", "8"])
    assert len(res["memory"]) == 8 and all(r["peak"] >= r["rss_before"] > 0 for r in res["memory"].values())
