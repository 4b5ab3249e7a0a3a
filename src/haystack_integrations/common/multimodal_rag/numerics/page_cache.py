"""A bounded cache of stored pages' multi-vectors on the scoring device, for `ColPaliRanker` on a GPU.

Re-ranking 1000 candidates of 768 x 128 float16 moves 188 MiB from host memory to the GPU per query (packing into
page-locked memory, then the copy), which costs more than the query encoding it overlaps. Queries of one
deployment keep meeting the same hot pages, so the pages a query fetched stay on the device, in the blocks they
were uploaded in, up to a byte budget; the next query gathers its cached pages there (a view of a block when they
are consecutive rows of it, else one device-side copy) and fetches and uploads only the others.

The cache is only as current as the store says: every lookup first asks the store's `revision()` (a counter of
changes; SQLite's `PRAGMA data_version` for commits by other connections and processes) and drops everything when
it changed, so a page re-indexed in between is never served stale. Stores without `revision()` are not cached.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from haystack import logging

from haystack_integrations.common.multimodal_rag.numerics.maxsim import StagedPages, stage_pages, to_device

logger = logging.getLogger(__name__)

__all__ = ["DevicePageCache", "HostLookup", "HostPageCache", "stage_store_pages"]


#: Numbers the uploads, so that cached hits are gathered block by block in a stable order.
_BLOCK_SERIALS = itertools.count()
#: Up to this many runs of consecutive rows, cached pages are gathered by one `torch.cat` of the runs' slices (a
#: view and a few microseconds each); more runs take one `index_select` per block from device-built row numbers.
_CAT_RUNS = 16


@dataclass
class _Block:
    """One upload: pages packed row after row on the device, charged in full while any of its pages is cached."""

    packed: torch.Tensor
    ready: torch.cuda.Event | None
    live: int
    serial: int = field(default_factory=lambda: next(_BLOCK_SERIALS))


@dataclass(frozen=True)
class _Entry:
    block: _Block
    start: int
    length: int
    #: Sorts the entries by block (upload order), then row: `(block.serial << 32) + start` (set by the cache).
    order: int = 0


class _RevisionCache:
    """
    What both page caches share: LRU entries within a byte budget, hit/miss counters, and the (store, revision)
    the entries belong to. Subclasses hold their own entry type and say what an entry costs.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._bytes = 0
        self._owner: tuple[Any, Hashable] | None = None  # (store, revision) the entries belong to
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes the cached pages hold now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every cached page."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
        self._owner = None

    def _owner_for(self, store: Any, revision: Hashable) -> tuple[Any, Hashable]:
        """The entries' (store, revision), after dropping them when either changed. Call with the lock held."""
        if self._owner is None or self._owner[0] is not store or self._owner[1] != revision:
            self._clear()
            self._owner = (store, revision)
        return self._owner


