"""GPU throughput of the package's components on full-size-SHAPED random-weight models (no download).

Prints the GPU rows of the performance issue as a table of medians, with the device name:

- `ColPaliRanker.run` (query encode + MaxSim) over 100 and 1000 stored candidates (768 x 128 fp16 each),
  ColQwen2.5-3B-shaped, with the device page cache off and warm;
- ColQwen2.5-3B-shaped query encoding alone;
- `ColPaliDocumentEmbedder` pages/s on 1024 x 1365 pages at 768 visual tokens (also with `pool_factor=3`), and
  hierarchical pooling alone as a share of the page-encoding time;
- `VisionLanguageRanker` seconds for 80 image candidates (768 x 512), Qwen2-VL-2B-shaped;
- `MultimodalDocumentEmbedder` images/s on 640 x 480 JPEGs, SigLIP-so400m-shaped.

    python benchmarks/gpu_throughput.py                 # on a GPU machine (builds ~15 GB of checkpoints once)
    python benchmarks/gpu_throughput.py --scale smoke --device cpu   # checks the code path on a CPU

Checkpoints are built once into `--workdir` and reused. `--scale smoke` keeps every width but one layer per
tower: its numbers are NOT the GPU figures, only proof that the path runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from haystack import Document
from haystack.utils import ComponentDevice
from PIL import Image, ImageDraw

from haystack_integrations.common.multimodal_rag.numerics.pooling import pool_tensors
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder
from haystack_integrations.components.embedders.multimodal import MultimodalDocumentEmbedder
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore
from haystack_integrations.testing.multimodal_rag.full_size import (
    build_colqwen25_3b_shaped,
    build_qwen2_vl_2b_shaped,
    build_siglip_so400m_shaped,
)

QUERY = "Which quarter had the highest revenue in the EMEA region according to the bar chart?"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], object], *, device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _rate(fn: Callable[[], object], items: int, *, device: str, runs: int) -> float:
    """Median items per second over `runs` calls of `fn` (each processes `items` items)."""
    rates = []
    for _ in range(runs):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        rates.append(items / (time.perf_counter() - started))
    return statistics.median(rates)


def _page(path: Path, size: tuple[int, int], seed: int, fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = int(rng.integers(0, size[0] - 60)), int(rng.integers(0, size[1] - 20))
        draw.rectangle(
            [x, y, x + int(rng.integers(20, 60)), y + 12], fill=tuple(int(c) for c in rng.integers(0, 200, 3))
        )
    image.save(path, format=fmt)
    return path


def _profile(folder: str | None, name: str, fn: Callable[[], object], device: str) -> None:
    """Write torch.profiler's busiest operators (host and device time) of one call of `fn` to `folder/name.txt`."""
    if not folder:
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    _sync(device)
    started = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        _sync(device)
    wall = time.perf_counter() - started
    averages = prof.key_averages()
    lines = [f"{name}: {wall * 1000:.0f} ms wall under the profiler"]
    for key in ("self_cpu_time_total", "self_device_time_total" if device.startswith("cuda") else None):
        if key:
            table = averages.table(sort_by=key, row_limit=35, max_name_column_width=70)
            lines.append(f"\n## sorted by {key}\n{table}")
    if device.startswith("cuda"):
        by_shape = prof.key_averages(group_by_input_shape=True)
        table = by_shape.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=50)
        lines.append(f"\n## by operator and input shapes, sorted by self_device_time_total\n{table}")
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{name}.txt").write_text("\n".join(lines))


