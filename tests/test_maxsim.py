from __future__ import annotations

import numpy as np
import pytest
import torch
from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim, maxsim_by_id
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


def test_padded_device_kernel_matches_the_cpu_kernel_on_ragged_pages() -> None:
    from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim_padded

    rng = np.random.default_rng(8)
    query = np.abs(_unit(rng, 6, 32))
    # Pages of very different lengths, all dot products negative: an unmasked zero padding row would win.
    pages = [-np.abs(_unit(rng, n, 32)).astype(np.float16) for n in (1, 700, 3, 2500, 64)]
    padded = maxsim_padded(query, pages, device="cpu")
    cpu = maxsim(query, pages)
    np.testing.assert_allclose(padded, cpu, rtol=1e-5)
    np.testing.assert_allclose(padded, maxsim_reference(query, pages), rtol=1e-4)
    assert (padded < 0).all()
    mixed = [pages[0], pages[1].astype(np.float32), torch.from_numpy(pages[2].astype(np.float32)).bfloat16()]
    np.testing.assert_allclose(maxsim_padded(query, mixed, device="cpu"), maxsim_reference(query, mixed), rtol=1e-4)
    assert maxsim_padded(query, [], device="cpu").shape == (0,)
    # maxsim() dispatches a non-CPU device to the padded kernel; "cpu" keeps the CPU kernel.
    np.testing.assert_array_equal(maxsim(query, pages, device="cpu"), cpu)


@pytest.mark.parametrize("length", [5, 3000])  # within one block, and spread over two blocks
def test_a_page_with_nan_or_inf_gets_a_non_finite_score(length: int) -> None:
    from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim_padded

    rng = np.random.default_rng(9)
    query = np.abs(_unit(rng, 4, 16))  # positive: an inf component makes +inf dot products
    pages = [_unit(rng, length, 16).astype(np.float16) for _ in range(3)]
    pages[1][length - 1, 2] = np.nan
    pages[2][0, 0] = np.inf
    for scores in (maxsim(query, pages), maxsim_padded(query, pages, device="cpu")):
        assert np.isfinite(scores[0])
        assert not np.isfinite(scores[1])
        assert not np.isfinite(scores[2])


def test_cpu_kernel_uses_a_fixed_thread_pool_and_leaves_torch_threads_alone() -> None:
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import threading
        import numpy as np
        import torch
        from haystack_integrations.common.multimodal_rag.numerics import maxsim as m

        before = torch.get_num_threads()
        q = np.ones((3, 8), dtype=np.float32)
        m.maxsim(q, [np.ones((5000, 8), dtype=np.float16)] * 4)
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        workers = {th.name for th in threading.enumerate() if th.name.startswith("maxsim")}
        print(before, torch.get_num_threads(), seen[0], m.cpu_kernel_threads(), len(workers), m.CPU_THREADS)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, new_thread, kernel_threads, workers, cpu_threads = (int(x) for x in out)
    assert after == before  # the calling thread keeps its torch thread count
    assert new_thread == before  # threads started later get the process default, not the workers' 1
    assert 1 <= cpu_threads <= 2
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert kernel_threads == cpu_threads
        assert workers == cpu_threads


def test_scores_stay_exact_while_another_thread_runs_torch_and_numpy_work() -> None:
    import threading

    rng = np.random.default_rng(10)
    query = _unit(rng, 20, 64)
    pages = [_unit(rng, int(n), 64).astype(np.float16) for n in rng.integers(200, 1500, size=24)]
    expected = maxsim(query, pages)
    stop = threading.Event()

    def busy() -> None:
        a = torch.randn(256, 256)
        b = rng.standard_normal((200, 200))
        while not stop.is_set():
            torch.mm(a, a)
            b @ b

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        for _ in range(5):
            np.testing.assert_array_equal(maxsim(query, pages), expected)
    finally:
        stop.set()
        worker.join()


def test_chunked_scoring_equals_scoring_all_pages_at_once() -> None:
    from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim_chunks

    rng = np.random.default_rng(11)
    query = _unit(rng, 9, 32)
    pages = [_unit(rng, int(n), 32).astype(np.float16) for n in rng.integers(1, 2600, size=25)]
    chunks = [pages[:7], [], pages[7:8], pages[8:]]
    np.testing.assert_array_equal(maxsim_chunks(query, iter(chunks)), maxsim(query, pages))
    assert maxsim_chunks(query, []).shape == (0,)
    with pytest.raises(ValueError, match="page 8 has vectors of dim 5"):
        maxsim_chunks(query, [pages[:8], [np.ones((2, 5))]])


def test_a_forked_child_process_gets_its_own_worker_pool() -> None:
    import multiprocessing

    rng = np.random.default_rng(12)
    query = _unit(rng, 4, 16)
    pages = [_unit(rng, 300, 16).astype(np.float16) for _ in range(6)]
    expected = maxsim(query, pages)  # the parent's pool exists now; a fork copies none of its threads
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        result = pool.apply_async(maxsim, (query, pages))
        np.testing.assert_array_equal(result.get(timeout=60), expected)


def test_read_only_stored_pages_score_without_a_warning_on_every_call() -> None:
    import warnings

    query = np.random.default_rng(0).random((4, 8), dtype=np.float32)
    blobs = [np.random.default_rng(i).random((5, 8)).astype(np.float16).tobytes() for i in range(3)]
    pages = [np.frombuffer(blob, dtype=np.float16).reshape(5, 8) for blob in blobs]  # read-only, like SQLite's
    assert not pages[0].flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = maxsim(query, pages)
        second = maxsim(query, pages)
    np.testing.assert_allclose(first, second)
    np.testing.assert_allclose(first, maxsim_reference(query, pages), rtol=1e-3)


