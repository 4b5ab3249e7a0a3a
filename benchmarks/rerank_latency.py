"""Stage-2 reranking latency: the MaxSim kernels, the ColPaliRanker, stored bytes, and the stores.

Every section interleaves its methods round by round (method A, B, C, then A, B, C again, ...) and prints
medians and ratios from the same run, so load drift on a shared machine moves every method alike.

1. MaxSim of a 20-token query against 100 and 1000 stored pages (1030 x 128, float16 stored): our CPU
   kernel (kernel alone, and `InMemoryMultiVectorStore.score`, i.e. fetch + kernel), with `--padded` our
   device-generic padded kernel run on the CPU (the GPU path; slow on a CPU), colpali-engine's
   `score_multi_vector` (float16 stored and converted, also with torch limited to 1 thread, and float32
   tensors given), and the measured compute floor: the same matrix products on one cache-resident
   float32 page per worker thread (no conversion, no memory traffic) on the kernel's thread count, and the
   conversion alone (float16 -> float32 into a reused buffer); their sum is what the kernel cannot beat.
2. The same 100-page kernel while another thread of the process runs torch and numpy work.
3. `ColPaliRanker.run` for 100 candidates with a tiny random ColQwen2: stored vectors, the query given as
   `query_multivector_embedding`, and encoding every page at query time (cache off).
4. Bytes per stored page: float16, pool_factor 2 and 3.
5. Stores: `score` of 100 and 1000 random pages out of `--pages` stored, in-memory vs SQLite (interleaved);
   SQLite's fetch with one copy (blob I/O) vs `SELECT data` (two copies) vs a plain memory copy of the same
   bytes; cold and warm numbers in a fresh process; embedded Qdrant with `--qdrant-pages`.
6. `ColPaliRanker` on a CPU with 768 x 128 float16 pages in SQLite, the query given as an embedding: the host
   page cache off (the default) vs `host_cache_mb=1024`, warm (the same pages again) and filling (new pages).

pylate is not a peer here: pylate 1.6.0 pins transformers<=5.3.0 and needs fast-plaid, which pins
torch==2.11.0; installing it would replace this project's torch 2.13 and transformers 5.x.

    python benchmarks/rerank_latency.py                  # full run
    python benchmarks/rerank_latency.py --quick          # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor
from haystack import Document
from PIL import Image

from haystack_integrations.common.multimodal_rag.numerics import maxsim as maxsim_module
from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim, maxsim_padded
from haystack_integrations.common.multimodal_rag.numerics.pooling import pool_multivectors
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder, ColPaliTextEmbedder
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


def interleaved(
    methods: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, cpu: dict[str, float] | None = None
) -> dict[str, float]:
    """
    Median wall ms per method, timing the methods one after another in each round.

    :param cpu: When given, filled with each method's median process CPU ms per call (all threads together:
        the cores a call keeps busy, which preemption by other processes does not inflate).
    """
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu_times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            cpu_start = time.process_time()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    if cpu is not None:
        cpu.update({name: statistics.median(values) * 1000 for name, values in cpu_times.items()})
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def structured_page(rng: np.random.Generator) -> np.ndarray:
    """A page whose patch vectors cluster around a few topics, like real ColPali pages (for pooling)."""
    centres = unit_rows(rng, 24)
    rows = centres[rng.integers(0, 24, PAGE_VECTORS)] + 0.3 * unit_rows(rng, PAGE_VECTORS)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def _on_workers(n_items: int, share: Callable[[int, int], None]) -> Callable[[], None]:
    """Run `share(lo, hi)` over `n_items` split evenly across the kernel's pinned workers."""
    pool = maxsim_module._pool()
    workers = maxsim_module.CPU_THREADS if pool is not None else 1
    bounds = [round(w * n_items / workers) for w in range(workers + 1)]

    def run() -> None:
        if pool is None:
            share(0, n_items)
        else:
            for f in [pool.submit(share, bounds[w], bounds[w + 1]) for w in range(workers)]:
                f.result()

    return run


def compute_floor(query: np.ndarray, pages: list[np.ndarray]) -> Callable[[], object]:
    """The kernel's arithmetic alone: each worker multiplies the query with ONE cache-hot float32 page."""
    q = torch.from_numpy(query)
    hot = torch.from_numpy(pages[0].astype(np.float32))

    def share(lo: int, hi: int) -> None:
        out = torch.empty((q.shape[0], hot.shape[0]))
        with torch.inference_mode():
            for _ in range(lo, hi):
                torch.mm(q, hot.T, out=out)
                out.amax(dim=1)

    return _on_workers(len(pages), share)


