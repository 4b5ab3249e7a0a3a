"""Score statistics for calibration and drift monitoring: compact reference distributions, ECDF/z-score/min-max
transforms, the two-sample Kolmogorov-Smirnov test and the population stability index.

All functions take 1-D float arrays, handle empty input explicitly and never mutate their arguments.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Quantiles kept per reference distribution (probabilities 0, 0.01, ..., 1).
DEFAULT_N_QUANTILES = 101


def as_scores(values: Any) -> np.ndarray:
    """
    Convert to a 1-D float64 array.

    :param values: A sequence or array of numbers.
    :returns: `float64` array of shape `(n,)`.
    :raises ValueError: When `values` is not 1-D.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        msg = f"scores must be a 1-D sequence, got shape {array.shape}"
        raise ValueError(msg)
    return array


def fit_reference(values: Any, n_quantiles: int = DEFAULT_N_QUANTILES) -> dict[str, Any]:
    """
    Summarise a score distribution compactly: evenly spaced quantiles, mean, standard deviation, count.

    :param values: Scores, shape `(n,)`, finite, `n >= 1`.
    :param n_quantiles: How many quantiles to keep (>= 2), at probabilities `linspace(0, 1, n_quantiles)`.
    :returns: `{"quantiles": list[float], "mean": float, "std": float, "count": int}`.
    :raises ValueError: On empty or non-finite input.
    """
    scores = as_scores(values)
    if scores.size == 0:
        msg = "cannot fit a reference distribution from zero scores"
        raise ValueError(msg)
    if not np.isfinite(scores).all():
        msg = "cannot fit a reference distribution from NaN or infinite scores"
        raise ValueError(msg)
    if n_quantiles < 2:
        msg = f"n_quantiles must be at least 2, got {n_quantiles}"
        raise ValueError(msg)
    quantiles = np.quantile(scores, np.linspace(0.0, 1.0, n_quantiles))
    return {
        "quantiles": [round(float(q), 7) for q in quantiles],
        "mean": round(float(scores.mean()), 7),
        "std": round(float(scores.std()), 7),
        "count": int(scores.size),
    }


def ecdf_transform(values: Any, quantiles: Any) -> np.ndarray:
    """
    Map scores to their percentile in a reference distribution given by its quantiles (piecewise linear ECDF).

    :param values: Scores, shape `(n,)`.
    :param quantiles: Reference quantiles at evenly spaced probabilities from 0 to 1, shape `(k,)`, `k >= 2`,
        non-decreasing.
    :returns: `float64` array of shape `(n,)` in `[0, 1]`: 0 at or below the reference minimum, 1 at or above
        its maximum. Tied quantiles map to the middle of their probability range.
    """
    scores = as_scores(values)
    q = as_scores(quantiles)
    if q.size < 2:
        msg = "an ECDF reference needs at least 2 quantiles"
        raise ValueError(msg)
    if scores.size == 0:
        return np.zeros(0, dtype=np.float64)
    probs = np.linspace(0.0, 1.0, q.size)
    # Average the interpolation from both sides so that plateaus (tied quantiles) map to their midpoint.
    left = np.interp(scores, q, probs)
    right = 1.0 - np.interp(-scores, -q[::-1], probs)
    return np.clip((left + right) / 2.0, 0.0, 1.0)


def zscore_transform(values: Any, mean: float, std: float) -> np.ndarray:
    """
    Standardise scores against a reference mean and standard deviation.

    :param values: Scores, shape `(n,)`.
    :param mean: Reference mean.
    :param std: Reference standard deviation; a zero or non-finite value is treated as 1.
    :returns: `float64` array of shape `(n,)`.
    """
    scores = as_scores(values)
    scale = std if (std > 0 and math.isfinite(std)) else 1.0
    return (scores - mean) / scale


def minmax_transform(values: Any) -> np.ndarray:
    """
    Min-max normalise scores within their own set (the per-query approach).

    :param values: Scores, shape `(n,)`.
    :returns: `float64` array in `[0, 1]`; all ones when every score is equal (the best of any set becomes 1).
    """
    scores = as_scores(values)
    if scores.size == 0:
        return scores.copy()
    low, high = float(scores.min()), float(scores.max())
    if high - low <= 0:
        return np.ones_like(scores)
    return (scores - low) / (high - low)


def rank_percentiles(values: Any) -> np.ndarray:
    """
    Percentile of each score within its own set (ECDF fitted on the set itself; ties share their mid-rank).

    :param values: Scores, shape `(n,)`.
    :returns: `float64` array in `(0, 1]`.
    """
    scores = as_scores(values)
    n = scores.size
    if n == 0:
        return scores.copy()
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(n, dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks / n


def _kolmogorov_sf(lam: float) -> float:
    """Survival function of the Kolmogorov distribution (asymptotic KS p-value)."""
    if lam < 0.2:
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = 2.0 * (-1.0) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
    return min(1.0, max(0.0, total))


def ks_two_sample(a: Any, b: Any) -> tuple[float, float]:
    """
    Two-sample Kolmogorov-Smirnov test.

    :param a: First sample, shape `(n,)`.
    :param b: Second sample, shape `(m,)`.
    :returns: `(statistic D, asymptotic p-value)`; `(0.0, 1.0)` when either sample is empty.
    """
    x = np.sort(as_scores(a))
    y = np.sort(as_scores(b))
    n, m = x.size, y.size
    if n == 0 or m == 0:
        return 0.0, 1.0
    grid = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, grid, side="right") / n
    cdf_y = np.searchsorted(y, grid, side="right") / m
    d = float(np.max(np.abs(cdf_x - cdf_y)))
    en = math.sqrt(n * m / (n + m))
    return d, _kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def psi(baseline: Any, current: Any, n_bins: int = 10, eps: float = 1e-4) -> float:
    """
    Population stability index of `current` against `baseline`, on quantile bins of the baseline.

    :param baseline: Reference sample, shape `(n,)`.
    :param current: Current sample, shape `(m,)`.
    :param n_bins: Number of bins (baseline deciles by default).
    :param eps: Floor for empty-bin proportions.
    :returns: PSI (0 when identical; > 0.25 is conventionally a major shift); 0.0 when either sample is empty.
    """
    base = as_scores(baseline)
    cur = as_scores(current)
    if base.size == 0 or cur.size == 0:
        return 0.0
    edges = np.unique(np.quantile(base, np.linspace(0.0, 1.0, n_bins + 1))[1:-1])
    base_p = np.bincount(np.searchsorted(edges, base, side="right"), minlength=edges.size + 1) / base.size
    cur_p = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1) / cur.size
    base_p = np.maximum(base_p, eps)
    cur_p = np.maximum(cur_p, eps)
    return float(np.sum((cur_p - base_p) * np.log(cur_p / base_p)))
