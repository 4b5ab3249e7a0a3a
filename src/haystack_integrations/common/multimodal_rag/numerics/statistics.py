"""Score statistics for calibration and drift monitoring: compact reference distributions, ECDF/z-score/min-max
transforms, the two-sample Kolmogorov-Smirnov test, the population stability index, a sliding score window
and the drift tests the monitor runs on it.

Pure: no I/O, no logging. All functions take 1-D float arrays, handle empty input explicitly and never mutate
their arguments.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
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
    with np.errstate(over="ignore"):  # scores near the float limit: an infinite mean/std, refused by the caller
        mean, std = float(scores.mean()), float(scores.std())
    return {
        "quantiles": [round(float(q), 7) for q in quantiles],
        "mean": round(mean, 7),
        "std": round(std, 7),
        "count": int(scores.size),
    }


def ecdf_transform(values: Any, quantiles: Any) -> np.ndarray:
    """
    Map scores to their percentile in a reference distribution given by its quantiles (piecewise linear ECDF).

    :param values: Scores, shape `(n,)`.
    :param quantiles: Reference quantiles at evenly spaced probabilities from 0 to 1, shape `(k,)`, `k >= 2`,
        non-decreasing; or an `EcdfTable` built once from them (faster when the reference is reused).
    :returns: `float64` array of shape `(n,)` in `[0, 1]`: 0 at or below the reference minimum, 1 at or above
        its maximum. Tied quantiles map to the middle of their probability range.
    """
    table = quantiles if isinstance(quantiles, EcdfTable) else EcdfTable.of(quantiles)
    scores = as_scores(values)
    if scores.size == 0:
        return np.zeros(0, dtype=np.float64)
    # Average the interpolation from both sides so that plateaus (tied quantiles) map to their midpoint. Both
    # interpolations lie in [0, 1] (np.interp clamps to the end values 0 and 1), so their mean does too.
    left = np.interp(scores, table.quantiles, table.probs)
    right = np.interp(-scores, table.reversed_negated, table.probs)
    right = 1.0 - right
    left += right
    left *= 0.5
    return left


@dataclass(frozen=True)
class EcdfTable:
    """The arrays `ecdf_transform` interpolates in, built once per reference distribution."""

    quantiles: np.ndarray
    reversed_negated: np.ndarray
    probs: np.ndarray

    @classmethod
    def of(cls, quantiles: Any) -> EcdfTable:
        """
        Build the table.

        :param quantiles: Reference quantiles at evenly spaced probabilities from 0 to 1, shape `(k,)`, `k >= 2`.
        :returns: The table.
        :raises ValueError: With fewer than 2 quantiles.
        """
        q = as_scores(quantiles)
        if q.size < 2:
            msg = "an ECDF reference needs at least 2 quantiles"
            raise ValueError(msg)
        return cls(q, -q[::-1], np.linspace(0.0, 1.0, q.size))


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


def ks_two_sample(a: Any, b: Any, *, sorted_a: bool = False) -> tuple[float, float]:
    """
    Two-sample Kolmogorov-Smirnov test.

    :param a: First sample, shape `(n,)`.
    :param b: Second sample, shape `(m,)`.
    :param sorted_a: `a` is already sorted ascending (a frozen baseline): skips sorting it again.
    :returns: `(statistic D, asymptotic p-value)`; `(0.0, 1.0)` when either sample is empty.
    """
    x = as_scores(a) if sorted_a else np.sort(as_scores(a))
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
    edges, base_p = psi_bins(base, n_bins, eps)
    return psi_against_bins(edges, base_p, cur, eps)


def psi_bins(baseline: Any, n_bins: int = 10, eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """
    The baseline side of `psi`: inner quantile bin edges and the baseline's (floored) share per bin.

    :param baseline: Reference sample, shape `(n,)`, `n >= 1`.
    :param n_bins: Number of bins.
    :param eps: Floor for empty-bin proportions.
    :returns: `(edges, shares)`: shapes `(k,)` and `(k + 1,)`, `k <= n_bins - 1` (tied edges merged).
    """
    base = as_scores(baseline)
    edges = np.unique(np.quantile(base, np.linspace(0.0, 1.0, n_bins + 1))[1:-1])
    base_p = np.bincount(np.searchsorted(edges, base, side="right"), minlength=edges.size + 1) / base.size
    return edges, np.maximum(base_p, eps)


def psi_against_bins(edges: np.ndarray, base_shares: np.ndarray, current: Any, eps: float = 1e-4) -> float:
    """
    PSI of `current` against bins from `psi_bins` (computed once for a frozen baseline).

    :param edges: Inner bin edges, shape `(k,)`.
    :param base_shares: Baseline share per bin, shape `(k + 1,)`.
    :param current: Current sample, shape `(m,)`.
    :param eps: Floor for empty-bin proportions.
    :returns: PSI; 0.0 when `current` is empty.
    """
    cur = as_scores(current)
    if cur.size == 0:
        return 0.0
    cur_p = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1) / cur.size
    cur_p = np.maximum(cur_p, eps)
    return float(np.sum((cur_p - base_shares) * np.log(cur_p / base_shares)))


def check_reference_distribution(dist: Any, *, name: str, need_moments: bool) -> None:
    """
    Validate one fitted reference distribution (as `fit_reference` returns it).

    :param dist: The distribution: `{"quantiles": [...], "mean": float, "std": float, ...}`.
    :param name: How messages name it (e.g. `"reference['image']['dense']"`).
    :param need_moments: `mean` and `std` are required (the z-score method uses them).
    :raises ValueError: When the quantiles are missing, fewer than 2, not finite or decreasing, or when `mean`/`std`
        are required and missing, or present and not finite (`std` also negative).
    """
    if not isinstance(dist, Mapping):
        msg = f"{name} must be a dict with 'quantiles' (and 'mean'/'std'), got {type(dist).__name__}"
        raise ValueError(msg)
    quantiles = dist.get("quantiles")
    if not isinstance(quantiles, list | tuple) or len(quantiles) < 2:
        msg = f"{name} needs a 'quantiles' list of at least 2 values"
        raise ValueError(msg)
    values = [_number(q) for q in quantiles]
    if any(v is None or not math.isfinite(v) for v in values):
        msg = f"{name} quantiles must be finite numbers (got NaN, infinity or a non-number)"
        raise ValueError(msg)
    if any(b < a for a, b in itertools.pairwise(values)):  # type: ignore[operator]
        msg = f"{name} quantiles must be non-decreasing"
        raise ValueError(msg)
    for key in ("mean", "std"):
        if key not in dist:
            if need_moments:
                msg = f"{name} has no '{key}': the zscore method needs the reference mean and std (refit with fit())"
                raise ValueError(msg)
            continue
        value = _number(dist[key])
        if value is None or not math.isfinite(value) or (key == "std" and value < 0):
            msg = f"{name}['{key}'] must be a finite number{' >= 0' if key == 'std' else ''}, got {dist[key]!r}"
            raise ValueError(msg)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class ScoreWindow:
    """
    The most recent `size` scores, with O(1) running sums (recomputed exactly every `size` pushes).

    Not thread-safe: the caller serialises access.
    """

    def __init__(self, size: int) -> None:
        """
        Create an empty window.

        :param size: Capacity, >= 1.
        """
        self.size = size
        self._data = np.zeros(size, dtype=np.float64)
        self.count = 0
        self._pos = 0
        self._total = 0.0
        self._total_sq = 0.0
        self._pushes = 0

    def push(self, value: float) -> None:
        """
        Append one finite score, evicting the oldest when full.

        :param value: The score.
        """
        data = self._data
        if self.count == self.size:
            old = float(data[self._pos])
            self._total -= old
            self._total_sq -= old * old
        else:
            self.count += 1
        data[self._pos] = value
        self._total += value
        self._total_sq += value * value
        self._pos += 1
        if self._pos == self.size:
            self._pos = 0
        self._pushes += 1
        if self._pushes >= self.size:
            # Bound the rounding error that add/subtract accumulates.
            self._pushes = 0
            values = self.values()
            self._total = math.fsum(values)
            self._total_sq = math.fsum(values * values)

    def values(self) -> np.ndarray:
        """
        The scores, oldest first.

        :returns: `float64` array of shape `(count,)` (a copy when the window has wrapped around).
        """
        if self.count < self.size:
            return self._data[: self.count]
        return np.concatenate([self._data[self._pos :], self._data[: self._pos]])

    def mean(self) -> float:
        """:returns: The mean score, NaN when empty."""
        return self._total / self.count if self.count else float("nan")

    def variance(self) -> float:
        """:returns: The population variance, 0.0 with fewer than 2 scores."""
        if self.count < 2:
            return 0.0
        mean = self._total / self.count
        return max(0.0, self._total_sq / self.count - mean * mean)

    def load(self, values: Any) -> None:
        """
        Replace the content with the last `size` of `values` (oldest first).

        :param values: Scores, shape `(n,)`.
        """
        tail = as_scores(values)[-self.size :]
        n = tail.size
        self._data[:n] = tail
        self.count = n
        self._pos = n % self.size
        self._total = math.fsum(tail)
        self._total_sq = math.fsum(tail * tail)
        self._pushes = 0


@dataclass(frozen=True)
class FrozenSample:
    """
    A frozen baseline sample with the statistics the drift tests reuse on every call.

    Build it with `FrozenSample.of(values)`.
    """

    sorted_values: np.ndarray
    mean: float
    variance: float
    psi_edges: np.ndarray
    psi_shares: np.ndarray

    @classmethod
    def of(cls, values: Any) -> FrozenSample:
        """
        Summarise a non-empty sample.

        :param values: Scores, shape `(n,)`, `n >= 1`.
        :returns: The summary.
        """
        scores = np.sort(as_scores(values))
        edges, shares = psi_bins(scores)
        return cls(scores, float(scores.mean()), float(scores.var()), edges, shares)

    @property
    def size(self) -> int:
        """:returns: The number of scores."""
        return int(self.sorted_values.size)


def mean_gap_change(
    text: ScoreWindow, visual: ScoreWindow, base_text: FrozenSample, base_visual: FrozenSample
) -> tuple[float, float]:
    """
    Change of the text-minus-visual mean score gap against a baseline, and its standard error.

    The standard error combines the sampling error of all four means (both windows and both baseline samples).

    :param text: Window of recent text scores (non-empty).
    :param visual: Window of recent image/page scores (non-empty).
    :param base_text: Baseline text scores.
    :param base_visual: Baseline image/page scores.
    :returns: `(|gap - baseline_gap|, standard error)`.
    """
    gap = text.mean() - visual.mean()
    baseline_gap = base_text.mean - base_visual.mean
    standard_error = math.sqrt(
        text.variance() / text.count
        + visual.variance() / visual.count
        + base_text.variance / base_text.size
        + base_visual.variance / base_visual.size
    )
    return abs(gap - baseline_gap), standard_error
