"""Ranking quality of raw, per-query min-max and reference-ECDF fusion on a seeded synthetic corpus.

Every candidate's relevance is known. Scores follow different distributions per modality, as they do
with real dual encoders and late-interaction models:

- text dense cosine sits higher than image dense cosine (a modality gap) and has a different spread;
- images also carry a late-interaction (MaxSim) score on its own scale; text has none;
- some queries have a poor candidate set: no relevant image at all, so the best image there is mediocre.

Methods (all through the real `ModalityScoreCalibrator`, except "raw dense"):
- raw dense: sort by the retriever's cosine;
- min-max: per-query min-max per modality and score type, fused with alpha;
- ecdf: percentiles in reference distributions fitted (`fit()`) on separate training queries, fused with alpha.

Reported: NDCG@10 (binary gains) and relevant images among the top 10, means over test queries.

    python benchmarks/calibration_quality.py [--train 200 --test 500 --seed 0]
"""

from __future__ import annotations

import argparse
import math
import statistics

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


def ndcg_at_10(ranked: list[Document]) -> float:
    gains = [1.0 if d.meta["relevant"] else 0.0 for d in ranked]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]))
    ideal = sorted(gains, reverse=True)
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:10]))
    return dcg / idcg if idcg > 0 else 0.0


def relevant_images_at_10(ranked: list[Document]) -> int:
    return sum(1 for d in ranked[:10] if d.meta["relevant"] and d.meta["modality"] == "image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=0.65)
    parser.add_argument("--seed", type=int, default=0)
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
    print(
        f"{args.test} test queries x 100 candidates (60 text, 40 images), reference fitted on {args.train} "
        f"other queries; text dense scores shifted up by {GAP}; alpha={args.alpha}; seed={args.seed}"
    )
    print(f"{'method':34s} {'NDCG@10':>8s} {'relevant images in top 10':>27s} {'(queries with any)':>20s}")
    for name, rank in rankers.items():
        ndcgs, imgs, imgs_when_any = [], [], []
        for docs in test:
            ranked = rank(docs)
            ndcgs.append(ndcg_at_10(ranked))
            found = relevant_images_at_10(ranked)
            imgs.append(found)
            if any(d.meta["relevant"] and d.meta["modality"] == "image" for d in docs):
                imgs_when_any.append(found)
        print(
            f"{name:34s} {statistics.mean(ndcgs):8.4f} {statistics.mean(imgs):27.2f} "
            f"{statistics.mean(imgs_when_any):20.2f}"
        )


if __name__ == "__main__":
    main()
