"""Cost of VisionLanguageRanker per query: forward passes and wall time, batched vs one candidate at a time.

Tiny random Qwen2-VL-Instruct base plus a LoRA adapter laid out like `lightonai/MonoQwen2-VL-v0.1`, built
locally (no download), CPU, the default `"monoqwen"` recipe (or `--recipe`). Candidates are 3/4 images
(generated PNGs) and 1/4 text. For 8, 32 and 80 candidates (`max_candidates` = the candidate count), the script
times `run()` with `batch_size=8` and `batch_size=1` (interleaved round by round, so load drift hits both),
counts the model's forward calls and the candidates they scored, and prints medians over `--repeats` queries.
The scores of all batches reach the host in one copy per query; on a CPU that copy is free, so this script cannot
show the saving: a GPU figure with a Qwen2-VL-2B-shaped model needs a GPU (none here).

    python benchmarks/vlm_rerank_cost.py [--repeats 5] [--recipe monoqwen|qwen3_vl_reranker|zero_shot_yes_no]
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
import torch
from haystack import Document
from PIL import Image

from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from haystack_integrations.testing.multimodal_rag.tiny_vlm import (
    build_tiny_monoqwen_adapter,
    build_tiny_qwen2_vl_instruct,
)


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


def instrumented(model: str, recipe: str, n: int, batch_size: int) -> tuple[VisionLanguageRanker, list[int]]:
    ranker = VisionLanguageRanker(model, recipe=recipe, max_candidates=n, batch_size=batch_size)  # type: ignore[arg-type]
    ranker.warm_up()
    calls: list[int] = []
    inner = ranker._vlm.model  # benchmark instrumentation
    real_forward = inner.forward

    def counting(*args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return real_forward(*args, **kwargs)

    inner.forward = counting
    return ranker, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recipe", default="monoqwen", choices=["monoqwen", "qwen3_vl_reranker", "zero_shot_yes_no"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_qwen2_vl_instruct(Path(tmp) / "base")
        model = str(build_tiny_monoqwen_adapter(Path(tmp) / "monoqwen", base) if args.recipe == "monoqwen" else base)
        print(
            f"tiny random Qwen2-VL ({args.recipe} recipe), CPU, torch threads {torch.get_num_threads()}; "
            f"median over {args.repeats} queries"
        )
        print(f"{'candidates':>10} {'mode':>14} {'forward calls':>13} {'judged':>7} {'ms/query':>9} {'ms/cand.':>9}")
        for n in (8, 32, 80):
            docs = make_candidates(Path(tmp), n)
            modes = {"batch_size=8": 8, "one at a time": 1}
            rankers = {label: instrumented(model, args.recipe, n, batch) for label, batch in modes.items()}
            times: dict[str, list[float]] = {label: [] for label in modes}
            counts: dict[str, tuple[int, int]] = {}
            for ranker, _ in rankers.values():
                ranker.run(query="warm-up", documents=docs[:2])
            for r in range(args.repeats):
                for label, (ranker, calls) in rankers.items():
                    calls.clear()
                    start = time.perf_counter()
                    ranker.run(query=f"which picture shows revenue {r}", documents=docs)
                    times[label].append(time.perf_counter() - start)
                    counts[label] = (len(calls), sum(calls))
            medians = {label: statistics.median(t) * 1000 for label, t in times.items()}
            for label, ms in medians.items():
                calls_n, judged = counts[label]
                print(f"{n:10d} {label:>14} {calls_n:13d} {judged:7d} {ms:9.1f} {ms / n:9.2f}")
            print(f"{'':10} {'speed-up':>14} {medians['one at a time'] / medians['batch_size=8']:>31.2f}x")


if __name__ == "__main__":
    main()