def test_maxsim_by_id_keys_the_scores_by_document_id_and_computes_nothing_for_no_pages() -> None:
    rng = np.random.default_rng(3)
    query = rng.standard_normal((4, 8)).astype(np.float32)
    pages = {"b": rng.standard_normal((5, 8)).astype(np.float32), "a": rng.standard_normal((2, 8)).astype(np.float32)}
    scores = maxsim_by_id(query, pages)
    assert list(scores) == ["b", "a"]
    for doc_id, page in pages.items():
        assert scores[doc_id] == pytest.approx(float((query @ page.T).max(axis=1).sum()), rel=1e-5)
    assert maxsim_by_id(np.zeros((0, 8)), {}) == {}  # not even the query is looked at


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "lengths",
    [(1, 700, 3, 2500, 64), (1, 1, 1), (5, 1, 5), (9,), (1,), (32, 32, 32, 32)],
    ids=["ragged", "all-length-1", "length-1-between", "one-page", "one-row", "equal-lengths"],
)
def test_staged_kernel_matches_the_cpu_kernel(dtype: torch.dtype, lengths: tuple[int, ...]) -> None:
    from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim_staged, stage_pages

    rng = np.random.default_rng(len(lengths) + sum(lengths))
    query = torch.from_numpy(np.abs(_unit(rng, 6, 32))).to(dtype)
    # All dot products negative: a padding row (or a row of another page) winning a max would show.
    pages = [torch.from_numpy(-np.abs(_unit(rng, n, 32))).to(dtype) for n in lengths]
    staged = stage_pages(pages, device="cpu")
    assert staged.packed.shape == (sum(lengths), 32)
    assert staged.packed.dtype == dtype
    assert staged.lengths == lengths
    scores = maxsim_staged(query, staged)
    assert scores.dtype == torch.float32
    assert scores.shape == (len(lengths),)
    np.testing.assert_allclose(scores.numpy(), maxsim(query, pages), rtol=1e-5)
    np.testing.assert_allclose(scores.numpy(), maxsim_reference(query.float().numpy(), pages), rtol=1e-4)
    assert (scores < 0).all()


@pytest.mark.parametrize("lengths", [(7, 7, 7), (3, 9, 1)], ids=["equal-lengths", "ragged"])
def test_staged_kernel_gives_a_page_with_nan_or_inf_a_non_finite_score(lengths: tuple[int, ...]) -> None:
    from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim_staged, stage_pages

    rng = np.random.default_rng(10)
    query = np.abs(_unit(rng, 4, 16))
    pages = [_unit(rng, n, 16).astype(np.float16) for n in lengths]
    pages[1][-1, 2] = np.nan
    pages[2][0, 0] = np.inf
    scores = maxsim_staged(query, stage_pages(pages, device="cpu")).numpy()
    assert np.isfinite(scores[0])
    assert not np.isfinite(scores[1])
    assert not np.isfinite(scores[2])


def test_staging_mixed_dtypes_packs_float32_and_empty_input_scores_nothing() -> None:
    from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim_staged, stage_pages

    rng = np.random.default_rng(11)
    query = _unit(rng, 3, 8)
    pages = [_unit(rng, 4, 8).astype(np.float16), torch.from_numpy(_unit(rng, 2, 8)).bfloat16()]
    staged = stage_pages(pages, device="cpu")
    assert staged.packed.dtype == torch.float32
    np.testing.assert_allclose(maxsim_staged(query, staged).numpy(), maxsim(query, pages), rtol=1e-5)
    assert maxsim_staged(query, stage_pages([], device="cpu")).shape == (0,)


def test_staging_refuses_bad_pages_and_scoring_a_query_of_another_width() -> None:
    from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim_staged, stage_pages

    with pytest.raises(ValueError, match="page 1 has vectors of dim 4 but page 0 has dim 8"):
        stage_pages([np.ones((2, 8)), np.ones((2, 4))], device="cpu")
    with pytest.raises(ValueError, match="page 0 must be a non-empty 2-D array"):
        stage_pages([np.ones((0, 8))], device="cpu")
    staged = stage_pages([np.ones((2, 8))], device="cpu")
    with pytest.raises(ValueError, match="the query has vectors of dim 4 but the pages have dim 8"):
        maxsim_staged(np.ones((1, 4)), staged)
    with pytest.raises(ValueError, match="query must be a non-empty 2-D array"):
        maxsim_staged(np.ones((0, 8)), staged)


def test_staging_packs_pages_in_order_when_the_copy_is_split_over_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from haystack_integrations.common.multimodal_rag.numerics import maxsim as kernels

    monkeypatch.setattr(kernels, "PACK_THREADS", 3)
    rng = np.random.default_rng(12)
    pages = [torch.from_numpy(_unit(rng, int(n), 16)).bfloat16() for n in rng.integers(1, 50, 20)]
    staged = kernels.stage_pages(pages, device="cpu")
    torch.testing.assert_close(staged.packed, torch.cat(pages), rtol=0, atol=0)
    assert staged.device_lengths.tolist() == [p.shape[0] for p in pages]
