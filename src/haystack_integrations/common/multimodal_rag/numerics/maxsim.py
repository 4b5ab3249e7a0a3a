"""The MaxSim (late-interaction) kernels: one query's token vectors against many stored pages.

`score(q, p) = sum_i max_j <q_i, p_j>` over query tokens `i` and page vectors `j` (ColBERT / ColPali; the
same formula as colpali-engine's `BaseVisualRetrieverProcessor.score_multi_vector`, which zero-pads pages
instead of masking them, colpali_engine/utils/processing_utils.py).

Two paths, one result:

- `maxsim(query, pages)` on the CPU. Stage-2 reranking holds ~100 pages of ~1000 float16 vectors: the cost
  is converting them to float32 and multiplying. Each page is converted in blocks of at most
  `BLOCK_ROWS` rows into a reused float32 buffer that stays in the core's L2 cache, and multiplied there
  (`(Lq, d) @ (d, rows)`, then a max over the rows), so neither a padded 3-D tensor nor a corpus-sized
  float32 copy is ever allocated. The pages are split over a fixed pool of `CPU_THREADS` worker threads
  (at most 2) whose torch calls run single-threaded, so the kernel uses a bounded number of cores
  however many queries run at once, and does not collapse when other threads of the process run
  torch/numpy work (OpenMP teams of several threads spin-waiting on the same cores is what collapses).
- `maxsim_chunks(query, chunks)`: the same CPU kernel for pages that arrive batch by batch (a store's fetch):
  the caller fetches the next batch while the workers score the previous one.
- `maxsim_padded(query, pages, device=...)`, device-generic torch: `stage_pages` packs the pages into one
  host buffer (on CUDA a reused page-locked one, copied to the device on a side stream without blocking the
  host), `maxsim_staged` scores them with no host synchronisation (one batched matmul when the pages have one
  length, else one `(rows, Lq)` matmul and a per-page segment max), and only the scores come back.
  `maxsim(..., device="cuda:0")` dispatches to it; the ranker stages its stored pages while the query is
  being encoded on the GPU and scores them with `maxsim_staged`.

Padding rows never win a max (there are none), pages may have different lengths, and a page containing NaN
gets a non-finite score (NaN or inf), which callers can detect.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

#: Rows converted to float32 at a time: 2048 x 128 x 4 B = 1 MiB, inside a core's L2 cache.
BLOCK_ROWS = 2048
#: Worker threads of the CPU kernel: a fixed, small number (2 of the project's 2-core target machine).
CPU_THREADS = max(1, min(2, os.cpu_count() or 1))
#: Threads that copy pages into the page-locked staging buffer for a GPU. One core copied about 5 GB/s on an H100
#: machine (1000 pages of 768 x 128 float16 are 188 MiB); while a launch-bound query encoding ran beside the copy,
#: 2 threads overlapped best there (more copy faster alone but slow the thread feeding the GPU).
PACK_THREADS = max(1, min(2, (os.cpu_count() or 1) // 2))

_LOCAL = threading.local()
_POOL_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_POOL_READY = False
_POOL_PID: int | None = None  # a forked child inherits no worker threads: it builds its own pool
_WARN_LOCK = threading.Lock()
_PACK_LOCK = threading.Lock()
_PACK_POOL: tuple[ThreadPoolExecutor, int] | None = None  # and the pid it was made in (a fork gets no threads)
_READ_ONLY_SEEN = False


def _as_tensor(array: ArrayLike) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach()
    array = np.ascontiguousarray(array)
    if array.flags.writeable:
        return torch.from_numpy(array)
    # Stored vectors are read-only views of fetched blobs (SQLiteMultiVectorStore); the kernels only read
    # them, so torch's warning about non-writable arrays does not apply. Torch issues it once per process
    # (TORCH_WARN_ONCE in torch/csrc/utils/tensor_numpy.cpp), so only the first conversion needs the scoped
    # filter; later ones touch no warning state (catch_warnings mutates process-global filters).
    global _READ_ONLY_SEEN
    if _READ_ONLY_SEEN:
        return torch.from_numpy(array)
    with _WARN_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        tensor = torch.from_numpy(array)
        _READ_ONLY_SEEN = True
    return tensor


def _check_query(query: ArrayLike) -> torch.Tensor:
    query_t = _as_tensor(query)
    if query_t.ndim != 2 or query_t.shape[0] == 0:
        msg = f"query must be a non-empty 2-D array (tokens, dim), got shape {tuple(query_t.shape)}"
        raise ValueError(msg)
    return query_t


def _check_pages(
    pages: Sequence[ArrayLike], dim: int, offset: int = 0, *, against: str = "the query"
) -> list[torch.Tensor]:
    page_ts = [_as_tensor(p) for p in pages]
    for i, page in enumerate(page_ts, start=offset):
        if page.ndim != 2 or page.shape[0] == 0:
            msg = f"page {i} must be a non-empty 2-D array (vectors, dim), got shape {tuple(page.shape)}"
            raise ValueError(msg)
        if page.shape[1] != dim:
            msg = f"page {i} has vectors of dim {page.shape[1]} but {against} has dim {dim}"
            raise ValueError(msg)
    return page_ts


def _validate(query: ArrayLike, pages: Sequence[ArrayLike]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    query_t = _check_query(query)
    return query_t, _check_pages(pages, query_t.shape[1])


# --- CPU kernel ----------------------------------------------------------------------------------------


def _pin_worker() -> None:
    # With ATen's OpenMP backend, `torch.set_num_threads` sets the calling thread's OpenMP thread count (a
    # per-thread ICV) and MKL's thread-local count (aten/src/ATen/ParallelOpenMP.cpp: omp_set_num_threads,
    # mkl_set_num_threads_local), so the worker's torch calls run on the worker alone. The process-wide
    # default it also sets is restored by `_pool()` once every worker is pinned.
    torch.set_num_threads(1)


def _pool() -> ThreadPoolExecutor | None:
    """The process's fixed worker pool (started on first use), or `None` when workers cannot be pinned."""
    global _POOL, _POOL_READY, _POOL_PID, _POOL_LOCK
    if _POOL_PID is not None and os.getpid() != _POOL_PID:
        _POOL_LOCK = threading.Lock()  # the parent's lock may have been held by a thread that did not fork along
        _POOL_PID = None
    with _POOL_LOCK:
        if _POOL_READY and os.getpid() == _POOL_PID:
            return _POOL
        _POOL, _POOL_READY, _POOL_PID = None, True, os.getpid()
        # Other parallel backends share one intra-op pool process-wide (no per-thread count): the kernel then
        # runs in the calling thread on torch's own threads.
        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return None
        saved = torch.get_num_threads()
        pool = ThreadPoolExecutor(CPU_THREADS, thread_name_prefix="maxsim", initializer=_pin_worker)
        barrier = threading.Barrier(CPU_THREADS)

        def thread_count() -> int:
            barrier.wait(timeout=30)  # one call per worker: every worker is created and pinned
            return torch.get_num_threads()

        [f.result() for f in [pool.submit(thread_count) for _ in range(CPU_THREADS)]]
        restore = threading.Thread(target=torch.set_num_threads, args=(saved,))
        restore.start()
        restore.join()
        barrier.reset()
        counts = [f.result() for f in [pool.submit(thread_count) for _ in range(CPU_THREADS)]]
        if all(n == 1 for n in counts):
            _POOL = pool
        else:
            pool.shutdown(wait=False)
        return _POOL


