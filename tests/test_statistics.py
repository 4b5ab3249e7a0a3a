from __future__ import annotations

import numpy as np
import pytest

from haystack_integrations.common.multimodal_rag.numerics.statistics import (
    ecdf_transform,
    fit_reference,
    ks_two_sample,
    minmax_transform,
    psi,
    rank_percentiles,
    zscore_transform,
)


def test_fit_reference_is_compact_and_ecdf_maps_to_percentiles() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(0.4, 0.1, 5000)
    ref = fit_reference(scores, n_quantiles=101)
    assert len(ref["quantiles"]) == 101
    assert ref["count"] == 5000
    assert ref["mean"] == pytest.approx(0.4, abs=0.01)
    probe = np.array([0.4, 0.5, 0.3, -5.0, 5.0])
    got = ecdf_transform(probe, ref["quantiles"])
    np.testing.assert_allclose(got[:3], [0.5, 0.841, 0.159], atol=0.02)
    assert got[3] == 0.0
    assert got[4] == 1.0


def test_ecdf_of_tied_quantiles_maps_to_the_middle() -> None:
    assert ecdf_transform([1.0], [0.0, 1.0, 1.0, 1.0, 2.0])[0] == pytest.approx(0.5)


def test_transforms_handle_empty_and_degenerate_input() -> None:
    assert ecdf_transform([], [0.0, 1.0]).shape == (0,)
    assert minmax_transform([]).shape == (0,)
    np.testing.assert_array_equal(minmax_transform([0.2, 0.2]), [1.0, 1.0])
    np.testing.assert_allclose(zscore_transform([1.0, 3.0], 2.0, 0.0), [-1.0, 1.0])
    np.testing.assert_allclose(rank_percentiles([0.1, 0.3, 0.3, 0.2]), [0.25, 0.875, 0.875, 0.5])
    assert ks_two_sample([], [1.0]) == (0.0, 1.0)
    assert psi([], [1.0]) == 0.0
    with pytest.raises(ValueError, match="zero scores"):
        fit_reference([])
    with pytest.raises(ValueError, match="NaN"):
        fit_reference([0.1, float("nan")])


def test_ks_and_psi_separate_same_and_shifted_distributions() -> None:
    rng = np.random.default_rng(1)
    a, b, shifted = rng.normal(0, 1, 800), rng.normal(0, 1, 800), rng.normal(0.5, 1, 800)
    d_same, p_same = ks_two_sample(a, b)
    d_shift, p_shift = ks_two_sample(a, shifted)
    assert p_same > 0.05 > 1e-6 > p_shift
    assert d_shift > d_same
    assert psi(a, b) < 0.05 < psi(a, shifted)
