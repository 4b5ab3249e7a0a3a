"""Filtered recall@10 of a post-filtering HNSW index, without and with `FilterAwareRetriever`.

A real HNSW library (hnswlib) indexes 50k random unit vectors; each carries a `bucket` in [0, 100). The
benchmark's retriever does what post-filtering indexes do: graph search for `top_k` neighbours, then drops
those that fail the filter. Filters `bucket < 50 / 10 / 1` keep 50%, 10%, 1% of the corpus. Recall@10 is
measured against the exact filtered top 10 (brute force). Selectivity is counted by a real Haystack
`InMemoryDocumentStore` holding the same metadata (`count_documents_by_filter`).

    pip install hnswlib   # benchmark-only dependency (the `bench` extra)
    python benchmarks/filter_oversampling.py [--n 50000] [--queries 200]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import hnswlib
import numpy as np
from haystack import Document, component
from haystack.document_stores.in_memory import InMemoryDocumentStore

from haystack_integrations.components.retrievers.oversampling import FilterAwareRetriever


@component
class PostFilteringHnswRetriever:
    """Graph search for `top_k`, then the metadata filter: how HNSW post-filtering behaves."""

    def __init__(self, index: hnswlib.Index, buckets: np.ndarray, document_store: InMemoryDocumentStore) -> None:
        self.index = index
        self.buckets = buckets
        self.document_store = document_store

    @component.output_types(documents=list[Document])
    def run(self, query_embedding: list[float], filters: dict[str, Any] | None = None, top_k: int = 10) -> dict:
        self.index.set_ef(max(top_k, 64))
        labels, distances = self.index.knn_query(np.asarray(query_embedding, dtype=np.float32), k=top_k)
        limit = filters["value"] if filters else None
        docs = [
            Document(id=str(int(i)), score=1.0 - float(d))
            for i, d in zip(labels[0], distances[0], strict=True)
            if limit is None or self.buckets[i] < limit
        ]
        return {"documents": docs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    vectors = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    buckets = rng.integers(0, 100, size=args.n)
    started = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=args.dim)
    index.init_index(max_elements=args.n, M=16, ef_construction=100, random_seed=args.seed)
    index.add_items(vectors, np.arange(args.n))
    build_s = time.perf_counter() - started
    store = InMemoryDocumentStore()
    store.write_documents([Document(id=str(i), meta={"bucket": int(b)}) for i, b in enumerate(buckets)])
    plain = PostFilteringHnswRetriever(index, buckets, store)
    boosted = FilterAwareRetriever(plain, top_k=10, max_top_k=2000)
    queries = rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    print(
        f"{platform.processor() or platform.machine()}; n={args.n}, dim={args.dim}, {args.queries} queries, "
        f"hnswlib M=16 ef_construction=100 (built in {build_s:.1f} s), ef=max(top_k, 64)"
    )
    ceiling = []
    for q in queries:
        exact = set(np.argsort(-(vectors @ q), kind="stable")[:10].tolist())
        got = plain.run(query_embedding=q.tolist(), filters=None, top_k=10)["documents"]
        ceiling.append(len(exact & {int(d.id) for d in got}) / 10)
    print(f"unfiltered recall@10 of the index itself (the ceiling at this ef): {np.mean(ceiling):.3f}")
    print(
        "| selectivity | recall@10 plain | recall@10 boosted | docs returned plain / boosted | boost | "
        "ms/query plain / boosted |"
    )
    print("|---|---|---|---|---|---|")
    for limit in (50, 10, 1):
        flt = {"field": "meta.bucket", "operator": "<", "value": limit}
        allowed = np.flatnonzero(buckets < limit)
        rec_plain, rec_boost, n_plain, n_boost, t_plain, t_boost = [], [], [], [], [], []
        boost = 0.0
        for q in queries:
            exact = set(allowed[np.argsort(-(vectors[allowed] @ q), kind="stable")[:10]].tolist())
            t0 = time.perf_counter()
            got_plain = plain.run(query_embedding=q.tolist(), filters=flt, top_k=10)["documents"]
            t1 = time.perf_counter()
            out = boosted.run(query_embedding=q.tolist(), filters=flt)
            t2 = time.perf_counter()
            boost = out["oversampling"]["boost"]
            rec_plain.append(len(exact & {int(d.id) for d in got_plain}) / 10)
            rec_boost.append(len(exact & {int(d.id) for d in out["documents"]}) / 10)
            n_plain.append(len(got_plain))
            n_boost.append(len(out["documents"]))
            t_plain.append((t1 - t0) * 1000)
            t_boost.append((t2 - t1) * 1000)
        print(
            f"| {len(allowed) / args.n:.1%} | {np.mean(rec_plain):.3f} | {np.mean(rec_boost):.3f} | "
            f"{np.mean(n_plain):.1f} / {np.mean(n_boost):.1f} | {boost:.1f}x | "
            f"{statistics.median(t_plain):.2f} / {statistics.median(t_boost):.2f} |"
        )


if __name__ == "__main__":
    main()