def _buffer(dim: int) -> torch.Tensor:
    buf = getattr(_LOCAL, "buffer", None)
    if buf is None or buf.shape[1] != dim:
        buf = torch.empty((BLOCK_ROWS, dim), dtype=torch.float32)
        _LOCAL.buffer = buf
    return buf


def _score_range(query: torch.Tensor, pages: Sequence[torch.Tensor], lo: int, hi: int, best: torch.Tensor) -> None:
    """Write each page's per-query-token maxima into `best[i]` (shape `(Lq,)`) for pages `lo..hi-1`."""
    dim = query.shape[1]
    buf = _buffer(dim)
    sims = torch.empty((query.shape[0], BLOCK_ROWS), dtype=torch.float32)
    part_max = torch.empty(query.shape[0], dtype=torch.float32)
    with torch.inference_mode():
        for i in range(lo, hi):
            page = pages[i]
            rows = page.shape[0]
            for start in range(0, rows, BLOCK_ROWS):
                stop = min(start + BLOCK_ROWS, rows)
                if page.dtype == torch.float32:
                    block = page[start:stop]
                else:  # fused conversion: float16/bfloat16 -> float32 into the cache-resident buffer
                    block = buf[: stop - start]
                    block.copy_(page[start:stop])
                out = sims[:, : stop - start]
                torch.mm(query, block.T, out=out)
                if start == 0:
                    torch.amax(out, dim=1, out=best[i])
                else:
                    torch.amax(out, dim=1, out=part_max)
                    torch.maximum(best[i], part_max, out=best[i])
                    # torch.maximum propagates NaN like amax, so a NaN anywhere in the page reaches the score


