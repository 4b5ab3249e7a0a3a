"""The device cache of stored pages (numerics/page_cache.py), run on CPU tensors (the same code as on a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from haystack_integrations.common.multimodal_rag.numerics.maxsim import StagedPages, maxsim_staged
from haystack_integrations.common.multimodal_rag.numerics.page_cache import DevicePageCache, stage_store_pages
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore, SQLiteMultiVectorStore
from haystack_integrations.testing.multimodal_rag.reference import maxsim_reference

DIM = 16
CPU = torch.device("cpu")
PAGE_BYTES = 10 * DIM * 2  # 10 float16 vectors


class _CountingStore:
    """A store wrapper that records every id `get` is asked for."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.asked: list[str] = []

    def get(self, ids: list[str]) -> dict[str, np.ndarray]:
        self.asked.extend(ids)
        return self.store.get(ids)

    def revision(self) -> Any:
        return self.store.revision()


def _pages(seed: int, ids: list[str], n: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {doc_id: rng.standard_normal((n, DIM)).astype(np.float32) for doc_id in ids}


def _rows_by_id(found: list[str], parts: list[StagedPages]) -> dict[str, np.ndarray]:
    rows: dict[str, np.ndarray] = {}
    ids = iter(found)
    for part in parts:
        start = 0
        for length in part.lengths:
            rows[next(ids)] = part.packed[start : start + length].float().numpy()
            start += length
    return rows


def _assert_serves(store: Any, found: list[str], parts: list[StagedPages]) -> None:
    stored = store.get(found)
    assert sorted(found) == sorted(stored)
    for doc_id, rows in _rows_by_id(found, parts).items():
        np.testing.assert_array_equal(rows, stored[doc_id].astype(np.float32))


def _ragged_store(n: int = 40) -> tuple[InMemoryMultiVectorStore, list[str]]:
    """`n` pages of 1 to 12 vectors (one-vector pages included), ids p00, p01, ..."""
    rng = np.random.default_rng(30)
    ids = [f"p{i:02d}" for i in range(n)]
    store = InMemoryMultiVectorStore()
    store.write({doc_id: rng.standard_normal((1 + i % 12, DIM)).astype(np.float32) for i, doc_id in enumerate(ids)})
    return store, ids


def _fill(cache: DevicePageCache, store: Any, uploads: list[list[str]]) -> None:
    for ids in uploads:
        cache.stage(store, ids, CPU)


def _partly_evicted(store: Any, ids: list[str]) -> DevicePageCache:
    """
    A cache of four uploads of 10 pages (A, B, C, D) whose budget is one byte short of the corpus: A and B keep
    only the pages used again after their upload (ids 3-6 and 12-16), C is evicted whole, D stays whole.
    """
    rows = sum(len(page) for page in store.get(ids).values())
    cache = DevicePageCache(rows * DIM * 2 - 1)
    _fill(cache, store, [ids[:10], ids[10:20], ids[20:30]])
    _fill(cache, store, [ids[3:7], ids[12:17]])  # used again: newest
    _fill(cache, store, [ids[30:]])  # over budget: the oldest pages go until a whole block (C) is freed
    assert cache.nbytes <= cache.max_bytes
    return cache


@pytest.mark.parametrize("cat_runs", [0, 16, 1000], ids=["index_select", "default", "cat"])
@pytest.mark.parametrize(
    "scenario",
    ["one_block_in_order", "one_block_out_of_order", "several_blocks", "partial_blocks_after_evictions", "one_page"],
)
def test_cached_hits_are_served_exactly_as_stored_however_they_sit_in_the_cache(
    scenario: str, cat_runs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from haystack_integrations.common.multimodal_rag.numerics import page_cache

    monkeypatch.setattr(page_cache, "_CAT_RUNS", cat_runs)  # 0: every multi-run gather takes the index path
    stored, ids = _ragged_store()
    store = _CountingStore(stored)  # the cache's owner: filled and asked through the same object
    rng = np.random.default_rng(31)
    shuffled = [ids[i] for i in rng.permutation(len(ids))]
    cache = DevicePageCache(1 << 20)
    if scenario == "one_block_in_order":
        _fill(cache, store, [ids])
        query = ids
    elif scenario == "one_block_out_of_order":
        _fill(cache, store, [ids])
        query = [doc_id for doc_id in shuffled if doc_id not in {"p03", "p04", "p17", "p30"}]  # gaps: several runs
    elif scenario == "several_blocks":
        _fill(cache, store, [shuffled[:10], ids[10:20], shuffled[20:35]])
        query = [*shuffled[:30], "unknown"]  # some cached in each block, some to fetch, one without vectors
    elif scenario == "partial_blocks_after_evictions":
        cache = _partly_evicted(store, ids)
        query = shuffled
    else:  # one page per upload: as many blocks as pages
        _fill(cache, store, [[doc_id] for doc_id in ids])
        query = shuffled
    store.asked.clear()
    cached = [doc_id for doc_id in query if doc_id in cache._entries]
    found, parts = cache.stage(store, query, CPU)
    assert sorted(store.asked) == sorted(doc_id for doc_id in query if doc_id not in cached)
    assert sorted(found) == sorted(doc_id for doc_id in query if doc_id != "unknown")
    assert sorted(found[: len(cached)]) == sorted(cached)  # cached pages first
    _assert_serves(stored, found, parts)
    for part in parts:
        assert part.device_lengths.tolist() == list(part.lengths)
        assert part.packed.shape[0] == sum(part.lengths)
    if scenario == "one_block_in_order":  # every page, in upload order: the block itself, not a copy
        block = cache._entries["p00"].block.packed
        assert parts[0].packed.data_ptr() == block.data_ptr()
        assert parts[0].packed.shape == block.shape


def test_pages_left_in_partly_evicted_blocks_are_served_by_block_then_row() -> None:
    stored, ids = _ragged_store()
    store = _CountingStore(stored)
    cache = _partly_evicted(store, ids)
    assert sorted(cache._entries) == [*ids[3:7], *ids[12:17], *ids[30:]]
    store.asked.clear()
    found, parts = cache.stage(store, list(reversed(ids)), CPU)
    assert found[:19] == [*ids[3:7], *ids[12:17], *ids[30:]]  # blocks in upload order, rows in block order
    assert sorted(store.asked) == sorted([*ids[:3], *ids[7:12], *ids[17:30]])
    assert len(parts) == 2
    _assert_serves(stored, found, parts)


def test_gathered_blocks_of_different_dtypes_are_packed_as_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    from haystack_integrations.common.multimodal_rag.numerics import page_cache

    half = page_cache._Block(torch.randn(6, DIM).half(), None, live=2)
    full = page_cache._Block(torch.randn(5, DIM), None, live=2)
    entries = [
        page_cache._Entry(half, 0, 2),
        page_cache._Entry(full, 3, 2),
        page_cache._Entry(half, 4, 2),
        page_cache._Entry(full, 0, 3),
    ]
    expected = torch.cat([half.packed[0:2].float(), full.packed[3:5], half.packed[4:6].float(), full.packed[0:3]])
    for cat_runs in (0, 16):
        monkeypatch.setattr(page_cache, "_CAT_RUNS", cat_runs)
        staged = page_cache._gather(entries, CPU)
        assert staged.packed.dtype == torch.float32
        torch.testing.assert_close(staged.packed, expected, rtol=0, atol=0)
        assert (staged.lengths, staged.device_lengths.tolist()) == ((2, 2, 2, 3), [2, 2, 2, 3])


def test_pages_ranked_again_come_from_the_cache_and_score_the_same() -> None:
    store = InMemoryMultiVectorStore()
    store.write(_pages(0, ["a", "b", "c"]))
    counting, cache = _CountingStore(store), DevicePageCache(1 << 20)
    first = cache.stage(counting, ["a", "b", "c"], CPU)
    assert counting.asked == ["a", "b", "c"]
    found, parts = cache.stage(counting, ["c", "a", "x"], CPU)  # x has no vectors
    assert counting.asked == ["a", "b", "c", "x"]  # only the unknown id was fetched again
    assert found == ["a", "c"]  # cached pages come in the order they sit in the cache (here: their upload's)
    assert (cache.hits, cache.misses) == (2, 4)
    _assert_serves(store, found, parts)
    query = torch.randn(4, DIM)
    scores = torch.cat([maxsim_staged(query, part) for part in parts]).numpy()
    expected = maxsim_reference(query.numpy(), [store.get([i])[i].astype(np.float32) for i in found])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert first[0] == ["a", "b", "c"]


def test_a_mix_of_cached_and_new_pages_keeps_ids_and_rows_together() -> None:
    store = InMemoryMultiVectorStore()
    store.write({**_pages(1, ["a", "b"], n=7), **_pages(2, ["c", "d"], n=12)})
    cache = DevicePageCache(1 << 20)
    cache.stage(store, ["b", "d"], CPU)
    found, parts = cache.stage(store, ["a", "b", "c", "d"], CPU)
    assert found == ["b", "d", "a", "c"]  # cached first, then the fetched ones
    assert len(parts) == 2
    _assert_serves(store, found, parts)


@pytest.mark.parametrize("kind", ["in_memory", "sqlite"])
def test_a_page_written_or_deleted_after_caching_is_never_served_stale(kind: str, tmp_path: Path) -> None:
    if kind == "in_memory":
        store: Any = InMemoryMultiVectorStore()
        writer: Any = store
    else:
        store = SQLiteMultiVectorStore(str(tmp_path / "mv.sqlite"), dim=DIM)
        writer = SQLiteMultiVectorStore(str(tmp_path / "mv.sqlite"), dim=DIM)  # another connection
    store.write(_pages(3, ["a", "b"]))
    cache = DevicePageCache(1 << 20)
    cache.stage(store, ["a", "b"], CPU)
    writer.write(_pages(4, ["a"]))  # re-indexed page
    found, parts = cache.stage(store, ["a", "b"], CPU)
    _assert_serves(store, found, parts)
    np.testing.assert_array_equal(
        _rows_by_id(found, parts)["a"], _pages(4, ["a"])["a"].astype(np.float16).astype(np.float32)
    )
    writer.delete(["b"])
    found, parts = cache.stage(store, ["a", "b"], CPU)
    assert found == ["a"]
    if kind == "sqlite":
        store.close()
        writer.close()


def test_a_sqlite_page_rewritten_by_another_process_is_fetched_again(tmp_path: Path) -> None:
    path = str(tmp_path / "mv.sqlite")
    store = SQLiteMultiVectorStore(path, dim=DIM)
    store.write(_pages(5, ["a"]))
    counting, cache = _CountingStore(store), DevicePageCache(1 << 20)
    cache.stage(counting, ["a"], CPU)
    cache.stage(counting, ["a"], CPU)
    assert counting.asked == ["a"]
    script = (
        "import numpy as np\n"
        "from haystack_integrations.document_stores.multivector import SQLiteMultiVectorStore\n"
        f"SQLiteMultiVectorStore({path!r}, dim={DIM}).write({{'a': np.full((10, {DIM}), 0.5, np.float32)}})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    found, parts = cache.stage(counting, ["a"], CPU)
    assert counting.asked == ["a", "a"]
    np.testing.assert_array_equal(_rows_by_id(found, parts)["a"], np.full((10, DIM), 0.5, np.float32))
    store.close()


def test_the_cache_stays_within_its_budget_and_evicts_the_least_recently_used() -> None:
    store = InMemoryMultiVectorStore()
    store.write(_pages(6, [f"p{i}" for i in range(6)]))
    counting = _CountingStore(store)
    cache = DevicePageCache(4 * PAGE_BYTES)  # four pages
    for doc_id in ("p0", "p1", "p2", "p3"):  # one upload (block) each
        cache.stage(counting, [doc_id], CPU)
    cache.stage(counting, ["p0"], CPU)  # p0 used again: p1 is now the oldest
    cache.stage(counting, ["p4"], CPU)
    assert cache.nbytes <= 4 * PAGE_BYTES
    counting.asked.clear()
    cache.stage(counting, ["p0", "p1", "p2", "p3", "p4"], CPU)
    assert counting.asked == ["p1"]  # only the evicted page was fetched again


def test_a_block_is_charged_until_its_last_page_leaves() -> None:
    store = InMemoryMultiVectorStore()
    store.write(_pages(7, ["a", "b", "c", "d"]))
    cache = DevicePageCache(3 * PAGE_BYTES)
    cache.stage(store, ["a", "b"], CPU)  # one block of two pages
    assert cache.nbytes == 2 * PAGE_BYTES
    cache.stage(store, ["c", "d"], CPU)  # 4 pages charged: a and b go, their block with them
    assert len(cache) == 2
    assert cache.nbytes == 2 * PAGE_BYTES
    too_big = DevicePageCache(PAGE_BYTES)
    too_big.stage(store, ["a", "b"], CPU)  # an upload larger than the budget is not kept
    assert (len(too_big), too_big.nbytes) == (0, 0)


def test_stores_without_a_revision_are_fetched_every_time() -> None:
    class NoRevision:
        def __init__(self) -> None:
            self.calls = 0
            self.vectors = _pages(8, ["a"])

        def get(self, ids: list[str]) -> dict[str, np.ndarray]:
            self.calls += 1
            return {i: self.vectors[i] for i in ids if i in self.vectors}

    store, cache = NoRevision(), DevicePageCache(1 << 20)
    for _ in range(2):
        found, parts = stage_store_pages(store, ["a", "zz"], CPU, cache)
        assert found == ["a"]
        assert len(parts) == 1
    assert store.calls == 2
    assert len(cache) == 0
    assert stage_store_pages(store, ["zz"], CPU, cache) == ([], [])


def test_another_store_does_not_see_the_first_stores_pages() -> None:
    first, second = InMemoryMultiVectorStore(), InMemoryMultiVectorStore()
    first.write(_pages(9, ["a"]))
    second.write(_pages(10, ["a"]))
    cache = DevicePageCache(1 << 20)
    cache.stage(first, ["a"], CPU)
    found, parts = cache.stage(second, ["a"], CPU)
    _assert_serves(second, found, parts)


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, Any]]) -> tuple[Any, type]:
    """Fake CUDA streams and events that log their calls into `calls` (on CPU tensors); returns (stream, Event)."""
    from haystack_integrations.common.multimodal_rag.numerics import page_cache

    class FakeEvent:
        def record(self, stream: Any) -> None:
            calls.append(("record", stream))

    class FakeStream:
        def wait_event(self, event: Any) -> None:
            calls.append(("wait", event))

    stream = FakeStream()
    real_serve = page_cache._serve_runs

    def serve(runs: Any, lengths: Any) -> Any:
        calls.append(("copy", len(runs)))
        return real_serve(runs, lengths)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: calls.append(("record_stream", s)))
    monkeypatch.setattr(page_cache, "_serve_runs", serve)
    return stream, FakeEvent