def conversion_floor(pages: list[np.ndarray]) -> Callable[[], object]:
    """The kernel's memory traffic alone: each worker converts its pages to float32 into one reused buffer."""
    tensors = [torch.from_numpy(p) for p in pages]

    def share(lo: int, hi: int) -> None:
        buf = torch.empty((PAGE_VECTORS, DIM))
        with torch.inference_mode():
            for page in tensors[lo:hi]:
                buf[: page.shape[0]].copy_(page)

    return _on_workers(len(pages), share)


def colpali_fp16(
    query_t: torch.Tensor, pages16: list[torch.Tensor], threads: int | None = None
) -> Callable[[], object]:
    """colpali-engine's scorer on float16-stored pages; `threads` limits torch's threads for the call."""
    scorer = BaseVisualRetrieverProcessor.score_multi_vector

    def run() -> object:
        if threads is None:
            return scorer([query_t], [p.float() for p in pages16], device="cpu")
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return scorer([query_t], [p.float() for p in pages16], device="cpu")
        finally:
            torch.set_num_threads(saved)

    return run


def section_kernel(rng: np.random.Generator, rounds: int, sizes: list[int], padded: bool) -> None:
    print("\n## 1. MaxSim, 20-token query, pages of 1030 x 128 stored as float16 (interleaved rounds)")
    print(f"CPU kernel threads: {maxsim_module.cpu_kernel_threads()} (torch default: {torch.get_num_threads()})")
    query = unit_rows(rng, QUERY_TOKENS)
    for n_pages in sizes:
        _kernel_case(rng, query, n_pages, rounds, padded)


