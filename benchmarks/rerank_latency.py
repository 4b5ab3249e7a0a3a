"""Stage-2 reranking latency: the MaxSim kernel, the ColPaliRanker, stored bytes, and the stores.

All numbers are medians within one run; ratios compare methods measured in the same run.

1. MaxSim of a 20-token query against 100 and 1000 stored pages (1030 x 128, float16 stored): our kernel
   (including the fetch from InMemoryMultiVectorStore) vs colpali-engine's `score_multi_vector`, on the
   same tensors; and with pool_factor 3.
2. `ColPaliRanker.run` for 100 candidates with a tiny random ColQwen2: stored vectors vs encoding every
   page at query time (cache off, i.e. what query-time re-encoding designs do).
3. Bytes per stored page: float16, pool_factor 2 and 3.
4. Fetch + MaxSim of 100 random pages out of `--pages` stored, for the in-memory, SQLite and embedded
   Qdrant stores, warm (median) and cold (first query after opening the store in a fresh process).
   Embedded Qdrant holds every vector in Python memory: with 5000 such pages the process was killed for
   memory on the 24 GiB machine, so it stores `--qdrant-pages` (1000 by default).

    python benchmarks/rerank_latency.py                  # full run (5000 stored pages)
    python benchmarks/rerank_latency.py --quick          # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor
from haystack import Document
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.colpali import pool_multivectors
from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.document_stores.multivector import (
    InMemoryMultiVectorStore,
    QdrantMultiVectorStore,
    SQLiteMultiVectorStore,
)
from haystack_integrations.testing.multimodal_rag.tiny_models import build_tiny_qwen2_vl

PAGE_VECTORS = 1030
DIM = 128
QUERY_TOKENS = 20


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def structured_page(rng: np.random.Generator) -> np.ndarray:
    """A page whose patch vectors cluster around a few topics, like real ColPali pages (for pooling)."""
    centres = unit_rows(rng, 24)
    rows = centres[rng.integers(0, 24, PAGE_VECTORS)] + 0.3 * unit_rows(rng, PAGE_VECTORS)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def section_kernel(rng: np.random.Generator, repeats: int, sizes: list[int]) -> None:
    print("\n## 1. MaxSim, 20-token query, pages of 1030 x 128 stored as float16")
    query = unit_rows(rng, QUERY_TOKENS)
    query_t = torch.from_numpy(query)
    scorer = BaseVisualRetrieverProcessor.score_multi_vector
    for n_pages in sizes:
        pages = [unit_rows(rng, PAGE_VECTORS).astype(np.float16) for _ in range(n_pages)]
        store = InMemoryMultiVectorStore()
        ids = [f"p{i}" for i in range(n_pages)]
        store.write(dict(zip(ids, pages, strict=True)))
        pages32 = [torch.from_numpy(p.astype(np.float32)) for p in pages]
        pages16 = [torch.from_numpy(p) for p in pages]
        reps = repeats if n_pages <= 100 else max(3, repeats // 5)
        ours = median_ms(lambda ids=ids, store=store: maxsim(query, list(store.get(ids).values())), reps)
        theirs32 = median_ms(lambda p=pages32: scorer([query_t], p, device="cpu"), reps)
        theirs16 = median_ms(lambda p=pages16: scorer([query_t], [x.float() for x in p], device="cpu"), reps)
        ours_s = maxsim(query, pages)
        ref = scorer([query_t], pages32, device="cpu")[0].numpy()
        rel = float(np.max(np.abs(ours_s - ref) / np.abs(ref)))
        print(f"{n_pages:5d} pages | ours (fetch + kernel): {ours:8.2f} ms")
        print(
            f"{n_pages:5d} pages | colpali score_multi_vector, float32 tensors given: {theirs32:8.2f} ms "
            f"({theirs32 / ours:4.2f}x ours)"
        )
        print(
            f"{n_pages:5d} pages | colpali score_multi_vector, float16 stored (+ conversion): {theirs16:8.2f} ms "
            f"({theirs16 / ours:4.2f}x ours)"
        )
        print(f"{n_pages:5d} pages | max relative difference ours vs colpali: {rel:.2e}")
        if n_pages == 100:
            pooled = pool_multivectors([structured_page(rng).astype(np.float32) for _ in range(n_pages)], 3)
            pstore = InMemoryMultiVectorStore()
            pstore.write(dict(zip(ids, pooled, strict=True)))
            pooled_ms = median_ms(lambda ids=ids, s=pstore: maxsim(query, list(s.get(ids).values())), reps)
            mean_n = statistics.mean(p.shape[0] for p in pooled)
            print(f"{n_pages:5d} pages | ours, pool_factor 3 (~{mean_n:.0f} vectors/page): {pooled_ms:8.2f} ms")


def section_bytes(rng: np.random.Generator) -> None:
    print("\n## 3. Stored bytes per page (1030 x 128 page, float16)")
    page = structured_page(rng).astype(np.float32)
    for factor in (None, 2, 3):
        kept = page if factor is None else pool_multivectors([page], factor)[0]
        label = "no pooling" if factor is None else f"pool_factor {factor}"
        print(f"{label:>13}: {kept.shape[0]:5d} vectors, {kept.shape[0] * DIM * 2:8d} bytes")


def section_ranker(tmp: Path, repeats: int, n_candidates: int) -> None:
    print(f"\n## 2. ColPaliRanker.run, {n_candidates} candidates, tiny random ColQwen2 (CPU)")
    model = str(build_tiny_qwen2_vl(tmp / "colqwen2", kind="colpali", version="2", max_pixels=28 * 28 * 64))
    rng = np.random.default_rng(1)
    docs = []
    for i in range(n_candidates):
        path = tmp / "pages" / f"page{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(path)
        docs.append(Document(meta={"file_path": str(path)}, score=float(rng.random())))
    store = InMemoryMultiVectorStore()
    ColPaliDocumentEmbedder(model, multivector_store=store, progress_bar=False, batch_size=8).run(docs)
    stored = ColPaliRanker(model, multivector_store=store, top_k=10)
    on_the_fly = ColPaliRanker(model, multivector_store=None, top_k=10, cache_size=0, batch_size=8)
    stored_ms = median_ms(lambda: stored.run(query="quarterly revenue chart", documents=docs), repeats)
    fly_ms = median_ms(lambda: on_the_fly.run(query="quarterly revenue chart", documents=docs), max(3, repeats // 4))
    print(f"stored vectors: {stored_ms:9.1f} ms")
    print(f"encode at query time: {fly_ms:9.1f} ms ({fly_ms / stored_ms:.0f}x slower)")
    print(
        f"(pages: {statistics.mean(a.shape[0] for a in store.get([d.id for d in docs]).values()):.0f} vectors "
        "each with this tiny model; the real ColQwen2.5 makes ~750-1030 and its vision tower is ~1000x larger)"
    )


def _fill(store: object, n_pages: int, seed: int = 2) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = [f"page-{i:05d}" for i in range(n_pages)]
    batch = 50
    for start in range(0, n_pages, batch):
        store.write({doc_id: unit_rows(rng, PAGE_VECTORS).astype(np.float16) for doc_id in ids[start : start + batch]})
    return ids


def _open(kind: str, location: str) -> object:
    if kind == "sqlite":
        return SQLiteMultiVectorStore(location)
    return QdrantMultiVectorStore(path=location)


def time_fetch_and_score(
    store: object, ids: list[str], query: np.ndarray, queries: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Median ms of `get` for 100 random ids, and of `get` + MaxSim, over `queries` queries."""
    fetch, total = [], []
    for _ in range(queries):
        pick = list(rng.choice(ids, 100, replace=False))
        t0 = time.perf_counter()
        vectors = store.get(pick)
        t1 = time.perf_counter()
        maxsim(query, list(vectors.values()))
        fetch.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    return statistics.median(fetch) * 1000, statistics.median(total) * 1000