def test_a_gathered_part_on_cuda_carries_an_event_recorded_after_its_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cached pages are copied together on the fetch thread's current stream, but scored on the scoring
    # thread's, which can be another stream: the part must carry a `ready` event (recorded on the copying stream
    # after the copy) so that `maxsim_staged` waits for it and keeps the memory from reuse. Faked CUDA objects:
    # the order of the stream calls is what is checked.
    from haystack_integrations.common.multimodal_rag.numerics import page_cache

    calls: list[tuple[str, Any]] = []
    stream, fake_event = _fake_cuda(monkeypatch, calls)
    upload = fake_event()
    block = page_cache._Block(torch.arange(2 * 3 * DIM, dtype=torch.float32).view(6, DIM), upload, live=2)
    entries = [page_cache._Entry(block, 3, 3), page_cache._Entry(block, 0, 3)]
    staged = page_cache._gather(entries, torch.device("cuda", 0))
    assert calls == [("wait", upload), ("record_stream", stream), ("copy", 2), ("record", stream)]
    assert isinstance(staged.ready, fake_event)
    torch.testing.assert_close(staged.packed, torch.cat([block.packed[3:], block.packed[:3]]))
    assert staged.lengths == (3, 3)
    assert staged.device_lengths.tolist() == [3, 3]


