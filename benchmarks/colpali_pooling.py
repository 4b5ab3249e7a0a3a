"""Hierarchical token pooling: our batched Ward pooling vs colpali-engine's `HierarchicalTokenPooler`.

All numbers are medians within one run, methods interleaved round by round; ratios compare methods measured in
the same run. CPU only here; `gpu_throughput.py` times the same function on a GPU (one code path for both).

1. Realistic shape: pages of 768 x 128 (ColQwen2.5 at its trained 768-token budget), random unit vectors and
   "structured" pages (vectors clustered around a few topics), pool_factor 3: time of the pooling alone, ours one
   page at a time and a batch of 4 pages, vs colpali-engine's pooler; and whether the clusters agree.
2. ColQwen2.5-3B widths with one layer per tower (`full_size.build_colqwen25_3b_shaped(scale="smoke")`): the
   page-encoding time vs the pooling time of the same pages (an upper bound on pooling's share for the real model).

    python benchmarks/colpali_pooling.py            # ~1-2 minutes on 2 cores
    python benchmarks/colpali_pooling.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.common.multimodal_rag.numerics.pooling import pool_tensors, ward_labels
from haystack_integrations.testing.multimodal_rag.full_size import build_colqwen25_3b_shaped


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _page(generator: torch.Generator, n: int, *, structured: bool) -> torch.Tensor:
    if not structured:
        return torch.nn.functional.normalize(torch.randn(n, 128, generator=generator), dim=-1)
    centres = torch.nn.functional.normalize(torch.randn(24, 128, generator=generator), dim=-1)
    rows = centres[torch.randint(0, 24, (n,), generator=generator)] + 0.3 * torch.randn(n, 128, generator=generator)
    return torch.nn.functional.normalize(rows, dim=-1)


def _partition(labels: list[int]) -> list[tuple[int, ...]]:
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return sorted(tuple(g) for g in groups.values())


def section_realistic(rounds: int) -> None:
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    pooler = HierarchicalTokenPooler()
    generator = torch.Generator().manual_seed(0)
    print("\n## 1. Pooling alone, pages of 768 x 128, pool_factor 3 (-> 256 vectors)")
    for structured in (False, True):
        pages = [_page(generator, 768, structured=structured) for _ in range(4)]
        same = 0
        for page, labels in zip(pages, ward_labels(pages, [256] * 4), strict=True):
            _, clusters = pooler._pool_single_embedding(page, 3)
            reference = sorted(tuple(ix[0].tolist()) for ix in clusters.values() if ix[0].numel())
            same += _partition(labels.tolist()) == reference
        times: dict[str, list[float]] = {"colpali-engine, per page": [], "ours, per page": [], "ours, batch of 4": []}
        batch = pages
        for _ in range(rounds):
            times["colpali-engine, per page"].append(_timed(lambda: pooler._pool_single_embedding(batch[0], 3)))  # noqa: B023
            times["ours, per page"].append(_timed(lambda: pool_tensors(batch[:1], 3)))  # noqa: B023
            times["ours, batch of 4"].append(_timed(lambda: pool_tensors(batch, 3)) / 4)  # noqa: B023
        base = statistics.median(times["colpali-engine, per page"])
        kind = "structured" if structured else "random"
        print(f"{kind} pages: identical clusters on {same}/4 pages")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:28s} {median * 1000:8.1f} ms/page   ({base / median:.2f}x colpali-engine)")


def section_page_model(rounds: int) -> None:
    print(
        "\n## 2. Page encoding vs pooling: ColQwen2.5-3B widths with ONE layer per tower (smoke scale), "
        "4 pages of 1024x1365 at 768 visual tokens per batch"
    )
    print("   (a real ColQwen2.5-3B has 36 + 32 layers, so its encoding is far slower and pooling's share far smaller)")
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_colqwen25_3b_shaped(Path(tmp) / "colqwen25-smoke", scale="smoke"))
        encoder = LateInteractionEncoder.get(
            LoadSpec(model=model, component="bench", device="cpu", token=None, local_files_only=True, model_kwargs=None)
        )
        generator = torch.Generator().manual_seed(1)
        images = [
            Image.fromarray((torch.rand(1365, 1024, 3, generator=generator) * 255).to(torch.uint8).numpy())
            for _ in range(4)
        ]
        vectors = [torch.from_numpy(v) for v in encoder.embed_images(images)]
        encode, pool = [], []
        for _ in range(rounds):
            encode.append(_timed(lambda: encoder.embed_images(images)))
            pool.append(_timed(lambda: pool_tensors(vectors, 3)))  # right after a forward pass, as when indexing
        e, p = statistics.median(encode), statistics.median(pool)
        print(f"  vectors per page: {vectors[0].shape[0]}")
        print(
            f"  encode 4 pages: {e * 1000:.0f} ms; pool them (factor 3): {p * 1000:.1f} ms "
            f"({100 * p / e:.1f}% of the one-layer model's encode time)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    section_realistic(rounds)
    section_page_model(rounds)


if __name__ == "__main__":
    main()
