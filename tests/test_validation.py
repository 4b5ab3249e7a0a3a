"""The shared parameter validators (`validation.check_int` / `check_number` / `check_positive_int`)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from haystack_integrations.common.multimodal_rag.numerics.ranking import (
    call_top_k_and_threshold,
    check_top_k_and_threshold,
)
from haystack_integrations.common.multimodal_rag.validation import check_int, check_number, check_positive_int


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (0, {"minimum": 1}, "n must be a positive integer, got 0"),
        (-1, {}, "n must be a non-negative integer, got -1"),
        (True, {}, "n must be a non-negative integer, got True"),
        (1.0, {"minimum": 1}, "n must be a positive integer, got 1.0"),
        ("3", {}, "n must be a non-negative integer, got '3'"),
        (1, {"minimum": 2}, "n must be an integer >= 2, got 1"),
        (256, {"minimum": 1, "maximum": 255}, r"n must be an integer in \[1, 255\], got 256"),
    ],
)
def test_check_int_refuses_with_the_parameter_name_and_the_rule(value: object, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_int("n", value, **kwargs)


def test_check_int_and_check_positive_int_accept_in_range_integers() -> None:
    assert check_int("n", 0) == 0
    assert check_int("n", 255, minimum=1, maximum=255) == 255
    check_positive_int("n", 1)
    with pytest.raises(ValueError, match=r"^n must be a positive integer, got 0$"):
        check_positive_int("n", 0)


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (1.5, {"minimum": 0.0, "maximum": 1.0}, r"a must be a number in \[0, 1\], got 1.5"),
        (math.inf, {"minimum": 0.0, "maximum": 1.0}, r"a must be a number in \[0, 1\], got inf"),
        (0.5, {"minimum": 1.0}, "a must be a finite number >= 1, got 0.5"),
        (math.inf, {"minimum": 1.0}, "a must be a finite number >= 1, got inf"),
        (math.nan, {}, "a must be a finite number, got nan"),
        (False, {}, "a must be a finite number, got False"),
        ("1", {}, "a must be a finite number, got '1'"),
        (0, {"above": 0.0}, "a must be a positive number, got 0"),
        (math.inf, {"above": 0.0}, "a must be a positive number, got inf"),
        (math.nan, {"above": 0.0, "finite": False}, "a must be a positive number, got nan"),
    ],
)
def test_check_number_refuses_with_the_parameter_name_and_the_rule(value: object, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_number("a", value, **kwargs)


def test_check_number_returns_a_float_and_can_allow_infinity() -> None:
    assert check_number("a", 1, minimum=0.0, maximum=1.0) == 1.0
    assert isinstance(check_number("a", 1), float)
    assert check_number("a", math.inf, above=0.0, finite=False) == math.inf


@pytest.mark.parametrize(
    ("top_k", "threshold", "message"),
    [
        (-1, None, "top_k must be a non-negative integer, got -1"),
        (2.0, None, "top_k must be a non-negative integer, got 2.0"),
        (None, math.nan, "score_threshold must be a finite number, got nan"),
        (None, True, "score_threshold must be a finite number, got True"),
    ],
)
def test_check_top_k_and_threshold_uses_the_shared_validators(top_k: object, threshold: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_top_k_and_threshold(top_k, threshold)  # type: ignore[arg-type]
    check_top_k_and_threshold(0, None)
    check_top_k_and_threshold(None, -3.5)


def test_call_top_k_and_threshold_falls_back_to_the_init_values_and_validates() -> None:
    ranker = SimpleNamespace(top_k=5, score_threshold=0.25)
    assert call_top_k_and_threshold(ranker, None, None) == (5, 0.25)
    assert call_top_k_and_threshold(ranker, 0, -1.0) == (0, -1.0)
    with pytest.raises(ValueError, match=r"^top_k must be a non-negative integer, got -2$"):
        call_top_k_and_threshold(ranker, -2, None)
    with pytest.raises(ValueError, match=r"^top_k must be a non-negative integer, got -1$"):
        call_top_k_and_threshold(SimpleNamespace(top_k=-1, score_threshold=None), None, None)