def test_a_single_run_on_cuda_is_a_view_of_its_block_that_still_carries_the_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No copy, but the scorer must still wait for the block's upload (through `ready`, recorded after this stream
    # waited for it) and record its use of the block's memory (`maxsim_staged` records `packed`: the view's
    # storage is the block's).
    from haystack_integrations.common.multimodal_rag.numerics import page_cache

    calls: list[tuple[str, Any]] = []
    stream, fake_event = _fake_cuda(monkeypatch, calls)
    upload = fake_event()
    block = page_cache._Block(torch.arange(3 * 4 * DIM, dtype=torch.float16).view(12, DIM), upload, live=3)
    entries = [page_cache._Entry(block, 4, 4), page_cache._Entry(block, 8, 4)]
    staged = page_cache._gather(entries, torch.device("cuda", 0))
    assert calls == [("wait", upload), ("record_stream", stream), ("copy", 1), ("record", stream)]
    assert isinstance(staged.ready, fake_event)
    assert staged.packed.untyped_storage().data_ptr() == block.packed.untyped_storage().data_ptr()
    assert staged.packed.data_ptr() == block.packed[4].data_ptr()
    torch.testing.assert_close(staged.packed, block.packed[4:])
    assert (staged.lengths, staged.device_lengths.tolist()) == ((4, 4), [4, 4])
    calls.clear()
    other = page_cache._Block(torch.zeros(2, DIM, dtype=torch.float16), fake_event(), live=1)
    page_cache._gather([page_cache._Entry(block, 0, 4), page_cache._Entry(other, 0, 2)], torch.device("cuda", 0))
    assert [name for name, _ in calls] == ["wait", "record_stream", "wait", "record_stream", "copy", "record"]