def _split(pages: Sequence[torch.Tensor], parts: int) -> list[tuple[int, int]]:
    """Contiguous page ranges of about equal row counts (several per worker, so a delayed worker is covered)."""
    total = sum(p.shape[0] for p in pages)
    target = max(BLOCK_ROWS, math.ceil(total / parts))
    ranges: list[tuple[int, int]] = []
    lo, rows = 0, 0
    for i, page in enumerate(pages):
        rows += page.shape[0]
        if rows >= target:
            ranges.append((lo, i + 1))
            lo, rows = i + 1, 0
    if lo < len(pages):
        ranges.append((lo, len(pages)))
    return ranges


def maxsim(query: ArrayLike, pages: Sequence[ArrayLike], *, device: str | torch.device | None = None) -> np.ndarray:
    """
    MaxSim scores of one query against a list of pages.

    :param query: Query token vectors, shape `(Lq, d)`, float16/float32/bfloat16 (numpy or torch).
        Rows that are all zeros (padding) add nothing to any score.
    :param pages: Page vectors, each of shape `(Lp_i, d)` with its own `Lp_i >= 1`, float16/float32/bfloat16.
    :param device: `None` or a CPU device: the CPU kernel (fixed worker pool). Any other torch device (e.g.
        `"cuda:0"`): `maxsim_padded` on that device.
    :returns: `float32` array of shape `(len(pages),)`; empty when `pages` is empty. Computed in float32.
        A page holding NaN or infinite values gets a non-finite score.
    :raises ValueError: When the query is not 2-D or has no tokens, or a page is not 2-D, is empty, or its
        dimension differs from the query's (the message names the page's position).
    """
    if device is not None and torch.device(device).type != "cpu":
        return maxsim_padded(query, pages, device=device)
    return maxsim_chunks(query, [pages])


def maxsim_by_id(
    query: ArrayLike, pages: Mapping[str, ArrayLike], *, device: str | torch.device | None = None
) -> dict[str, float]:
    """
    `maxsim` of one query against pages keyed by document id.

    :param query: Query token vectors, shape `(Lq, d)`.
    :param pages: Page vectors per document id (e.g. a store's `get`).
    :param device: As for `maxsim`.
    :returns: `{document_id: MaxSim}`; `{}` (nothing computed) when `pages` is empty.
    :raises ValueError: As for `maxsim`.
    """
    if not pages:
        return {}
    scores = maxsim(query, list(pages.values()), device=device)
    return dict(zip(pages.keys(), scores.tolist(), strict=True))


