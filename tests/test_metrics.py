"""Tests for eval.metrics and the shipped digit classifier (weights/digits_classifier)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.benchmark.classifier import load_classifier
from eval.metrics import (
    bootstrap_ci,
    class_log_prob,
    class_margin,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    paired_win_rate,
)
from npo_min.digits import load_digits

CLASSIFIER = Path(__file__).resolve().parents[1] / "weights" / "digits_classifier"


def star_points(mu: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Points mu +- s_i e_i: sample mean exactly mu, sample covariance exactly diag(2 s_i^2 / (N-1))."""
    eye = np.diag(scales)
    return np.concatenate([mu + eye, mu - eye])


def random_rotation(n: int, rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q


# ---- Frechet distance ------------------------------------------------------------------------

def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
    sa, sb = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    a, b = star_points(mu_a, sa), star_points(mu_b, sb)  # N = 10 each
    var_a, var_b = 2 * sa**2 / 9, 2 * sb**2 / 9
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_frechet_commuting_covariances():
    # Same eigenvectors: (Ca Cb)^{1/2} = Q diag(sqrt(la lb)) Q^T, so the trace term is sum (sqrt la - sqrt lb)^2.
    rng = np.random.default_rng(1)
    q = random_rotation(6, rng)
    la, lb = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    d = frechet_distance_from_stats(mu_a, q @ np.diag(la) @ q.T, mu_b, q @ np.diag(lb) @ q.T)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(la) - np.sqrt(lb)) ** 2).sum()
    assert d == pytest.approx(expected, rel=1e-10)


def test_frechet_2x2_non_commuting():
    # For 2x2 PSD A, B: Tr((AB)^{1/2}) = sqrt(Tr(AB) + 2 sqrt(det A det B)) (eigenvalues of AB are >= 0).
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
    ca, cb = x @ x.T + 0.1 * np.eye(2), y @ y.T + 0.1 * np.eye(2)
    tr_sqrt = math.sqrt(np.trace(ca @ cb) + 2 * math.sqrt(np.linalg.det(ca) * np.linalg.det(cb)))
    expected = np.trace(ca) + np.trace(cb) - 2 * tr_sqrt
    assert frechet_distance_from_stats(np.zeros(2), ca, np.zeros(2), cb) == pytest.approx(expected, rel=1e-9)


def test_frechet_1d_gaussians():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 2.0, size=(500, 1)), rng.normal(-0.5, 0.7, size=(300, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_frechet_identical_zero_and_symmetric():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))  # correlated features
    b = rng.normal(size=(150, 16)) * 1.3 + 0.2
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.tensor(a, dtype=torch.float32), a) == pytest.approx(0.0, abs=1e-4)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0


def test_frechet_rank_deficient_is_finite():
    # Fewer samples than features: singular covariances must not produce NaN.
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32))
    d = frechet_distance(a, b)
    assert math.isfinite(d) and d >= 0


def test_feature_stats_matches_numpy():
    x = np.random.default_rng(6).normal(size=(50, 4))
    mu, cov = feature_stats(x)
    np.testing.assert_allclose(mu.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(x[:1])
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(x, x[:, :3])


# ---- win rate and bootstrap ------------------------------------------------------------------

def test_win_rate_with_ties():
    a = [3.0, 1.0, 2.0, 5.0]
    b = [1.0, 1.0, 4.0, 2.0]  # a wins 2, tie 1, b wins 1
    assert paired_win_rate(a, b) == 0.5
    assert paired_win_rate(b, a) == 0.25
    assert paired_win_rate(a, a) == 0.0
    assert paired_win_rate(torch.tensor(a), torch.tensor(b)) == 0.5


def test_win_rate_errors():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        paired_win_rate([], [])


def test_bootstrap_ci_seeded_and_covers_mean():
    rng = np.random.default_rng(7)
    a, b = rng.normal(0.3, 1, 400), rng.normal(0.0, 1, 400)
    mean, lo, hi = bootstrap_ci(a, b, n_boot=500, seed=0)
    assert mean == pytest.approx((a - b).mean())
    assert lo < mean < hi and lo > 0  # a true 0.3 shift is detected at n=400
    assert bootstrap_ci(a, b, n_boot=500, seed=0) == (mean, lo, hi)


# ---- the shipped classifier and the rewards --------------------------------------------------

@pytest.fixture(scope="module")
def classifier():
    if not (CLASSIFIER / "model.safetensors").exists():
        pytest.fail(f"{CLASSIFIER} missing: run `python -m eval.benchmark.classifier --out weights/digits_classifier`.")
    return load_classifier(CLASSIFIER)


@pytest.fixture(scope="module")
def test_split():
    return load_digits("test")


def test_classifier_held_out_accuracy(classifier, test_split):
    x, y = test_split
    with torch.no_grad():
        acc = (classifier(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.97, f"held-out accuracy {acc:.4f} < 0.97"


def test_features_shape(classifier, test_split):
    x, _ = test_split
    with torch.no_grad():
        f = classifier.features(x[:7])
    assert f.shape == (7, classifier.config["feature_dim"])


def test_log_prob_and_margin_consistent(classifier, test_split):
    x, y = test_split
    wrong = (y + 1) % 10
    with torch.no_grad():
        probs = classifier(x).softmax(-1)
        lp, lp_wrong = class_log_prob(classifier, x, y), class_log_prob(classifier, x, wrong)
        margin = class_margin(classifier, x, y)
    assert lp.shape == margin.shape == y.shape
    assert (lp <= 0).all()
    torch.testing.assert_close(lp.exp(), probs[torch.arange(len(y)), y], rtol=1e-5, atol=1e-6)
    assert lp.mean() > lp_wrong.mean()
    assert ((margin > 0) == (probs.argmax(1) == y)).all()
    # Real test digits beat their own label-shifted versions on nearly every pair.
    assert paired_win_rate(lp, lp_wrong) > 0.95


def test_frechet_real_features(classifier, test_split):
    # Test vs train features of real digits are far closer than test vs noise.
    x_test, _ = test_split
    x_train, _ = load_digits("train")
    noise = torch.rand(x_test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        f_test, f_train, f_noise = (classifier.features(z) for z in (x_test, x_train[:359], noise))
    assert frechet_distance(f_test, f_train) < 0.2 * frechet_distance(f_test, f_noise)


def test_precision_recall_kynkaanniemi():
    from eval.metrics import precision_recall

    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)  # every point lies in its own ball
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)  # disjoint manifolds
    collapsed = real[:1].repeat(50, 1) + 1e-6 * torch.randn(50, 8, generator=g)  # one mode, faithful
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05  # high fidelity, no diversity: the trade it must show
    wide = 3 * torch.randn(200, 8, generator=g)  # diverse but mostly off the real manifold
    p_wide, r_wide = precision_recall(real, wide)
    assert p_wide < 0.5 and r_wide > 0.9
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(real[:3], real)