class _Rows(list[tuple[str, str]]):
    """The table's rows; each is also printed as soon as it is measured (a run cut short keeps its rows)."""

    def append(self, row: tuple[str, str]) -> None:
        print(f"row: {row[0]} -> {row[1]}", flush=True)
        super().append(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=("full", "smoke"), default="full")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mmrag-gpu-bench"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="runs per throughput row (median reported)")
    parser.add_argument("--only", nargs="*", choices=("ranker", "query", "pages", "vlm", "dense"))
    parser.add_argument("--profile", help="also write a torch.profiler table of one run per row into this folder")
    parser.add_argument(
        "--vlm-batch-sizes",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also time the VisionLanguageRanker row at these batch sizes (e.g. 4 8 16), one extra row each; "
        "the main row uses the ranker's default (batch_size=None: 16 on CUDA, 4 elsewhere)",
    )
    args = parser.parse_args()
    only = set(args.only or ("ranker", "query", "pages", "vlm", "dense"))
    device, work = args.device, Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    data.mkdir(exist_ok=True)
    component_device = ComponentDevice.from_str(device)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    rows = _Rows()
    build_device = device if device.startswith("cuda") else "cpu"

    if only & {"ranker", "query", "pages"}:
        colqwen = str(
            build_colqwen25_3b_shaped(work / f"colqwen25-{args.scale}", scale=args.scale, device=build_device)
        )
        if "pages" in only:
            paths = [_page(data / f"page{i}.png", (1024, 1365), i) for i in range(args.pages)]
            docs = [Document(id=f"p{i}", meta={"file_path": str(p)}) for i, p in enumerate(paths)]
            # Defaults (batch_size=4; on CUDA one variable-length attention call per vision layer), a larger batch,
            # then transformers' own SDPA path (one call per 112 px window) for comparison, in the same run.
            default_rate = 0.0
            for label, extra in (
                ("", {}),
                (" [batch_size=16]", {"batch_size": 16}),
                (" [pool_factor=3]", {"pool_factor": 3}),
                (" [per-window SDPA: attn_implementation='sdpa']", {"model_kwargs": {"attn_implementation": "sdpa"}}),
            ):
                embedder = ColPaliDocumentEmbedder(
                    colqwen,
                    multivector_store=InMemoryMultiVectorStore(),
                    device=component_device,
                    progress_bar=False,
                    **extra,
                )
                embedder.warm_up()
                embedder.run(docs[:4])
                rate = _rate(lambda e=embedder: e.run(docs), len(docs), device=device, runs=args.runs)
                if not label:
                    default_rate = rate
                    _profile(args.profile, "pages", lambda e=embedder: e.run(docs[:16]), device)
                count = embedder.run(docs[:1])["documents"][0].meta["multivector_count"]
                rows.append(
                    (
                        f"ColPaliDocumentEmbedder, 1024x1365 pages, 768 visual tokens{label}",
                        f"{rate:.1f} pages/s ({count} vectors/page)",
                    )
                )
                del embedder
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            # Pooling alone, on the device, 16 pages of 768 topic-clustered unit vectors per call (as one batch).
            generator = torch.Generator().manual_seed(0)
            centres = torch.nn.functional.normalize(torch.randn(24, 128, generator=generator), dim=-1)
            pool_pages = [
                torch.nn.functional.normalize(
                    centres[torch.randint(0, 24, (768,), generator=generator)]
                    + 0.3 * torch.randn(768, 128, generator=generator),
                    dim=-1,
                ).to(device=device, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
                for _ in range(16)
            ]
            pool_ms = _median_ms(lambda: pool_tensors(pool_pages, 3), device=device, repeats=args.repeats) / 16
            _profile(args.profile, "pooling", lambda: pool_tensors(pool_pages, 3), device)
            rows.append(
                (
                    "hierarchical pooling alone (pool_factor=3), 16 pages of 768x128 per call",
                    f"{pool_ms:.2f} ms/page ({pool_ms * default_rate / 10:.1f}% of the default row's encode time)",
                )
            )
        if only & {"ranker", "query"}:
            ranker_store = InMemoryMultiVectorStore()
            rng = np.random.default_rng(0)
            ids = [f"c{i}" for i in range(1000)]
            ranker_store.write({i: rng.standard_normal((768, 128)).astype(np.float16) for i in ids})
            ranker = ColPaliRanker(colqwen, multivector_store=ranker_store, device=component_device, top_k=10)
            ranker.warm_up()
            if "query" in only:
                from haystack_integrations.components.embedders.colpali import ColPaliTextEmbedder

                for label, graphs in (("", True), (" [cuda_graphs=False]", False)):
                    text_embedder = ColPaliTextEmbedder(colqwen, device=component_device, cuda_graphs=graphs)
                    text_embedder.warm_up()
                    ms = _median_ms(lambda e=text_embedder: e.run(QUERY), device=device, repeats=args.repeats)
                    rows.append((f"ColQwen2.5-3B-shaped query encoding{label}", f"{ms:.1f} ms p50"))
            if "ranker" in only:
                # Without the device cache every query fetches and uploads its candidates; with it (the default)
                # the repeated candidates of this loop are all on the GPU after the first query: the two ends.
                uncached = ColPaliRanker(
                    colqwen, multivector_store=ranker_store, device=component_device, top_k=10, device_cache_mb=0
                )
                uncached.warm_up()
                for n in (100, 1000):
                    candidates = [Document(id=i, meta={"modality": "page"}, score=0.5) for i in ids[:n]]
                    for tag, which in (("device cache off", uncached), ("device cache warm", ranker)):
                        ms = _median_ms(
                            lambda c=candidates, r=which: r.run(query=QUERY, documents=c),
                            device=device,
                            repeats=args.repeats,
                        )
                        _profile(
                            args.profile,
                            f"ranker{n}-{'cached' if which is ranker else 'uncached'}",
                            lambda c=candidates, r=which: r.run(query=QUERY, documents=c),
                            device,
                        )
                        rows.append(
                            (
                                f"ColPaliRanker.run, query encode + MaxSim, {n} stored candidates (768x128 fp16), "
                                f"{tag}",
                                f"{ms:.1f} ms p50",
                            )
                        )

    if "vlm" in only:
        qwen2 = str(build_qwen2_vl_2b_shaped(work / f"qwen2vl2b-{args.scale}", scale=args.scale, device=build_device))
        paths = [_page(data / f"cand{i}.png", (768, 512), 100 + i) for i in range(80)]
        candidates = [
            Document(id=f"v{i}", meta={"file_path": str(p)}, score=1.0 - i / 100) for i, p in enumerate(paths)
        ]
        # MonoQwen2-VL-v0.1 is a LoRA on Qwen2-VL-2B-Instruct: same architecture, same cost per candidate. The
        # random base's small tokenizer has no single-token "True", so the zero-shot recipe drives it.
        label = "VisionLanguageRanker, 80 image candidates (768x512), Qwen2-VL-2B-shaped"
        for batch_size in [None, *args.vlm_batch_sizes]:
            vlm_ranker = VisionLanguageRanker(
                qwen2,
                recipe="zero_shot_yes_no",
                device=component_device,
                max_candidates=80,
                top_k=10,
                **({} if batch_size is None else {"batch_size": batch_size}),  # None: the ranker's own default
            )
            vlm_ranker.warm_up()
            ms = _median_ms(
                lambda r=vlm_ranker: r.run(query=QUERY, documents=candidates),
                device=device,
                repeats=max(3, args.repeats // 3),
                warmup=1,
            )
            suffix = "" if batch_size is None else f"-bs{batch_size}"
            _profile(
                args.profile, f"vlm{suffix}", lambda r=vlm_ranker: r.run(query=QUERY, documents=candidates), device
            )
            rows.append(
                (label + ("" if batch_size is None else f", batch_size={batch_size}"), f"{ms / 1000:.2f} s p50")
            )

    if "dense" in only:
        siglip = str(
            build_siglip_so400m_shaped(work / f"siglip-so400m-{args.scale}", scale=args.scale, device=build_device)
        )
        paths = [_page(data / f"photo{i}.jpg", (640, 480), 1000 + i, fmt="JPEG") for i in range(args.images)]
        docs = [Document(id=f"i{i}", meta={"file_path": str(p)}) for i, p in enumerate(paths)]
        dense = MultimodalDocumentEmbedder(siglip, device=component_device, batch_size=64, progress_bar=False)
        dense.warm_up()
        dense.run(docs[:64])
        rate = _rate(lambda: dense.run(docs), len(docs), device=device, runs=args.runs)
        _profile(args.profile, "dense", lambda: dense.run(docs[:128]), device)
        rows.append(("MultimodalDocumentEmbedder, SigLIP-so400m-shaped, 640x480 JPEGs", f"{rate:.0f} images/s"))

    print(f"device: {name} ({device}); scale: {args.scale}; torch {torch.__version__}")
    if args.scale == "smoke":
        print("SMOKE SCALE: one layer per tower. These are not the figures of the full-size models.")
    print("| what | result |\n|---|---|")
    for what, result in rows:
        print(f"| {what} | {result} |")


if __name__ == "__main__":
    main()
