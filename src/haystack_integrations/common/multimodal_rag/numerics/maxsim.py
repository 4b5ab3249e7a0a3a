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
- `maxsim_padded(query, pages, device=...)`, device-generic torch: the pages are packed in one (pinned,
  on CUDA) host buffer, moved to the device in one copy, scored in one padded and masked batched
  matmul, and only the scores come back. `maxsim(..., device="cuda:0")` dispatches to it; the ranker
  uses it when its model is on a GPU.

Padding rows never win a max (masked to -inf, or not there), pages may have different lengths, and a page
containing NaN gets a NaN score (torch's max reductions propagate NaN), which callers can detect.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

#: Rows converted to float32 at a time: 2048 x 128 x 4 B = 1 MiB, inside a core's L2 cache.
BLOCK_ROWS = 2048
#: Worker threads of the CPU kernel: a fixed, small number (2 of the project's 2-core target machine).
CPU_THREADS = max(1, min(2, os.cpu_count() or 1))

_LOCAL = threading.local()
_POOL_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_POOL_READY = False
_POOL_PID: int | None = None  # a forked child inherits no worker threads: it builds its own pool
_WARN_LOCK = threading.Lock()
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


def _check_pages(pages: Sequence[ArrayLike], dim: int, offset: int = 0) -> list[torch.Tensor]:
    page_ts = [_as_tensor(p) for p in pages]
    for i, page in enumerate(page_ts, start=offset):
        if page.ndim != 2 or page.shape[0] == 0:
            msg = f"page {i} must be a non-empty 2-D array (vectors, dim), got shape {tuple(page.shape)}"
            raise ValueError(msg)
        if page.shape[1] != dim:
            msg = f"page {i} has vectors of dim {page.shape[1]} but the query has dim {dim}"
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


def cpu_kernel_threads() -> int:
    """
    How many threads the CPU kernel uses: `CPU_THREADS` when its workers could be pinned to one torch
    thread each (ATen's OpenMP backend), else torch's own intra-op thread count.

    :returns: The thread count.
    """
    return CPU_THREADS if _pool() is not None else torch.get_num_threads()


# --- device-generic batched kernel ----------------------------------------------------------------------


def maxsim_padded(query: ArrayLike, pages: Sequence[ArrayLike], *, device: str | torch.device) -> np.ndarray:
    """
    MaxSim of one query against many pages in one padded, masked, batched kernel on `device`.

    The pages are packed into one host buffer (page-locked when `device` is CUDA) and moved in one
    non-blocking copy; the device pads them to `(n_pages, max_len, d)`, masks the padding rows to `-inf`
    before the max, and only the `n_pages` scores are copied back.

    :param query: `(Lq, d)`, float16/float32/bfloat16 (numpy or torch).
    :param pages: Each `(Lp_i, d)`, `Lp_i >= 1`.
    :param device: A torch device (`"cuda:0"`, `"cpu"`, `"mps"`, ...).
    :returns: `float32` array of shape `(len(pages),)`, the same values as `maxsim` up to float32 rounding.
    :raises ValueError: On bad shapes, as `maxsim`.
    """
    query_t, page_ts = _validate(query, pages)
    if not page_ts:
        return np.empty(0, dtype=np.float32)
    target = torch.device(device)
    dim = query_t.shape[1]
    lengths = [int(p.shape[0]) for p in page_ts]
    dtypes = {p.dtype for p in page_ts}
    pack_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    with torch.inference_mode():
        if all(p.device == target for p in page_ts):
            packed = torch.cat([p.to(pack_dtype) for p in page_ts])
        else:
            host = torch.empty(
                (sum(lengths), dim), dtype=pack_dtype, pin_memory=target.type == "cuda" and torch.cuda.is_available()
            )
            torch.cat([p.cpu().to(pack_dtype) for p in page_ts], out=host)
            packed = host.to(target, non_blocking=True)
        n_pages, max_len = len(page_ts), max(lengths)
        lengths_t = torch.tensor(lengths, device=target)
        mask = torch.arange(max_len, device=target)[None, :] < lengths_t[:, None]  # (n_pages, max_len)
        padded = torch.zeros((n_pages, max_len, dim), dtype=torch.float32, device=target)
        padded[mask] = packed.to(torch.float32)  # row-major mask order == packing order
        sims = torch.matmul(padded, query_t.to(target, torch.float32).T)  # (n_pages, max_len, Lq)
        sims.masked_fill_(~mask[:, :, None], float("-inf"))
        scores = sims.amax(dim=1).sum(dim=1)
        return scores.to("cpu", torch.float32).numpy()
