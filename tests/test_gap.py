"""eval/benchmark/gap.py: the gap to a baseline's (FD, margin) curve at equal FD, and its standard error."""

import math

import pytest
import torch

from eval.benchmark.gap import family, fd_at_margin, format_gaps, gap_table, gaps, margin_at_fd, winners


def test_family_strips_only_the_training_seed_suffix():
    assert family("self-npo-k5-seed1") == "self-npo-k5"
    assert family("k5-beta0.5-seed12") == "k5-beta0.5"
    assert family("self-npo-k5") == "self-npo-k5" and family("seed1") == "seed1"


def test_margin_at_fd_is_the_best_margin_at_no_worse_fd():
    curve = [(10.0, 1.0), (20.0, 3.0), (15.0, 4.0)]  # FD goes down again from the second scale on
    assert margin_at_fd(curve, 12.0) == pytest.approx(1.4)  # the first vertex or the first segment's crossing
    assert margin_at_fd(curve, 17.0) == pytest.approx(4.0)  # the third vertex (FD 15) dominates both crossings
    assert margin_at_fd(curve, 25.0) == pytest.approx(4.0)  # beyond the range: the best anywhere at a lower FD
    assert margin_at_fd([(10.0, 1.0), (20.0, 3.0)], 17.0) == pytest.approx(2.4)
    assert math.isnan(margin_at_fd(curve, 9.0))  # closer to the data than the baseline ever gets
    assert margin_at_fd([(5.0, 2.0)], 6.0) == 2.0 and math.isnan(margin_at_fd([(5.0, 2.0)], 4.0))


def test_fd_at_margin_is_the_lowest_fd_at_no_worse_margin():
    curve = [(10.0, 1.0), (20.0, 3.0), (15.0, 4.0)]
    assert fd_at_margin(curve, 2.0) == pytest.approx(15.0)  # the third vertex (margin 4) beats the crossing at FD 15
    assert fd_at_margin(curve, 0.5) == pytest.approx(10.0) and fd_at_margin(curve, 3.5) == pytest.approx(15.0)
    assert math.isnan(fd_at_margin(curve, 4.5))  # a margin the baseline never reaches


def test_fd_gain_positive_when_closer_to_the_data_at_equal_margin():
    cfg = [(1.5, 10.0, 1.0), (3.0, 20.0, 3.0), (5.0, 30.0, 4.0)]
    g = gaps({"cfg": cfg, "same": cfg, "closer": [(2.0, 8.0, 2.0)], "further": [(2.0, 25.0, 2.0)]}, "cfg", "fd")
    assert g["same"] == [0.0, 0.0, 0.0]
    assert g["closer"] == [pytest.approx(15.0 - 8.0)] and g["further"] == [pytest.approx(15.0 - 25.0)]


def test_gaps_zero_for_the_baseline_itself_and_signed_otherwise():
    cfg = [(1.5, 10.0, 1.0), (3.0, 20.0, 3.0), (5.0, 30.0, 4.0)]
    g = gaps({"cfg": cfg, "same": cfg, "above": [(3.0, 15.0, 2.5)], "below": [(3.0, 25.0, 3.0)],
              "dominated": [(1.5, 24.0, 1.0), (3.0, 14.0, 2.5)]}, "cfg")
    assert g["same"] == [0.0, 0.0, 0.0]
    assert g["above"] == [pytest.approx(0.5)] and g["below"] == [pytest.approx(-0.5)]  # CFG at FD 15: 2.0; at 25: 3.5
    # its scale-1.5 point is beaten by its own scale 3 (lower FD, higher margin): its frontier at FD 24 is 2.5
    assert g["dominated"] == [pytest.approx(2.5 - 3.4), pytest.approx(2.5 - 1.8)]


def synthetic(n=400, seed=0):
    """CFG rows whose FD grows with the scale (feature mean shifted), margins rising with the scale."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, 4, generator=g)
    samples = {}
    for scale, shift in ((1.5, 0.2), (3.0, 0.6), (5.0, 1.0)):
        feats = torch.randn(n, 4, generator=g) + shift
        samples["cfg", scale] = (torch.randn(n, generator=g) + scale, feats)
    return ref, samples, g


def test_gap_table_seed_mean_and_seed_error_exact():
    ref, samples, _ = synthetic()
    for scale in (1.5, 3.0, 5.0):
        m, f = samples["cfg", scale]
        samples["m", scale] = (m + 1.0, f)        # same features = same FD: the gap is the margin shift
        samples["m-seed1", scale] = (m + 3.0, f)
    rows = gap_table(samples, ref, ["cfg"], n_boot=20)
    assert len(rows) == 6 and {r["family"] for r in rows} == {"m"} and {r["measure"] for r in rows} == {"margin", "fd"}
    rows = [r for r in rows if r["measure"] == "margin"]
    for r in rows:
        assert r["seeds"] == 2 and r["gap"] == pytest.approx(2.0)
        assert r["se_seeds"] == pytest.approx(1.0)   # std(1, 3) / sqrt(2)
        assert r["se_sample"] == pytest.approx(0.0, abs=1e-6) and r["z"] == pytest.approx(2.0)


def test_gap_table_sample_error_matches_the_paired_mean_difference():
    ref, samples, g = synthetic(n=400)
    diffs = {}
    for scale in (1.5, 3.0, 5.0):
        m, f = samples["cfg", scale]
        other = m + 0.1 + torch.randn(len(m), generator=g)  # noisy per-sample margins, the same images' features
        samples["m", scale] = (other, f)
        diffs[scale] = other - m
    rows = gap_table(samples, ref, ["cfg"], n_boot=400, seed=1)
    for r in (r for r in rows if r["measure"] == "margin"):
        d = diffs[r["guidance_scale"]]
        assert r["gap"] == pytest.approx(d.mean().item(), abs=1e-6)
        assert math.isnan(r["se_seeds"]) and r["seeds"] == 1
        analytic = (d.std() / len(d) ** 0.5).item()
        assert r["se_sample"] == pytest.approx(analytic, rel=0.25)  # bootstrap SE of a paired mean


def test_gap_undefined_below_the_baselines_fd_range():
    ref, samples, _ = synthetic()
    m, _ = samples["cfg", 5.0]
    samples["near", 5.0] = (m, ref.clone())  # FD 0: closer to the data than any CFG scale
    rows = gap_table(samples, ref, ["cfg"], n_boot=5)
    row = next(r for r in rows if r["measure"] == "margin")
    assert math.isnan(row["gap"]) and math.isnan(row["z"])
    assert "| near (1) | - |" in format_gaps([row], "cfg")
    fd = next(r for r in rows if r["measure"] == "fd")  # the other way round it is defined: same margin, lower FD
    assert fd["gap"] > 0 and "| near (1) | +" in format_gaps(rows, "cfg", "fd")


def test_winners_need_every_defined_baseline():
    row = lambda fam, base, gap, z: {"family": fam, "baseline": base, "guidance_scale": 3.0, "gap": gap, "z": z}
    rows = [row("a", "cfg", 1.0, 3.0), row("a", "auto", 1.0, 2.5),       # above both: a winner
            row("b", "cfg", 1.0, 3.0), row("b", "auto", 0.1, 0.5),       # not above autoguidance by 2 SE
            row("c", "cfg", 1.0, 2.1), row("c", "auto", math.nan, math.nan),  # autoguidance undefined: counts by CFG
            row("d", "cfg", math.nan, math.nan), row("d", "auto", 1.0, 9.0)]  # no CFG gap: never a winner
    assert winners(rows) == [("a", 3.0), ("c", 3.0)]