def test_running_out_of_device_memory_empties_the_cache_halves_its_budget_and_retries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from haystack_integrations.common.multimodal_rag.numerics import page_cache

    store = InMemoryMultiVectorStore()
    store.write(_pages(12, ["a", "b", "c"]))
    cache = DevicePageCache(1 << 20)
    cache.stage(store, ["a", "b"], CPU)
    assert cache.nbytes == 2 * PAGE_BYTES
    real_stage_pages = page_cache.stage_pages
    failures = iter([True])

    def out_of_memory_once(pages: Any, *, device: Any) -> StagedPages:
        if next(failures, False):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_stage_pages(pages, device=device)

    monkeypatch.setattr(page_cache, "stage_pages", out_of_memory_once)
    with caplog.at_level("WARNING"):
        found, parts = cache.stage(store, ["a", "c"], CPU)
    assert found == ["a", "c"]  # the query still gets every page
    _assert_serves(store, found, parts)
    assert cache.max_bytes == PAGE_BYTES  # half of what it held
    assert (cache.hits, cache.misses) == (0, 4)  # the failed try's hit on "a" is not counted on top of the retry
    assert cache.nbytes <= cache.max_bytes
    assert "ran out of memory" in caplog.text


def test_the_retry_after_running_out_of_memory_runs_without_the_emptied_cache_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Staging again inside the `except` clause kept the failed attempt's traceback alive, and with it that
    # attempt's frames: the cached entries it had looked up (and so every block they belong to) stayed allocated
    # while the retry uploaded, so emptying the cache freed nothing when it was needed.
    import weakref

    from haystack_integrations.common.multimodal_rag.numerics import page_cache

    store = InMemoryMultiVectorStore()
    store.write(_pages(13, ["a", "b", "c"]))
    cache = DevicePageCache(1 << 20)
    cache.stage(store, ["a", "b"], CPU)
    block = weakref.ref(cache._entries["a"].block)
    real_stage_pages = page_cache.stage_pages
    calls: list[bool] = []  # per call: whether the cached block was still alive

    def out_of_memory_once(pages: Any, *, device: Any) -> StagedPages:
        calls.append(block() is not None)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_stage_pages(pages, device=device)

    monkeypatch.setattr(page_cache, "stage_pages", out_of_memory_once)
    found, parts = cache.stage(store, ["a", "c"], CPU)
    _assert_serves(store, found, parts)
    assert calls == [True, False]  # the first try gathered from the block; the retry ran with it freed


