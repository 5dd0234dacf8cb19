"""Metrics for the digits model: classifier rewards, Frechet distance, paired win rate.

Rewards come from the digit classifier (`eval.benchmark.classifier`). Its probability of the intended
class saturates near 1 on good digits, so the rewards with headroom are the log-probability
and the logit margin. The Frechet distance is the FID formula (Heusel et al., 2017) applied to
the classifier's penultimate features instead of Inception features. The win rate compares two
samplers on the same (seed, class) pairs, ties counting for neither, as the Diffusion-NPO and
Self-NPO papers report it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def class_log_prob(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(intended class | image), shape `(B,)`, values <= 0.

    images: `(B, 1, 8, 8)` in [-1, 1]; labels: int64 `(B,)` in 0..9. Differentiable (wrap in
    `torch.no_grad()` to only score); the classifier should be in eval mode.
    """
    logp = classifier(images).log_softmax(dim=-1)  # (B, 10)
    return logp.gather(1, labels[:, None]).squeeze(1)


def class_margin(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Intended-class logit minus the largest other logit, shape `(B,)`; > 0 iff classified right.

    Same inputs as `class_log_prob`.
    """
    logits = classifier(images)  # (B, 10)
    target = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))  # hide the intended class
    return target - others.max(dim=1).values


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x.detach().cpu() if torch.is_tensor(x) else np.asarray(x), dtype=torch.float64)


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition (tiny negative eigenvalues -> 0)."""
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b), in float64:

        ||mu_a - mu_b||^2 + Tr(cov_a + cov_b - 2 (cov_a cov_b)^{1/2}).

    Tr((A B)^{1/2}) equals Tr((A^{1/2} B A^{1/2})^{1/2}) (the two matrices are similar), and the
    latter is symmetric PSD, so it is the sum of square roots of its eigenvalues: no complex
    numbers, no scipy.sqrtm.
    """
    mu_a, cov_a, mu_b, cov_b = map(_as_float64, (mu_a, cov_a, mu_b, cov_b))
    sa = _psd_sqrt(cov_a)
    m = sa @ cov_b @ sa
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = ((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt
    return max(d.item(), 0.0)  # rounding can push a true zero slightly below


def feature_stats(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean `(F,)` and unbiased covariance `(F, F)` (divide by N-1, as FID does) of `(N, F)` features."""
    x = _as_float64(feats)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got shape {tuple(x.shape)}.")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets `(N, F)` and `(M, F)`.

    Features are e.g. `DigitClassifier.features(images)` (F = 128). Lower is closer; 0 for
    identical sets; symmetric. Like FID it is biased upward for small N: compare numbers only at
    equal sample counts.
    """
    mu_a, cov_a = feature_stats(feats_a)
    mu_b, cov_b = feature_stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature widths differ: {mu_a.shape[0]} vs {mu_b.shape[0]}.")
    return frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b)


def _paired(scores_a, scores_b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_float64(scores_a).flatten(), _as_float64(scores_b).flatten()
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}: score the same prompts/seeds.")
    if len(a) == 0:
        raise ValueError("paired scores are empty: nothing to compare.")
    return a, b


def paired_win_rate(scores_a, scores_b) -> float:
    """Fraction of pairs i with scores_a[i] > scores_b[i]; ties count for neither side.

    scores_a, scores_b: `(N,)` rewards of two samplers on the same N (seed, class) pairs. So
    `win(a, b) + win(b, a) + ties = 1`, and 0.5 each only if there are no ties.

    Raises:
        ValueError: the lengths differ or are zero.
    """
    a, b = _paired(scores_a, scores_b)
    return (a > b).double().mean().item()


def bootstrap_ci(scores_a, scores_b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean paired difference mean(a - b) and its percentile bootstrap interval `(mean, lo, hi)`.

    The pairs are resampled with replacement `n_boot` times from a seeded generator, so the
    interval is reproducible. An interval excluding 0 suggests a real difference.
    """
    a, b = _paired(scores_a, scores_b)
    diff = a - b
    gen = torch.Generator().manual_seed(seed)
    means = torch.stack([diff[torch.randint(0, len(diff), (len(diff),), generator=gen)].mean() for _ in range(n_boot)])
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return diff.mean().item(), lo.item(), hi.item()


def _kth_neighbour_radius(feats: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of `feats (N, F)` to its k-th nearest other row, `(N,)`."""
    radii = []
    for part in feats.split(chunk):
        d = torch.cdist(part, feats)  # (n, N), includes the zero distance to itself
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: skip the point itself
    return torch.cat(radii)


def _in_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """`(Q,)` bool: query q lies within radius r_j of some centre j (||q - c_j|| <= r_j)."""
    return torch.cat([(torch.cdist(part, centres) <= radii[None]).any(dim=1) for part in queries.split(chunk)])


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Sec. 2), in a feature space.

    Each set's manifold is the union of balls around its points with radius = distance to the
    point's k-th nearest neighbour in the same set (k = 3 as in the paper). precision = share of
    fake samples inside the real manifold (fidelity); recall = share of real samples inside the fake
    manifold (diversity). Use equal set sizes: both depend on N. Features `(N, F)`, `(M, F)`, e.g.
    the classifier's `features(images)`; computed in float64.

    Raises:
        ValueError: a set with <= k points, or feature widths that differ.
    """
    real, fake = _as_float64(real_feats), _as_float64(fake_feats)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, F) and (M, F) of one width; got {tuple(real.shape)}, {tuple(fake.shape)}.")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} points per set; got {len(real)} and {len(fake)}.")
    precision = _in_any_ball(fake, real, _kth_neighbour_radius(real, k)).double().mean().item()
    recall = _in_any_ball(real, fake, _kth_neighbour_radius(fake, k)).double().mean().item()
    return precision, recall
