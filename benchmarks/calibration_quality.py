"""Ranking quality of raw, per-query min-max and reference-ECDF fusion on a seeded synthetic corpus.

Every candidate's relevance is known. Scores follow different distributions per modality, as they do
with real dual encoders and late-interaction models:

- text dense cosine sits higher than image dense cosine (a modality gap) and has a different spread;
- images also carry a late-interaction (MaxSim) score on its own scale; text has none;
- some queries have a poor candidate set: no relevant image at all, so the best image there is mediocre.

Methods (all through the real `ModalityScoreCalibrator`, except "raw dense"):
- raw dense: sort by the retriever's cosine;
- min-max: per-query min-max per modality and score type, fused with alpha;
- ecdf: percentiles in reference distributions fitted (`fit()`) on separate training queries, fused with alpha;
  the calibrator sees all 100 candidates and makes the final cut (the shipped pipelines);
- ranker cut at 10, then ecdf: what `ColPaliRanker(top_k=10)` before the calibrator did: it sorts one list
  whose text candidates carry the retriever's cosine and whose images carry MaxSim / query tokens
  (`normalize_scores=True`, `--query-tokens` tokens), cuts 10 across those mixed scales, and the calibrator
  only re-orders the survivors.

Reported: NDCG@10 (binary gains) and relevant images among the top 10, means over test queries; then the
calibrator's per-call time on these 100-candidate lists (median).

    python benchmarks/calibration_quality.py [--train 200 --test 500 --seed 0]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
from haystack import Document

from haystack_integrations.components.rankers.modality_calibration import ModalityScoreCalibrator

GAP = 0.15  # text dense scores sit this much above image dense scores


def make_query(rng: np.random.Generator, q: int, *, n_text: int = 60, n_image: int = 40) -> list[Document]:
    poor_image_set = rng.random() < 0.3
    docs = []
    for i in range(n_text):
        relevant = rng.random() < 0.08
        dense = rng.normal(0.45 + GAP + (0.10 if relevant else 0.0), 0.07)
        docs.append(
            Document(
                id=f"q{q}-t{i}",
                content="text",
                meta={"modality": "text", "dense_score": float(dense), "relevant": bool(relevant)},
            )
        )
    for i in range(n_image):
        relevant = (not poor_image_set) and rng.random() < 0.12
        dense = rng.normal(0.45 + (0.06 if relevant else 0.0), 0.04)
        late = rng.normal(10.0 + (4.0 if relevant else 0.0), 1.5)
        docs.append(
            Document(
                id=f"q{q}-i{i}",
                meta={
                    "modality": "image",
                    "dense_score": float(dense),
                    "late_interaction_score": float(late),
                    "relevant": bool(relevant),
                },
            )
        )
    return docs


def ndcg_at_10(ranked: list[Document], candidates: list[Document]) -> float:
    """NDCG@10 of `ranked`, the ideal taken over all `candidates` (a list cut before the end is not its own ideal)."""
    gains = [1.0 if d.meta["relevant"] else 0.0 for d in ranked]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]))
    ideal = sorted((1.0 if d.meta["relevant"] else 0.0 for d in candidates), reverse=True)
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:10]))
    return dcg / idcg if idcg > 0 else 0.0


def relevant_images_at_10(ranked: list[Document]) -> int:
    return sum(1 for d in ranked[:10] if d.meta["relevant"] and d.meta["modality"] == "image")


def mixed_scale_score(doc: Document, query_tokens: int) -> float:
    """The score `ColPaliRanker` gives: MaxSim / query tokens for images, the retriever's cosine for text."""
    late = doc.meta.get("late_interaction_score")
    return doc.meta["dense_score"] if late is None else late / query_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=0.65)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--query-tokens",
        type=int,
        nargs="+",
        default=[10, 20, 30],
        help="query tokens MaxSim is divided by (one 'ranker cut' row each: the scale relation is arbitrary)",
    )
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    train = [make_query(rng, q) for q in range(args.train)]
    test = [make_query(rng, args.train + q) for q in range(args.test)]

    ecdf = ModalityScoreCalibrator(method="ecdf", alpha=args.alpha)
    ecdf.fit(train)
    minmax = ModalityScoreCalibrator(method="minmax", alpha=args.alpha)

    rankers = {
        "raw dense": lambda docs: sorted(docs, key=lambda d: -d.meta["dense_score"]),
        "per-query min-max fusion": lambda docs: minmax.run(documents=docs)["documents"],
        "ecdf fusion (fitted reference)": lambda docs: ecdf.run(documents=docs)["documents"],
    }
    for tokens in args.query_tokens:
        rankers[f"ranker cut at 10 ({tokens} q-tokens), then ecdf"] = lambda docs, tokens=tokens: ecdf.run(
            documents=sorted(docs, key=lambda d: -mixed_scale_score(d, tokens))[:10]
        )["documents"]
    print(
        f"{args.test} test queries x 100 candidates (60 text, 40 images), reference fitted on {args.train} "
        f"other queries; text dense scores shifted up by {GAP}; alpha={args.alpha}; seed={args.seed}"
    )
    print(f"{'method':42s} {'NDCG@10':>8s} {'relevant images in top 10':>27s} {'(queries with any)':>20s}")
    for name, rank in rankers.items():
        ndcgs, imgs, imgs_when_any = [], [], []
        for docs in test:
            ranked = rank(docs)
            ndcgs.append(ndcg_at_10(ranked, docs))
            found = relevant_images_at_10(ranked)
            imgs.append(found)
            if any(d.meta["relevant"] and d.meta["modality"] == "image" for d in docs):
                imgs_when_any.append(found)
        print(
            f"{name:42s} {statistics.mean(ndcgs):8.4f} {statistics.mean(imgs):27.2f} "
            f"{statistics.mean(imgs_when_any):20.2f}"
        )
    for top_k in (10, None):
        times = []
        for docs in test[:200]:
            start = time.perf_counter()
            ecdf.run(documents=docs, top_k=top_k)
            times.append(time.perf_counter() - start)
        median_us = statistics.median(times) * 1e6
        print(f"ModalityScoreCalibrator.run, 100 candidates, top_k={top_k}: {median_us:.0f} us median")


if __name__ == "__main__":
    main()