def store_child(kind: str, location: str, n_pages: int, queries: int) -> None:
    """Runs in a fresh process: open a store, time the first query (cold) and then warm ones."""
    rng = np.random.default_rng(3)
    ids = [f"page-{i:05d}" for i in range(n_pages)]
    query = unit_rows(rng, QUERY_TOKENS)
    result: dict[str, float] = {}
    start = time.perf_counter()
    store = _open(kind, location)
    pick = list(rng.choice(ids, 100, replace=False))
    vectors = store.get(pick)
    maxsim(query, list(vectors.values()))
    result["cold_open_fetch_score_ms"] = (time.perf_counter() - start) * 1000
    result["warm_fetch_ms"], result["warm_fetch_score_ms"] = time_fetch_and_score(store, ids, query, queries, rng)
    if kind == "qdrant":
        server = []
        for _ in range(queries):
            pick = list(rng.choice(ids, 100, replace=False))
            t0 = time.perf_counter()
            store.score(query, pick)
            server.append(time.perf_counter() - t0)
        result["warm_in_qdrant_maxsim_ms"] = statistics.median(server) * 1000
    print("RESULT " + json.dumps(result))


def _run_child(kind: str, location: str, n_pages: int, queries: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--store-child", kind, location, str(n_pages), str(queries)],
        check=True,
        capture_output=True,
        text=True,
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(out.stdout + out.stderr)


def section_stores(tmp: Path, n_pages: int, qdrant_pages: int, queries: int) -> None:
    print("\n## 4. Fetch + MaxSim of 100 random pages (1030 x 128 float16) out of N stored")
    rng = np.random.default_rng(4)
    query = unit_rows(rng, QUERY_TOKENS)

    memory = InMemoryMultiVectorStore()
    ids = _fill(memory, n_pages)
    fetch_ms, total_ms = time_fetch_and_score(memory, ids, query, queries, rng)
    print(
        f"in-memory  N={n_pages}: warm fetch {fetch_ms:8.2f} ms, "
        f"fetch + MaxSim {total_ms:8.2f} ms (cold: nothing to open)"
    )
    memory.clear()

    sqlite_path = str(tmp / "mv.sqlite")
    start = time.perf_counter()
    sqlite = SQLiteMultiVectorStore(sqlite_path)
    _fill(sqlite, n_pages)
    write_s = time.perf_counter() - start
    fetch_ms, total_ms = time_fetch_and_score(sqlite, ids, query, queries, rng)
    sqlite.close()
    print(
        f"SQLite     N={n_pages}: in the process that wrote it: fetch {fetch_ms:8.2f} ms, "
        f"fetch + MaxSim {total_ms:8.2f} ms; writing {n_pages} pages took {write_s:.1f} s"
    )
    r = _run_child("sqlite", sqlite_path, n_pages, queries)
    print(
        f"SQLite     N={n_pages}: fresh process: warm fetch {r['warm_fetch_ms']:8.2f} ms, fetch + MaxSim "
        f"{r['warm_fetch_score_ms']:8.2f} ms; cold (open + first query) {r['cold_open_fetch_score_ms']:8.2f} ms"
    )

    qdrant_path = str(tmp / "qdrant")
    start = time.perf_counter()
    qdrant = QdrantMultiVectorStore(path=qdrant_path)
    _fill(qdrant, qdrant_pages)
    qdrant.close()
    write_s = time.perf_counter() - start
    r = _run_child("qdrant", qdrant_path, qdrant_pages, max(3, queries // 4))
    print(
        f"Qdrant-local N={qdrant_pages}: warm fetch {r['warm_fetch_ms']:8.2f} ms, fetch + MaxSim "
        f"{r['warm_fetch_score_ms']:8.2f} ms, MaxSim inside Qdrant {r['warm_in_qdrant_maxsim_ms']:8.2f} ms; "
        f"cold (open + first query) {r['cold_open_fetch_score_ms']:8.2f} ms; writing took {write_s:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--pages", type=int, default=5000, help="stored pages for section 4")
    parser.add_argument(
        "--qdrant-pages",
        type=int,
        default=1000,
        help="stored pages for embedded Qdrant (5000 was killed for memory on the 24 GiB machine)",
    )
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4], help="which sections to run")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--store-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.store_child:
        kind, location, n_pages, queries = args.store_child
        store_child(kind, location, int(n_pages), int(queries))
        return
    sizes = [100, 1000]
    if args.quick:
        args.repeats, args.pages, args.qdrant_pages, args.candidates, sizes = 5, 300, 200, 20, [100]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rng = np.random.default_rng(0)
    if 1 in args.sections:
        section_kernel(rng, args.repeats, sizes)
    with tempfile.TemporaryDirectory() as tmp:
        if 2 in args.sections:
            section_ranker(Path(tmp), args.repeats, args.candidates)
        if 3 in args.sections:
            section_bytes(rng)
        if 4 in args.sections:
            section_stores(Path(tmp), args.pages, args.qdrant_pages, args.repeats)


if __name__ == "__main__":
    main()