def maxsim_chunks(query: ArrayLike, chunks: Iterable[Sequence[ArrayLike]]) -> np.ndarray:
    """
    CPU MaxSim of one query against pages that arrive in chunks, e.g. fetched from a store batch by batch.

    Each chunk is handed to the worker pool as soon as it arrives, so the caller produces (fetches) chunk
    `i + 1` while the workers score chunk `i`.

    :param query: `(Lq, d)`, float16/float32/bfloat16 (numpy or torch).
    :param chunks: An iterable of page lists; pages as in `maxsim`.
    :returns: `float32` array with one score per page, in the order the pages arrived.
    :raises ValueError: On bad shapes, as `maxsim` (page positions count across chunks).
    """
    query32 = _check_query(query).to("cpu", torch.float32).contiguous()
    dim = query32.shape[1]
    pool = _pool()
    results: list[torch.Tensor] = []
    futures: list[Future[None]] = []
    seen = 0
    try:
        for chunk in chunks:
            page_ts = [p if p.device.type == "cpu" else p.cpu() for p in _check_pages(chunk, dim, offset=seen)]
            seen += len(page_ts)
            if not page_ts:
                continue
            best = torch.empty((len(page_ts), query32.shape[0]), dtype=torch.float32)
            results.append(best)
            if pool is None:
                _score_range(query32, page_ts, 0, len(page_ts), best)
                continue
            futures.extend(
                pool.submit(_score_range, query32, page_ts, lo, hi, best) for lo, hi in _split(page_ts, 4 * CPU_THREADS)
            )
    finally:
        for future in futures:
            future.result()  # also on an error: no worker may still write into `best` after we return
    if not results:
        return np.empty(0, dtype=np.float32)
    return torch.cat(results).sum(dim=1).numpy()


def cpu_workers() -> ThreadPoolExecutor | None:
    """
    The process's fixed pool of `CPU_THREADS` worker threads whose torch calls run single-threaded.

    Other CPU numerics (the hierarchical pooling) submit their work here, so that they too use a bounded number of
    cores and cannot collapse when other libraries' thread teams spin on the same cores.

    :returns: The pool, or `None` when its workers cannot be pinned (a parallel backend other than OpenMP); run the
        work in the calling thread then.
    """
    return _pool()


def cpu_kernel_threads() -> int:
    """
    How many threads the CPU kernel uses: `CPU_THREADS` when its workers could be pinned to one torch
    thread each (ATen's OpenMP backend), else torch's own intra-op thread count.

    :returns: The thread count.
    """
    return CPU_THREADS if _pool() is not None else torch.get_num_threads()


# --- device-generic batched kernel ----------------------------------------------------------------------


@dataclass(frozen=True)
class StagedPages:
    """
    Pages packed row after row into one tensor on the scoring device, by `stage_pages`.

    :param packed: `(total_rows, d)`: page 0's rows, then page 1's, ...
    :param lengths: Rows of each page, on the host.
    :param device_lengths: `lengths` as an int64 tensor on `packed.device`.
    :param ready: On CUDA, recorded on the copy stream once `packed` and `device_lengths` have arrived; `None`
        when they were made on the current stream.
    """

    packed: torch.Tensor
    lengths: tuple[int, ...]
    device_lengths: torch.Tensor
    ready: torch.cuda.Event | None = None


