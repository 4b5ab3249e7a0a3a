from __future__ import annotations

import numpy as np
import pytest

from haystack_integrations.common.multimodal_rag.numerics.statistics import (
    EcdfTable,
    FrozenSample,
    ScoreWindow,
    check_reference_distribution,
    ecdf_transform,
    fit_reference,
    ks_two_sample,
    mean_gap_change,
    minmax_transform,
    psi,
    psi_against_bins,
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


def test_score_window_keeps_the_last_scores_and_exact_running_moments() -> None:
    rng = np.random.default_rng(2)
    values = rng.normal(0.3, 0.1, 2537)
    window = ScoreWindow(1000)
    for i, value in enumerate(values):
        window.push(float(value))
        if i in (0, 1, 999, 1000, 1777, 2536):
            expected = values[max(0, i - 999) : i + 1]
            np.testing.assert_array_equal(window.values(), expected)
            assert window.count == expected.size
            assert window.mean() == pytest.approx(expected.mean(), rel=1e-12)
            assert window.variance() == pytest.approx(expected.var() if expected.size > 1 else 0.0, abs=1e-12)
    loaded = ScoreWindow(1000)
    loaded.load(values)
    np.testing.assert_array_equal(loaded.values(), window.values())
    loaded.push(1.0)
    assert loaded.values()[-1] == 1.0
    assert loaded.values()[0] == values[-999]
    empty = ScoreWindow(3)
    assert np.isnan(empty.mean())
    assert empty.variance() == 0.0


def test_frozen_sample_statistics_match_the_one_shot_functions() -> None:
    rng = np.random.default_rng(3)
    base, current = rng.normal(0, 1, 300), rng.normal(0.4, 1, 500)
    frozen = FrozenSample.of(base)
    assert frozen.size == 300
    assert frozen.mean == pytest.approx(base.mean())
    assert frozen.variance == pytest.approx(base.var())
    assert psi_against_bins(frozen.psi_edges, frozen.psi_shares, current) == pytest.approx(psi(base, current))
    assert ks_two_sample(frozen.sorted_values, current, sorted_a=True) == ks_two_sample(base, current)
    text, visual = ScoreWindow(100), ScoreWindow(100)
    for t, v in zip(rng.normal(0.6, 0.1, 100), rng.normal(0.3, 0.1, 100), strict=True):
        text.push(float(t))
        visual.push(float(v))
    magnitude, standard_error = mean_gap_change(text, visual, FrozenSample.of([0.5, 0.6]), FrozenSample.of([0.3]))
    assert magnitude == pytest.approx(abs((text.mean() - visual.mean()) - 0.25))
    assert standard_error == pytest.approx(np.sqrt(text.variance() / 100 + visual.variance() / 100 + 0.0025 / 2 + 0.0))


def test_ecdf_table_gives_the_same_result_as_the_quantile_list() -> None:
    quantiles = [0.0, 0.1, 0.1, 0.4, 1.0]
    probe = np.linspace(-0.5, 1.5, 41)
    np.testing.assert_array_equal(ecdf_transform(probe, EcdfTable.of(quantiles)), ecdf_transform(probe, quantiles))
    with pytest.raises(ValueError, match="at least 2 quantiles"):
        EcdfTable.of([0.3])


@pytest.mark.parametrize(
    ("dist", "need_moments", "message"),
    [
        ({"quantiles": [0.1, float("nan")]}, False, "finite"),
        ({"quantiles": [0.1, "x"]}, False, "finite numbers"),
        ({"quantiles": [0.2, 0.1]}, False, "non-decreasing"),
        ({"quantiles": [0.1]}, False, "at least 2"),
        ({"quantiles": [0.1, 0.2]}, True, "no 'mean'"),
        ({"quantiles": [0.1, 0.2], "mean": 0.1, "std": -1.0}, False, r"'std'\] must be a finite number >= 0"),
        ([0.1, 0.2], False, "must be a dict"),
    ],
)
def test_check_reference_distribution_names_what_is_wrong(dist, need_moments: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_reference_distribution(dist, name="reference['page']['dense']", need_moments=need_moments)
    check_reference_distribution(
        {"quantiles": [0.1, 0.2], "mean": 0.15, "std": 0.05}, name="ok", need_moments=need_moments
    )
