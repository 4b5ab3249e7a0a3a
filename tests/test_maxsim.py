from __future__ import annotations

import numpy as np
import pytest
import torch
from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim
from haystack_integrations.testing.multimodal_rag.reference import maxsim_reference


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_agrees_with_colpali_engine_scorer_on_float16_pages() -> None:
    rng = np.random.default_rng(0)
    query = _unit(rng, 20, 128)
    pages = [_unit(rng, 300, 128).astype(np.float16) for _ in range(40)]
    ours = maxsim(query, pages)
    theirs = BaseVisualRetrieverProcessor.score_multi_vector(
        [torch.from_numpy(query)], [torch.from_numpy(p.astype(np.float32)) for p in pages], device="cpu"
    )[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_variable_page_lengths_never_let_padding_win() -> None:
    rng = np.random.default_rng(1)
    query = _unit(rng, 5, 16)
    # All dot products negative: a zero padding row would wrongly win every max.
    pages = [-np.abs(_unit(rng, n, 16)) for n in (3, 50, 7)]
    query = np.abs(query)
    ours = maxsim(query, pages)
    np.testing.assert_allclose(ours, maxsim_reference(query, pages), rtol=1e-5)
    assert (ours < 0).all()


def test_mixed_lengths_and_dtypes_match_the_float64_reference() -> None:
    rng = np.random.default_rng(2)
    query = _unit(rng, 12, 64)
    lengths = [int(n) for n in rng.integers(1, 3000, size=30)]  # some longer than the reused buffer
    pages = [_unit(rng, n, 64).astype(np.float16 if i % 2 else np.float32) for i, n in enumerate(lengths)]
    np.testing.assert_allclose(maxsim(query, pages), maxsim_reference(query, pages), rtol=1e-4)


def test_is_safe_from_many_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    queries = [_unit(rng, 7, 32) for _ in range(8)]
    pages = [_unit(rng, int(n), 32).astype(np.float16) for n in rng.integers(100, 2500, size=20)]
    expected = [maxsim(q, pages) for q in queries]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: maxsim(q, pages), queries * 5))
    for i, scores in enumerate(got):
        np.testing.assert_array_equal(scores, expected[i % 8])


def test_accepts_torch_tensors_and_bfloat16() -> None:
    rng = np.random.default_rng(3)
    query = torch.from_numpy(_unit(rng, 4, 8))
    pages = [torch.from_numpy(_unit(rng, 10, 8)).to(torch.bfloat16)]
    expected = maxsim_reference(query, [p.float() for p in pages])
    np.testing.assert_allclose(maxsim(query, pages), expected, rtol=1e-5)


def test_zero_query_rows_add_nothing() -> None:
    rng = np.random.default_rng(4)
    query = _unit(rng, 3, 8)
    padded = np.vstack([query, np.zeros((2, 8), dtype=np.float32)])
    pages = [_unit(rng, 5, 8), _unit(rng, 9, 8)]
    np.testing.assert_allclose(maxsim(padded, pages), maxsim(query, pages), rtol=1e-6)


def test_empty_page_list_gives_empty_scores() -> None:
    out = maxsim(np.ones((2, 4), dtype=np.float32), [])
    assert out.shape == (0,)
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("query", "pages", "message"),
    [
        (np.zeros((0, 4)), [np.ones((2, 4))], "non-empty 2-D"),
        (np.zeros((4,)), [np.ones((2, 4))], "non-empty 2-D"),
        (np.ones((2, 4)), [np.ones((2, 4)), np.ones((0, 4))], "page 1 must be a non-empty"),
        (np.ones((2, 4)), [np.ones((3, 5))], "page 0 has vectors of dim 5 but the query has dim 4"),
    ],
)
def test_bad_shapes_are_clear_errors(query: np.ndarray, pages: list[np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        maxsim(query, pages)