class DevicePageCache(_RevisionCache):
    """
    Stored pages' vectors kept on the scoring device, least recently used first out, within `max_bytes`.

    Thread-safe; meant to be used from one thread (the ranker's fetch thread), because a SQLite store's
    `revision()` is read on the calling thread's connection. `max_bytes`: device memory the cached blocks may hold;
    a block is charged in full until its last page is evicted, and an upload larger than this is not cached.
    """

    def stage(self, store: Any, ids: list[str], device: torch.device) -> tuple[list[str], list[StagedPages]]:
        """
        The stored pages of `ids` on `device`: cached ones gathered there, the others fetched, uploaded and cached.

        When the device runs out of memory while staging, a cache that holds pages gives back everything it holds,
        halves its budget (with a warning) and stages once more: a cache must not be what makes a query fail. An
        empty cache raises the error (keeping its budget): it is not what used the memory.

        :param store: A multi-vector store with `get(ids)` and `revision()`.
        :param ids: Distinct document ids.
        :param device: The scoring device.
        :returns: The ids that have stored vectors, and the staged parts holding their pages in that order
            (cached pages first, in the order they sit in the cache, then the fetched ones in `ids` order); ids
            without vectors are left out.
        :raises Exception: Whatever the store's `get` or `revision` raise; an out-of-memory error raised with the
            cache empty (at once, or on the retry).
        """
        counts = (self.hits, self.misses)
        try:
            return self._stage(store, ids, device)
        except torch.cuda.OutOfMemoryError:
            with self._lock:
                self.hits, self.misses = counts  # the retry counts this lookup's pages (all misses then)
                held = self._bytes
                if held == 0:
                    raise  # the cache holds nothing: it is not what ran out of memory, and a retry would too
                self._clear()
                self.max_bytes = held // 2
        # Staged again only here, after the `except` clause: inside it the error's traceback keeps the failed
        # attempt's frames alive, and with them the cached blocks it had looked up, so the emptied cache would
        # free nothing while the retry uploads.
        logger.warning(
            "ColPaliRanker's device page cache held {held_mib:.0f} MiB when the GPU ran out of memory; it was "
            "emptied and its budget lowered to {budget_mib:.0f} MiB (set device_cache_mb lower, or 0, to avoid "
            "this)",
            held_mib=held / 2**20,
            budget_mib=self.max_bytes / 2**20,
        )
        return self._stage(store, ids, device)

    def _stage(self, store: Any, ids: list[str], device: torch.device) -> tuple[list[str], list[StagedPages]]:
        revision = store.revision()
        with self._lock:
            owner = self._owner_for(store, revision)
            cached = [(doc_id, self._entries[doc_id]) for doc_id in ids if doc_id in self._entries]
            for doc_id, _ in cached:
                self._entries.move_to_end(doc_id)
            self.hits += len(cached)
        # In the order the pages sit in the cache, so that pages uploaded together are gathered as runs of rows
        # (`_gather`); `found` follows the same order, so ids and staged rows stay aligned.
        cached.sort(key=lambda item: item[1].order)
        found: list[str] = []
        parts: list[StagedPages] = []
        if cached:
            found.extend(doc_id for doc_id, _ in cached)
            parts.append(_gather([entry for _, entry in cached], device))
        hit = {doc_id for doc_id, _ in cached}
        missing = [doc_id for doc_id in ids if doc_id not in hit]
        if missing:
            vectors = store.get(missing)
            with self._lock:
                self.misses += len(missing)
            if vectors:
                staged = stage_pages(list(vectors.values()), device=device)
                found.extend(vectors)
                parts.append(staged)
                self._insert(list(vectors), staged, owner)
        return found, parts

    def _insert(self, ids: list[str], staged: StagedPages, owner: tuple[Any, Hashable]) -> None:
        nbytes = staged.packed.numel() * staged.packed.element_size()
        with self._lock:
            if nbytes > self.max_bytes or self._owner is not owner:
                return
            block = _Block(staged.packed, staged.ready, live=len(ids))
            start = 0
            for doc_id, length in zip(ids, staged.lengths, strict=True):
                self._drop(doc_id)
                self._entries[doc_id] = _Entry(block, start, length, (block.serial << 32) + start)
                start += length
            self._bytes += nbytes
            while self._bytes > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))

    def _drop(self, doc_id: str) -> None:
        entry = self._entries.pop(doc_id, None)
        if entry is None:
            return
        entry.block.live -= 1
        if entry.block.live == 0:
            self._bytes -= entry.block.packed.numel() * entry.block.packed.element_size()


