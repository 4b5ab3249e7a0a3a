"""The MaxSim (late-interaction) kernel: one query's token vectors against many stored pages.

`score(q, p) = sum_i max_j <q_i, p_j>` over query tokens `i` and page vectors `j` (ColBERT / ColPali).

Built for stage-2 reranking on a CPU: one query of ~20 tokens against ~100 pages of ~1000 vectors
each, stored in float16. Each page is converted into a reused, cache-resident float32 buffer and
multiplied there (`(Lq, d) @ (d, Lp)`, then a contiguous max over the page), so no padded 3-D tensor
and no corpus-sized float32 copy is ever allocated. Pages may have different lengths and no padding
row can win a max. Measured on the project's 2-core machine this beats colpali-engine's
`score_multi_vector` (see `benchmarks/rerank_latency.py`); splitting pages over threads did not help
there, so the kernel is single-threaded and safe to call from many threads at once.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

_LOCAL = threading.local()

# Stored vectors are read-only views of fetched blobs (see SQLiteMultiVectorStore.get); the kernel only
# reads them, so torch's warning about non-writable arrays does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def _as_tensor(array: ArrayLike) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(array))


def _buffer(rows: int, dim: int) -> torch.Tensor:
    buf = getattr(_LOCAL, "buffer", None)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != dim:
        buf = torch.empty((max(rows, 2048), dim), dtype=torch.float32)
        _LOCAL.buffer = buf
    return buf[:rows]


def maxsim(query: ArrayLike, pages: Sequence[ArrayLike]) -> np.ndarray:
    """
    MaxSim scores of one query against a list of pages.

    :param query: Query token vectors, shape `(Lq, d)`, float16/float32/bfloat16 (numpy or torch).
        Rows that are all zeros (padding) add nothing to any score.
    :param pages: Page vectors, each of shape `(Lp_i, d)` with its own `Lp_i >= 1`, float16/float32/bfloat16.
    :returns: `float32` array of shape `(len(pages),)`; empty when `pages` is empty. Computed in float32.
    :raises ValueError: When the query is not 2-D or has no tokens, or a page is not 2-D, is empty, or its
        dimension differs from the query's (the message names the page's position).
    """
    query_t = _as_tensor(query)
    if query_t.ndim != 2 or query_t.shape[0] == 0:
        msg = f"query must be a non-empty 2-D array (tokens, dim), got shape {tuple(query_t.shape)}"
        raise ValueError(msg)
    query_t = query_t.to(torch.float32).contiguous()
    dim = query_t.shape[1]
    page_ts = [_as_tensor(p) for p in pages]
    for i, page in enumerate(page_ts):
        if page.ndim != 2 or page.shape[0] == 0:
            msg = f"page {i} must be a non-empty 2-D array (vectors, dim), got shape {tuple(page.shape)}"
            raise ValueError(msg)
        if page.shape[1] != dim:
            msg = f"page {i} has vectors of dim {page.shape[1]} but the query has dim {dim}"
            raise ValueError(msg)
    scores = torch.empty(len(page_ts), dtype=torch.float32)
    with torch.inference_mode():
        for i, page in enumerate(page_ts):
            if page.dtype == torch.float32:
                page32 = page
            else:
                page32 = _buffer(page.shape[0], dim)
                page32.copy_(page)
            scores[i] = torch.mm(query_t, page32.T).amax(dim=1).sum()
    return scores.numpy()
