"""Cost of VisionLanguageRanker per query: forward passes and wall time, batched vs one candidate at a time.

Tiny random Qwen2-VL built locally (no download), CPU. Candidates are 3/4 images (generated PNGs) and 1/4
text. For 8, 32 and 80 candidates (`max_candidates` = the candidate count), the script times `run()` with
`batch_size=8` and `batch_size=1`, counts the model's forward calls and the candidates they scored, and prints
medians over `--repeats` queries. A GPU figure with a Qwen2-VL-2B-shaped model needs a GPU (none here).

    python benchmarks/vlm_rerank_cost.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from haystack import Document
from PIL import Image

from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from haystack_integrations.testing.multimodal_rag.tiny_models import build_tiny_qwen2_vl


def make_candidates(folder: Path, n: int) -> list[Document]:
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n):
        if i % 4 == 3:
            docs.append(Document(content=f"text candidate {i} about quarterly revenue", score=float(rng.random())))
            continue
        path = folder / f"c{i}.png"
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(path)
        docs.append(Document(meta={"file_path": str(path)}, score=float(rng.random())))
    return docs


def measure(model: str, docs: list[Document], batch_size: int, repeats: int) -> tuple[float, int, int]:
    ranker = VisionLanguageRanker(model, max_candidates=len(docs), batch_size=batch_size, top_k=10)
    ranker.warm_up()
    calls: list[int] = []
    inner = ranker._vlm.model  # benchmark instrumentation
    real_forward = inner.forward

    def counting(*args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return real_forward(*args, **kwargs)

    inner.forward = counting
    ranker.run(query="warm-up", documents=docs[:2])
    times = []
    for r in range(repeats):
        calls.clear()
        start = time.perf_counter()
        ranker.run(query=f"which picture shows revenue {r}", documents=docs)
        times.append(time.perf_counter() - start)
    inner.forward = real_forward
    return statistics.median(times) * 1000, len(calls), sum(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_qwen2_vl(Path(tmp) / "vlm", kind="vlm", version="2"))
        print("tiny random Qwen2-VL, CPU; median over", args.repeats, "queries")
        print(f"{'candidates':>10} {'mode':>14} {'forward calls':>13} {'judged':>7} {'ms/query':>9} {'ms/cand.':>9}")
        for n in (8, 32, 80):
            docs = make_candidates(Path(tmp), n)
            results = {}
            for label, batch in (("batch_size=8", 8), ("one at a time", 1)):
                ms, calls, judged = measure(model, docs, batch, args.repeats)
                results[label] = ms
                print(f"{n:10d} {label:>14} {calls:13d} {judged:7d} {ms:9.1f} {ms / n:9.2f}")
            print(f"{'':10} {'speed-up':>14} {results['one at a time'] / results['batch_size=8']:>31.2f}x")


if __name__ == "__main__":
    main()