def test_running_out_of_memory_with_an_empty_cache_is_raised_and_keeps_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The cache held nothing, so it is not what ran out of memory: no retry, and no budget of 0 that would turn
    # the cache off for the ranker's lifetime.
    from haystack_integrations.common.multimodal_rag.numerics import page_cache

    store = InMemoryMultiVectorStore()
    store.write(_pages(14, ["a"]))
    cache = DevicePageCache(1 << 20)
    attempts = 0

    def out_of_memory(pages: Any, *, device: Any) -> StagedPages:
        nonlocal attempts
        attempts += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(page_cache, "stage_pages", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cache.stage(store, ["a"], CPU)
    assert attempts == 1
    assert cache.max_bytes == 1 << 20


# --- The host (CPU) cache: the stored arrays -----------------------------------------------------------------------


def test_host_cache_serves_the_stored_arrays_and_skips_the_store_for_cached_pages(tmp_path: Path) -> None:
    from haystack_integrations.common.multimodal_rag.numerics.page_cache import HostPageCache

    store = SQLiteMultiVectorStore(str(tmp_path / "mv.sqlite"), dim=DIM)
    store.write(_pages(20, ["a", "b", "c"]))
    counting, cache = _CountingStore(store), HostPageCache(1 << 20)
    found, pages = cache.pages(counting, ["a", "b", "x"])
    assert found == ["a", "b"]
    found, pages = cache.pages(counting, ["c", "b", "a"])
    assert counting.asked == ["a", "b", "x", "c"]  # b and a came from the cache
    assert found == ["b", "a", "c"]  # cached first
    stored = store.get(found)
    for doc_id, page in zip(found, pages, strict=True):
        assert page.dtype == np.float16  # as stored: the kernel converts on the fly
        np.testing.assert_array_equal(page, stored[doc_id])
    other = SQLiteMultiVectorStore(str(tmp_path / "mv.sqlite"), dim=DIM)
    other.write(_pages(21, ["a"]))  # another connection re-indexes a cached page
    found, pages = cache.pages(counting, ["a"])
    np.testing.assert_array_equal(pages[0], _pages(21, ["a"])["a"].astype(np.float16))
    store.close()
    other.close()


def test_host_cache_stays_within_its_budget_least_recently_used_out() -> None:
    from haystack_integrations.common.multimodal_rag.numerics.page_cache import HostPageCache

    store = InMemoryMultiVectorStore()
    store.write(_pages(22, [f"p{i}" for i in range(5)]))
    counting = _CountingStore(store)
    page16 = PAGE_BYTES
    cache = HostPageCache(3 * page16)
    for doc_id in ("p0", "p1", "p2"):
        cache.pages(counting, [doc_id])
    cache.pages(counting, ["p0"])  # p1 is now the oldest
    cache.pages(counting, ["p3"])
    assert cache.nbytes <= 3 * page16
    counting.asked.clear()
    cache.pages(counting, ["p0", "p2", "p3", "p1"])
    assert counting.asked == ["p1"]
    tiny = HostPageCache(page16 - 1)  # a page larger than the budget is served, not kept
    found, _ = tiny.pages(store, ["p4"])
    assert (found, len(tiny), tiny.nbytes) == (["p4"], 0, 0)