class _PinnedSlot:
    """A grow-only page-locked host buffer and the event of the last copy that read it."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.last_copy: torch.cuda.Event | None = None


def _pack(pages: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """
    Copy CPU pages row after row into `out` (`(total_rows, d)`, their dtype), split over `PACK_THREADS` threads.

    The copies are numpy's (a memcpy that releases the GIL), not `torch.cat`: that would wake an OpenMP team in
    the calling thread whose spinning threads take the cores the thread feeding the GPU needs.
    """
    global _PACK_POOL
    dest = out.view(torch.uint8).numpy()  # bytes: numpy has no bfloat16
    sources = [p.contiguous().view(torch.uint8).numpy() for p in pages]
    starts = np.cumsum([0, *(p.shape[0] for p in pages)]).tolist()

    def copy(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            dest[starts[i] : starts[i + 1]] = sources[i]

    parts = min(PACK_THREADS, len(pages))
    if parts <= 1:
        copy(0, len(pages))
        return
    with _PACK_LOCK:
        if _PACK_POOL is None or _PACK_POOL[1] != os.getpid():
            _PACK_POOL = (ThreadPoolExecutor(PACK_THREADS, thread_name_prefix="maxsim-pack"), os.getpid())
        pool = _PACK_POOL[0]
    cuts = [len(pages) * i // parts for i in range(parts + 1)]
    futures = [pool.submit(copy, cuts[i], cuts[i + 1]) for i in range(parts)]
    for future in futures:
        future.result()


def _pinned_slot(dtype: torch.dtype) -> _PinnedSlot:
    slots: dict[torch.dtype, _PinnedSlot] | None = getattr(_LOCAL, "pinned", None)
    if slots is None:
        slots = _LOCAL.pinned = {}
    return slots.setdefault(dtype, _PinnedSlot())


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    streams: dict[torch.device, torch.cuda.Stream] | None = getattr(_LOCAL, "copy_streams", None)
    if streams is None:
        streams = _LOCAL.copy_streams = {}
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def _cuda_index(device: str | torch.device) -> torch.device:
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return target


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """
    `tensor` on `device`, without blocking the host when it goes from the CPU to a CUDA device.

    :param tensor: Any tensor (a small one: on CUDA it is copied through freshly page-locked memory).
    :param device: The target device.
    :returns: `tensor` itself when it is already there, else a copy (queued on the current stream on CUDA).
    """
    target = _cuda_index(device)
    if tensor.device == target:
        return tensor
    if target.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(target, non_blocking=True)
    return tensor.to(target)


def stage_pages(pages: Sequence[ArrayLike], *, device: str | torch.device) -> StagedPages:
    """
    Pack pages into one tensor on `device`, for `maxsim_staged`.

    For a CUDA device the pages are packed into a page-locked host buffer and sent in one non-blocking copy on
    a side stream, so the call returns while the copy runs (e.g. while the query is encoded on the GPU). The
    buffer is kept for the next call: one per thread and dtype, grow-only (it stays as large as the largest
    request that thread made, e.g. 1000 pages x 768 x 128 float16 = 188 MiB), and reused only after its
    previous copy has finished. Mixed page dtypes are packed as float32.

    :param pages: Each `(Lp_i, d)`, `Lp_i >= 1`, one `d` for all, float16/float32/bfloat16 (numpy or torch).
    :param device: A torch device (`"cuda:0"`, `"cpu"`, `"mps"`, ...).
    :returns: The staged pages.
    :raises ValueError: When a page is not 2-D, is empty, or its width differs from page 0's.
    """
    target = _cuda_index(device)
    page_ts = [_as_tensor(p) for p in pages]
    dim = int(page_ts[0].shape[-1]) if page_ts else 0
    page_ts = _check_pages(page_ts, dim, against="page 0")
    lengths = tuple(int(p.shape[0]) for p in page_ts)
    dtypes = {p.dtype for p in page_ts}
    pack_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    host_lengths = torch.tensor(lengths, dtype=torch.int64)
    if not page_ts:
        return StagedPages(torch.empty((0, 0), device=target), (), host_lengths.to(target))
    total = sum(lengths)
    with torch.inference_mode():
        if target.type != "cpu" and all(p.device == target for p in page_ts):
            packed = torch.cat([p.to(pack_dtype) for p in page_ts])
            return StagedPages(packed, lengths, to_device(host_lengths, target))
        host_pages = [p.to("cpu", pack_dtype) for p in page_ts]
        if target.type != "cuda":
            host = torch.empty((total, dim), dtype=pack_dtype)
            _pack(host_pages, host)
            return StagedPages(host.to(target), lengths, host_lengths.to(target))
        slot = _pinned_slot(pack_dtype)
        if slot.last_copy is not None:
            slot.last_copy.synchronize()  # the previous copy out of this buffer has finished
        if slot.buffer is None or slot.buffer.numel() < total * dim:
            slot.buffer = None  # returned to torch's pinned-memory cache before the larger one is taken
            slot.buffer = torch.empty(total * dim, dtype=pack_dtype, pin_memory=True)
        host = slot.buffer[: total * dim].view(total, dim)
        _pack(host_pages, host)
        host_lengths = host_lengths.pin_memory()
        # A side stream, so the copy does not queue behind (or hold up) the kernels of the current stream.
        stream = _copy_stream(target)
        with torch.cuda.stream(stream):
            packed = host.to(target, non_blocking=True)
            device_lengths = host_lengths.to(target, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        slot.last_copy = ready
        return StagedPages(packed, lengths, device_lengths, ready)


def maxsim_staged(query: ArrayLike, staged: StagedPages) -> torch.Tensor:
    """
    MaxSim of one query against staged pages, on their device, without a host synchronisation.

    Pages of one length are scored as a `(n_pages, L, d)` batch; pages of different lengths as one
    `(total_rows, Lq)` similarity matrix reduced per page (a segment max), so no padding is materialised.

    :param query: `(Lq, d)`, float16/float32/bfloat16 (numpy or torch, on any device).
    :param staged: From `stage_pages`.
    :returns: `float32` tensor of shape `(n_pages,)` on the pages' device (not yet copied to the host), the
        same values as `maxsim` up to float32 rounding. A page holding NaN or infinite values gets a non-finite
        score.
    :raises ValueError: When the query is not 2-D, has no tokens, or its width differs from the pages'.
    """
    query_t = _check_query(query)
    packed, lengths = staged.packed, staged.lengths
    device = packed.device
    if not lengths:
        return torch.empty(0, dtype=torch.float32, device=device)
    if query_t.shape[1] != packed.shape[1]:
        msg = f"the query has vectors of dim {query_t.shape[1]} but the pages have dim {packed.shape[1]}"
        raise ValueError(msg)
    with torch.inference_mode():
        if staged.ready is not None:  # CUDA: wait for the copy on the device, not on the host
            current = torch.cuda.current_stream(device)
            current.wait_event(staged.ready)
            packed.record_stream(current)
            staged.device_lengths.record_stream(current)
        query32 = to_device(query_t, device).to(torch.float32)
        pages32 = packed.to(torch.float32)
        n_pages = len(lengths)
        if min(lengths) == max(lengths):
            sims = torch.matmul(pages32.view(n_pages, lengths[0], -1), query32.T)  # (n_pages, L, Lq)
            return sims.amax(dim=1).sum(dim=1)
        sims = pages32 @ query32.T  # (total_rows, Lq)
        # scatter_reduce's "amax" does not promise to propagate NaN: NaN becomes +inf, still non-finite.
        sims = torch.nan_to_num(sims, nan=math.inf, posinf=math.inf, neginf=-math.inf)
        page_of_row = torch.repeat_interleave(
            torch.arange(n_pages, device=device), staged.device_lengths, output_size=packed.shape[0]
        )
        best = torch.full((n_pages, query32.shape[0]), -math.inf, dtype=torch.float32, device=device)
        best.scatter_reduce_(0, page_of_row[:, None].expand_as(sims), sims, reduce="amax")
        return best.sum(dim=1)


def maxsim_padded(query: ArrayLike, pages: Sequence[ArrayLike], *, device: str | torch.device) -> np.ndarray:
    """
    MaxSim of one query against many pages in one batched kernel on `device`.

    `stage_pages` then `maxsim_staged`: the pages go to the device in one copy (from a reused page-locked
    buffer on CUDA), the kernel needs no host synchronisation, and only the `n_pages` scores come back.

    :param query: `(Lq, d)`, float16/float32/bfloat16 (numpy or torch).
    :param pages: Each `(Lp_i, d)`, `Lp_i >= 1`.
    :param device: A torch device (`"cuda:0"`, `"cpu"`, `"mps"`, ...).
    :returns: `float32` array of shape `(len(pages),)`, the same values as `maxsim` up to float32 rounding.
    :raises ValueError: On bad shapes, as `maxsim`.
    """
    query_t, page_ts = _validate(query, pages)
    if not page_ts:
        return np.empty(0, dtype=np.float32)
    return maxsim_staged(query_t, stage_pages(page_ts, device=device)).cpu().numpy()