def _gather(entries: list[_Entry], device: torch.device) -> StagedPages:
    """
    Cached pages, in the order of `entries`, packed on their device (no host transfer of page data).

    Entries that are consecutive rows of one block (`DevicePageCache._stage` orders its hits by block, then row)
    form a run, gathered whole: a single run is served as a view of its block, without a copy (the scorer only
    reads it); several are copied into one new tensor (`_serve_runs`).

    On CUDA the block was filled on the upload's side stream and the pages are scored on the scoring thread's
    stream. This (fetch) thread's current stream waits for each block's upload and records its use of the block,
    then `ready` is recorded on it after the copy (and the page lengths' transfer): `maxsim_staged` waits for
    `ready` on its own stream and records its use of `packed` there. A view needs the same: waiting for `ready`
    is what orders the scoring after the block's upload (the event is recorded after this stream's wait on the
    upload), and recording the view's use on the scoring stream records the block's memory (a view shares its
    storage), so an evicted block is not reused before the scoring has read it.
    """
    runs: list[list[Any]] = []  # [block, first row, rows]
    for entry in entries:
        if runs:
            last = runs[-1]
            if last[0] is entry.block and last[1] + last[2] == entry.start:
                last[2] += entry.length
                continue
        runs.append([entry.block, entry.start, entry.length])
    current = torch.cuda.current_stream(device) if device.type == "cuda" else None
    if current is not None:
        for block in {id(run[0]): run[0] for run in runs}.values():
            if block.ready is not None:
                current.wait_event(block.ready)  # the upload that filled it has finished (a no-op once it has)
            # The block was allocated on the upload stream and is read on this one: its memory must not be
            # reused by the upload stream before this read is done, even if the block is evicted meanwhile.
            block.packed.record_stream(current)
    lengths = tuple(entry.length for entry in entries)
    packed, device_lengths = _serve_runs(runs, lengths)
    staged = StagedPages(packed, lengths, device_lengths)
    if current is None:
        return staged
    # The copy is queued on THIS thread's current stream (the fetch thread's), but the pages are scored on the
    # scoring thread's current stream, which may be another one (a caller inside `torch.cuda.stream(...)`). With
    # `ready` set, `maxsim_staged` waits for the copy on its own stream and records its use of the new tensors
    # there, so the caching allocator does not hand their memory out before the scoring has read it.
    ready = torch.cuda.Event()
    ready.record(current)
    return StagedPages(packed, lengths, device_lengths, ready)