def _kernel_case(rng: np.random.Generator, query: np.ndarray, n_pages: int, rounds: int, padded: bool) -> None:
    query_t = torch.from_numpy(query)
    scorer = BaseVisualRetrieverProcessor.score_multi_vector
    pages = [unit_rows(rng, PAGE_VECTORS).astype(np.float16) for _ in range(n_pages)]
    ids = [f"p{i}" for i in range(n_pages)]
    store = InMemoryMultiVectorStore()
    store.write(dict(zip(ids, pages, strict=True)))
    pages16 = [torch.from_numpy(p) for p in pages]
    pages32 = [torch.from_numpy(p.astype(np.float32)) for p in pages]
    methods: dict[str, Callable[[], object]] = {
        "ours: kernel": lambda: maxsim(query, pages),
        "ours: InMemoryMultiVectorStore.score (fetch + kernel)": lambda: store.score(query, ids),
        "colpali-engine score_multi_vector, float16 stored (+ conversion)": colpali_fp16(query_t, pages16),
        "colpali-engine, float16 stored, torch limited to 1 thread": colpali_fp16(query_t, pages16, threads=1),
        "colpali-engine score_multi_vector, float32 tensors given": lambda: scorer([query_t], pages32, device="cpu"),
        "compute floor (matmuls on one cache-hot float32 page per worker)": compute_floor(query, pages),
        "conversion floor (float16 -> float32 into a reused buffer, no matmul)": conversion_floor(pages),
    }
    if padded:
        methods["ours: padded device kernel, run on the CPU"] = lambda: maxsim_padded(query, pages, device="cpu")
    cpu: dict[str, float] = {}
    med = interleaved(methods, rounds if n_pages <= 100 else max(3, rounds // 5), cpu=cpu)
    base = med["ours: kernel"]
    print(f"{n_pages:5d} pages | {'method':70s} {'wall':>9s}     {'vs ours':>8s} | {'CPU time':>9s}")
    for name, ms in med.items():
        print(f"{n_pages:5d} pages | {name:70s} {ms:9.2f} ms  {ms / base:6.2f}x | {cpu[name]:9.2f} ms")
    ours_s = maxsim(query, pages)
    ref = scorer([query_t], pages32, device="cpu")[0].numpy()
    rel = float(np.max(np.abs(ours_s - ref) / np.abs(ref)))
    print(f"{n_pages:5d} pages | max relative difference ours vs colpali: {rel:.2e}")
    store.clear()
    if n_pages == 100:
        pooled = pool_multivectors([structured_page(rng).astype(np.float32) for _ in range(n_pages)], 3)
        pooled16 = [p.astype(np.float16) for p in pooled]
        med = interleaved({"pooled": lambda: maxsim(query, pooled16)}, rounds)
        mean_n = statistics.mean(p.shape[0] for p in pooled)
        print(f"{n_pages:5d} pages | ours, pool_factor 3 (~{mean_n:.0f} vectors/page): {med['pooled']:9.2f} ms")


def section_under_load(rng: np.random.Generator, rounds: int) -> None:
    print("\n## 2. 100-page MaxSim while another thread of the process runs torch and numpy work")
    query = unit_rows(rng, QUERY_TOKENS)
    query_t = torch.from_numpy(query)
    pages = [unit_rows(rng, PAGE_VECTORS).astype(np.float16) for _ in range(100)]
    pages16 = [torch.from_numpy(p) for p in pages]
    methods = {"ours": lambda: maxsim(query, pages), "colpali-engine (float16 stored)": colpali_fp16(query_t, pages16)}
    quiet_cpu: dict[str, float] = {}
    loaded_cpu: dict[str, float] = {}
    quiet = interleaved(methods, rounds, cpu=quiet_cpu)
    stop = threading.Event()

    def busy() -> None:
        a = torch.randn(512, 512)
        b = np.random.default_rng(0).standard_normal((400, 400))
        while not stop.is_set():
            torch.mm(a, a)
            b @ b

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        loaded = interleaved(methods, rounds, cpu=loaded_cpu)
    finally:
        stop.set()
        worker.join()
    for name in methods:
        print(
            f"{name:32s} quiet {quiet[name]:8.2f} ms | under load {loaded[name]:8.2f} ms "
            f"({loaded[name] / quiet[name]:.2f}x its quiet median)"
            f" | CPU time quiet {quiet_cpu[name]:8.2f} ms"
        )


def section_bytes(rng: np.random.Generator) -> None:
    print("\n## 4. Stored bytes per page (1030 x 128 page, float16)")
    page = structured_page(rng).astype(np.float32)
    for factor in (None, 2, 3):
        kept = page if factor is None else pool_multivectors([page], factor)[0]
        label = "no pooling" if factor is None else f"pool_factor {factor}"
        print(f"{label:>13}: {kept.shape[0]:5d} vectors, {kept.shape[0] * DIM * 2:8d} bytes")


def section_ranker(tmp: Path, rounds: int, n_candidates: int) -> None:
    print(f"\n## 3. ColPaliRanker.run, {n_candidates} candidates, tiny random ColQwen2 (CPU)")
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
    query = "quarterly revenue chart"
    embedding = ColPaliTextEmbedder(model).run(text=query)["multivector_embedding"]
    stored = ColPaliRanker(model, multivector_store=store)
    on_the_fly = ColPaliRanker(model, multivector_store=None, cache_size=0, batch_size=8)
    med = interleaved(
        {
            "stored vectors, query encoded": lambda: stored.run(query=query, documents=docs),
            "stored vectors, query_multivector_embedding given": lambda: stored.run(
                documents=docs, query_multivector_embedding=embedding
            ),
        },
        rounds,
    )
    fly = interleaved({"fly": lambda: on_the_fly.run(query=query, documents=docs)}, max(3, rounds // 4))["fly"]
    for name, ms in med.items():
        print(f"{name:52s} {ms:9.1f} ms")
    print(f"{'encode every page at query time':52s} {fly:9.1f} ms ({fly / med['stored vectors, query encoded']:.0f}x)")
    print(
        f"(pages: {statistics.mean(a.shape[0] for a in store.get([d.id for d in docs]).values()):.0f} vectors "
        "each with this tiny model; the real ColQwen2.5 makes up to 768 image tokens plus the prompt's, ColPali "
        "v1 1030, and its vision tower is ~1000x larger)"
    )


def section_host_cache(tmp: Path, rounds: int, sizes: list[int]) -> None:
    print(
        "\n## 6. ColPaliRanker on a CPU with SQLite: host page cache off (the default) vs host_cache_mb=1024, stored "
        "pages of 768 x 128 float16, the query given as a 20-token embedding (fetch + MaxSim only)"
    )
    rng = np.random.default_rng(3)
    n_pages = max(sizes) * 4
    pages = {f"p{i:05d}": rng.standard_normal((768, 128)).astype(np.float16) for i in range(n_pages)}
    ids = list(pages)
    query = rng.standard_normal((20, 128)).astype(np.float32).tolist()
    store = SQLiteMultiVectorStore(str(tmp / "host.sqlite"))
    for start in range(0, n_pages, 100):
        store.write({i: pages[i] for i in ids[start : start + 100]})
    for n in sizes:
        docs = [Document(id=i, meta={"modality": "page"}, score=0.5) for i in ids[:n]]
        off = ColPaliRanker("unused", multivector_store=store)
        warm = ColPaliRanker("unused", multivector_store=store, host_cache_mb=1024)
        warm.run(documents=docs, query_multivector_embedding=query)
        med = interleaved(
            {
                "off": lambda d=docs, r=off: r.run(documents=d, query_multivector_embedding=query),
                "warm": lambda d=docs, r=warm: r.run(documents=d, query_multivector_embedding=query),
            },
            rounds,
        )
        # Cold: every query meets pages the cache has not seen (a fresh ranker per round, candidates moving on).
        cold: dict[str, list[float]] = {"off": [], "filling": []}
        for k in range(rounds):
            window = [Document(id=i, meta={"modality": "page"}, score=0.5) for i in ids[(k * n) % n_pages :][:n]]
            for name, ranker in (
                ("off", off),
                ("filling", ColPaliRanker("unused", multivector_store=store, host_cache_mb=1024)),
            ):
                start = time.perf_counter()
                ranker.run(documents=window, query_multivector_embedding=query)
                cold[name].append((time.perf_counter() - start) * 1000)
        print(
            f"{n:5d} candidates | same pages again: off {med['off']:7.1f} ms, warm {med['warm']:7.1f} ms "
            f"({med['off'] / med['warm']:.2f}x) | new pages: off {statistics.median(cold['off']):7.1f} ms, "
            f"cache filling {statistics.median(cold['filling']):7.1f} ms"
        )


def _fill(store: object, n_pages: int, seed: int = 2) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = [f"page-{i:05d}" for i in range(n_pages)]
    batch = 50
    for start in range(0, n_pages, batch):
        store.write({doc_id: unit_rows(rng, PAGE_VECTORS).astype(np.float16) for doc_id in ids[start : start + batch]})
    return ids


def _select_data(path: str, ids: list[str]) -> list[bytes]:
    """The previous fetch: `SELECT data` (SQLite's row buffer, then Python bytes: two copies)."""
    conn = _select_data.__dict__.setdefault(path, sqlite3.connect(path, check_same_thread=False))
    conn.execute("PRAGMA mmap_size=1073741824")
    return [conn.execute("SELECT data FROM mv_vectors WHERE id = ?", (i,)).fetchone()[0] for i in ids]


def store_child(kind: str, location: str, n_pages: int, queries: int) -> None:
    """Runs in a fresh process: open a store, time the first query (cold), then warm ones."""
    rng = np.random.default_rng(3)
    ids = [f"page-{i:05d}" for i in range(n_pages)]
    query = unit_rows(rng, QUERY_TOKENS)
    result: dict[str, float] = {}
    start = time.perf_counter()
    store = SQLiteMultiVectorStore(location) if kind == "sqlite" else QdrantMultiVectorStore(path=location)
    pick = list(rng.choice(ids, 100, replace=False))
    if kind == "sqlite":
        store.score(query, pick)
    else:
        maxsim(query, list(store.get(pick).values()))
    result["cold_open_fetch_score_ms"] = (time.perf_counter() - start) * 1000
    fetch, total, server = [], [], []
    for _ in range(queries):
        pick = list(rng.choice(ids, 100, replace=False))
        t0 = time.perf_counter()
        vectors = store.get(pick)
        t1 = time.perf_counter()
        maxsim(query, list(vectors.values()))
        fetch.append(t1 - t0)
        total.append(time.perf_counter() - t0)
        if kind == "qdrant":
            t0 = time.perf_counter()
            store.score(query, pick)
            server.append(time.perf_counter() - t0)
    result["warm_fetch_ms"] = statistics.median(fetch) * 1000
    result["warm_fetch_score_ms"] = statistics.median(total) * 1000
    if server:
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


def _stores_case(
    rng: np.random.Generator,
    query: np.ndarray,
    ids: list[str],
    memory: InMemoryMultiVectorStore,
    sqlite: SQLiteMultiVectorStore,
    n_candidates: int,
    rounds: int,
) -> None:
    picks = [list(rng.choice(ids, n_candidates, replace=False)) for _ in range(rounds + 2)]
    blobs = {doc_id: sqlite.get([doc_id])[doc_id].tobytes() for pick in picks for doc_id in pick}

    def cycle() -> Callable[[], list[str]]:
        state = itertools.cycle(picks)
        return lambda: next(state)

    def memcpy(pick: list[str]) -> None:
        for doc_id in pick:
            bytearray(blobs[doc_id])

    pick_m, pick_s, pick_g, pick_d, pick_c = cycle(), cycle(), cycle(), cycle(), cycle()
    med = interleaved(
        {
            "InMemoryMultiVectorStore.score": lambda: memory.score(query, pick_m()),
            "SQLiteMultiVectorStore.score": lambda: sqlite.score(query, pick_s()),
            "SQLite get (blob I/O, one copy)": lambda: sqlite.get(pick_g()),
            "SQLite SELECT data (two copies; the previous fetch)": lambda: _select_data(sqlite.path, pick_d()),
            "plain memory copy of the same bytes": lambda: memcpy(pick_c()),
        },
        rounds,
    )
    for name, ms in med.items():
        print(f"{n_candidates:5d} candidates | {name:52s} {ms:9.2f} ms")
    ratio = med["SQLiteMultiVectorStore.score"] / med["InMemoryMultiVectorStore.score"]
    print(f"{n_candidates:5d} candidates | SQLite score / in-memory score: {ratio:.2f}x")


def section_stores(tmp: Path, n_pages: int, qdrant_pages: int, rounds: int, with_qdrant: bool) -> None:
    print(f"\n## 5. Stores: score of random pages (1030 x 128 float16) out of {n_pages} stored (interleaved)")
    rng = np.random.default_rng(4)
    query = unit_rows(rng, QUERY_TOKENS)
    memory = InMemoryMultiVectorStore()
    ids = _fill(memory, n_pages)
    sqlite_path = str(tmp / "mv.sqlite")
    start = time.perf_counter()
    sqlite = SQLiteMultiVectorStore(sqlite_path)
    _fill(sqlite, n_pages)
    print(f"writing {n_pages} pages to SQLite took {time.perf_counter() - start:.1f} s")
    for n_candidates in (100, min(1000, n_pages)):
        _stores_case(rng, query, ids, memory, sqlite, n_candidates, rounds)
    sqlite.close()
    memory.clear()
    r = _run_child("sqlite", sqlite_path, n_pages, rounds)
    print(
        f"SQLite, fresh process, 100 candidates: warm fetch {r['warm_fetch_ms']:8.2f} ms, fetch + MaxSim "
        f"{r['warm_fetch_score_ms']:8.2f} ms; cold (open + first query) {r['cold_open_fetch_score_ms']:8.2f} ms"
    )
    if not with_qdrant:
        return
    qdrant_path = str(tmp / "qdrant")
    start = time.perf_counter()
    qdrant = QdrantMultiVectorStore(path=qdrant_path)
    _fill(qdrant, qdrant_pages)
    qdrant.close()
    write_s = time.perf_counter() - start
    r = _run_child("qdrant", qdrant_path, qdrant_pages, max(3, rounds // 4))
    print(
        f"Qdrant-local N={qdrant_pages}: warm fetch {r['warm_fetch_ms']:8.2f} ms, fetch + MaxSim "
        f"{r['warm_fetch_score_ms']:8.2f} ms, MaxSim inside Qdrant {r['warm_in_qdrant_maxsim_ms']:8.2f} ms; "
        f"cold (open + first query) {r['cold_open_fetch_score_ms']:8.2f} ms; writing took {write_s:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pages", type=int, default=2000, help="stored pages for section 5")
    parser.add_argument("--qdrant-pages", type=int, default=1000, help="stored pages for embedded Qdrant")
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="which sections to run")
    parser.add_argument("--qdrant", action="store_true", help="include embedded Qdrant in section 5 (slow)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--sizes", type=int, nargs="+", help="page counts for section 1 (default 100 1000)")
    parser.add_argument("--padded", action="store_true", help="also time the padded device kernel on the CPU")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--store-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.store_child:
        kind, location, n_pages, queries = args.store_child
        store_child(kind, location, int(n_pages), int(queries))
        return
    sizes = [100, 1000]
    if args.quick:
        args.rounds, args.pages, args.qdrant_pages, args.candidates, sizes = 5, 300, 200, 20, [100]

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    rng = np.random.default_rng(0)
    if 1 in args.sections:
        section_kernel(rng, args.rounds, args.sizes or sizes, args.padded)
    if 2 in args.sections:
        section_under_load(rng, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        if 3 in args.sections:
            section_ranker(Path(tmp), args.rounds, args.candidates)
        if 4 in args.sections:
            section_bytes(rng)
        if 5 in args.sections:
            section_stores(Path(tmp), args.pages, args.qdrant_pages, args.rounds, args.qdrant)
        if 6 in args.sections:
            section_host_cache(Path(tmp), args.rounds, args.sizes or sizes)


if __name__ == "__main__":
    main()
