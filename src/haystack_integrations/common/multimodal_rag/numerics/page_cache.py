"""A bounded cache of stored pages' multi-vectors on the scoring device, for `ColPaliRanker` on a GPU.

Re-ranking 1000 candidates of 768 x 128 float16 moves 188 MiB from host memory to the GPU per query (packing into
page-locked memory, then the copy), which costs more than the query encoding it overlaps. Queries of one
deployment keep meeting the same hot pages, so the pages a query fetched stay on the device, in the blocks they
were uploaded in, up to a byte budget; the next query gathers its cached pages there (one device-side copy) and
fetches and uploads only the others.

The cache is only as current as the store says: every lookup first asks the store's `revision()` (a counter of
changes; SQLite's `PRAGMA data_version` for commits by other connections and processes) and drops everything when
it changed, so a page re-indexed in between is never served stale. Stores without `revision()` are not cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from haystack import logging

from haystack_integrations.common.multimodal_rag.numerics.maxsim import StagedPages, stage_pages

logger = logging.getLogger(__name__)

__all__ = ["DevicePageCache", "HostLookup", "HostPageCache", "stage_store_pages"]


@dataclass
class _Block:
    """One upload: pages packed row after row on the device, charged in full while any of its pages is cached."""

    packed: torch.Tensor
    ready: torch.cuda.Event | None
    live: int


@dataclass(frozen=True)
class _Entry:
    block: _Block
    start: int
    length: int


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
            (cached pages first, then the fetched ones); ids without vectors are left out.
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
                self._entries[doc_id] = _Entry(block, start, length)
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
    """Copy cached pages into one packed tensor on their device (a device-side copy, no host transfer)."""
    current = torch.cuda.current_stream(device) if device.type == "cuda" else None
    if current is not None:
        for block in {id(entry.block): entry.block for entry in entries}.values():
            if block.ready is not None:
                current.wait_event(block.ready)  # the upload that filled it has finished (a no-op once it has)
            # The block was allocated on the upload stream and is read on this one: its memory must not be
            # reused by the upload stream before this read is done, even if the block is evicted meanwhile.
            block.packed.record_stream(current)
    staged = stage_pages(
        [entry.block.packed[entry.start : entry.start + entry.length] for entry in entries], device=device
    )
    if current is None:
        return staged
    # The copy is queued on THIS thread's current stream (the fetch thread's), but the pages are scored on the
    # scoring thread's current stream, which may be another one (a caller inside `torch.cuda.stream(...)`). With
    # `ready` set, `maxsim_staged` waits for the copy on its own stream and records its use of the new tensors
    # there, so the caching allocator does not hand their memory out before the scoring has read it.
    ready = torch.cuda.Event()
    ready.record(current)
    return replace(staged, ready=ready)


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