def _serve_runs(runs: list[list[Any]], lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The rows of `runs` (`[block, first row, rows]`) packed one after the other, and `lengths` on their device.

    One run: a view of its block. Up to `_CAT_RUNS` runs: a `torch.cat` of their slices. More: one `index_select`
    per stretch of runs from one block, with row numbers built on the device from one small transfer (each run's
    shift and row count, then the page lengths), so the host sends a few integers per run, not one per row. Blocks
    of different dtypes are packed as float32, as `stage_pages` packs mixed pages.
    """
    target = runs[0][0].packed.device
    with torch.inference_mode():
        if len(runs) == 1:
            block, start, rows = runs[0]
            return block.packed[start : start + rows], to_device(_int64(lengths), target)
        dtypes = {run[0].packed.dtype for run in runs}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        if len(runs) <= _CAT_RUNS:
            packed = torch.cat([block.packed[start : start + rows].to(dtype) for block, start, rows in runs])
            return packed, to_device(_int64(lengths), target)
        shifts: list[int] = []
        run_rows: list[int] = []
        stretches: list[tuple[torch.Tensor, int, int]] = []  # (block's rows, first output row, end)
        total = 0
        for block, start, rows in runs:
            shifts.append(start - total)  # output row `total + j` is the block's row `start + j`
            run_rows.append(rows)
            if stretches and stretches[-1][0] is block.packed:
                stretches[-1] = (block.packed, stretches[-1][1], total + rows)
            else:
                stretches.append((block.packed, total, total + rows))
            total += rows
        n_runs = len(runs)
        small = to_device(_int64([*shifts, *run_rows, *lengths]), target)
        source_rows = torch.arange(total, device=target) + torch.repeat_interleave(
            small[:n_runs], small[n_runs : 2 * n_runs], output_size=total
        )
        packed = torch.empty((total, runs[0][0].packed.shape[1]), dtype=dtype, device=target)
        for source, lo, hi in stretches:
            if source.dtype == dtype:
                torch.index_select(source, 0, source_rows[lo:hi], out=packed[lo:hi])
            else:
                packed[lo:hi] = source.index_select(0, source_rows[lo:hi])
        return packed, small[2 * n_runs :]


def _int64(values: Any) -> torch.Tensor:
    """A host int64 tensor of `values` (through numpy: `torch.tensor` of a list costs ~0.1 us per element)."""
    return torch.from_numpy(np.array(values, dtype=np.int64))


def stage_store_pages(
    store: Any, ids: list[str], device: torch.device, cache: DevicePageCache | None = None
) -> tuple[list[str], list[StagedPages]]:
    """
    The stored pages of `ids` staged on `device`, through `cache` when given and the store has `revision()`.

    :param store: A multi-vector store.
    :param ids: Distinct document ids.
    :param device: The scoring device.
    :param cache: A device cache, or `None` to fetch and upload every page.
    :returns: The ids that have stored vectors, and the staged parts holding their pages in that order.
    """
    if cache is not None and callable(getattr(store, "revision", None)):
        return cache.stage(store, ids, device)
    vectors = store.get(ids)
    return list(vectors), ([stage_pages(list(vectors.values()), device=device)] if vectors else [])


class HostPageCache(_RevisionCache):
    """
    Stored pages' vectors kept in host memory as the store returned them, least recently used first out, within
    `max_bytes`.

    The CPU counterpart of `DevicePageCache`, for stores whose fetch costs (SQLite reads every blob): a cached page
    skips the fetch. The arrays are kept in the store's dtype (float16 by default): measured on the 2-vCPU VM, the
    MaxSim kernel's fused float16 -> float32 conversion costs less than reading float32 copies of twice the size
    (1000 pages of 768 x 128: 50 vs 57 ms). Invalidated like `DevicePageCache` by the store's `revision()`:
    `lookup` must always be called from the same thread (a SQLite revision is read on that thread's connection),
    while the missing pages may be fetched and `insert`ed from any thread, so concurrent queries do not queue
    behind one thread's blob reads. Thread-safe. `max_bytes`: host memory the cached arrays may hold; a page larger
    than this is not cached.
    """

    def lookup(self, store: Any, ids: list[str]) -> HostLookup:
        """
        The cached pages of `ids`, after checking the store's revision (call it from one thread: see the class).

        :param store: A multi-vector store with `get(ids)` and `revision()`.
        :param ids: Distinct document ids.
        :returns: The cached ids and arrays (read-only: shared with the cache), the ids to fetch, and the token to
            `insert` the fetched pages under.
        :raises Exception: Whatever the store's `revision` raises.
        """
        revision = store.revision()
        with self._lock:
            owner = self._owner_for(store, revision)
            found = [doc_id for doc_id in ids if doc_id in self._entries]
            pages = [self._entries[doc_id] for doc_id in found]
            for doc_id in found:
                self._entries.move_to_end(doc_id)
            self.hits += len(found)
            hit = set(found)
            missing = [doc_id for doc_id in ids if doc_id not in hit]
            self.misses += len(missing)
            return HostLookup(found, pages, missing, owner)

    def insert(self, fetched: dict[str, np.ndarray], owner: tuple[Any, Hashable]) -> None:
        """
        Cache pages fetched after `lookup` (from any thread: data at least as new as `owner`'s revision, so at worst
        the next revision check drops it), unless the cache has moved to another revision or store since.

        :param fetched: `{document_id: array}` as the store's `get` returned them.
        :param owner: `HostLookup.owner` of the lookup that asked for them.
        """
        with self._lock:
            if self._owner is not owner:
                return
            for doc_id, page in fetched.items():
                if page.nbytes > self.max_bytes:
                    continue
                old = self._entries.pop(doc_id, None)
                if old is not None:
                    self._bytes -= old.nbytes
                self._entries[doc_id] = page
                self._bytes += page.nbytes
            while self._bytes > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def pages(self, store: Any, ids: list[str]) -> tuple[list[str], list[np.ndarray]]:
        """
        `lookup`, then fetch the missing pages from the store and `insert` them, in this thread.

        :param store: A multi-vector store with `get(ids)` and `revision()`.
        :param ids: Distinct document ids.
        :returns: The ids that have stored vectors and their arrays, cached pages first; ids without vectors are
            left out.
        :raises Exception: Whatever the store's `get` or `revision` raise.
        """
        cached = self.lookup(store, ids)
        if not cached.missing:
            return cached.found, cached.pages
        fetched = store.get(cached.missing)
        self.insert(fetched, cached.owner)
        return [*cached.found, *fetched], [*cached.pages, *fetched.values()]


@dataclass(frozen=True)
class HostLookup:
    """What `HostPageCache.lookup` found: cached pages, the ids to fetch, and the revision token to insert under."""

    found: list[str]
    pages: list[np.ndarray]
    missing: list[str]
    owner: tuple[Any, Hashable]
