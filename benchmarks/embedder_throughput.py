"""Images/second of MultimodalDocumentEmbedder vs a naive per-image loop, and peak memory vs corpus size.

Model: a SigLIP-base-sized random-init dual encoder (default `SiglipConfig()` dimensions), built locally,
no download. Images: generated PNG files on disk. Both sides embed the same files in the same run; the
script prints medians over `--repeats` runs and the ratio. Peak RSS is measured in fresh subprocesses
for each corpus size, so the numbers are independent.

    python benchmarks/embedder_throughput.py               # 256 images, 3 repeats, RSS for 256 and 1024
    python benchmarks/embedder_throughput.py --quick       # 32 images, 1 repeat, RSS for 32 and 128
    python benchmarks/embedder_throughput.py --images 32 --repeats 3 --skip-naive --no-rss   # fp32 vs bf16 only

The CPU model and its bfloat16 flags are printed first: bfloat16 is only faster on CPUs that compute it natively
(AVX512-BF16 / AMX); elsewhere it is emulated and several times slower than float32.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from haystack import Document
from PIL import Image

from haystack_integrations.components.embedders.multimodal import MultimodalDocumentEmbedder
from haystack_integrations.testing.multimodal_rag.tiny_models import build_siglip_base_random


def make_images(folder: Path, count: int, size: tuple[int, int] = (320, 240)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:05d}.png"
        if not path.exists():
            # Smooth random gradients: realistic PNG sizes, unlike pure noise.
            base = rng.integers(0, 255, size=(3,), dtype=np.uint8)
            grad = np.linspace(0, 1, size[0], dtype=np.float32)[None, :, None]
            pixels = (base[None, None, :] * (0.5 + 0.5 * grad)).astype(np.uint8)
            pixels = np.repeat(pixels, size[1], axis=0)
            Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def run_ours(model_dir: str, paths: list[Path], batch_size: int, dtype: str | None = None) -> float:
    embedder = MultimodalDocumentEmbedder(
        model_dir, batch_size=batch_size, progress_bar=False, model_kwargs={"dtype": dtype} if dtype else None
    )
    embedder.warm_up()
    docs = [Document(meta={"file_path": str(p)}) for p in paths]
    start = time.perf_counter()
    out = embedder.run(docs)
    elapsed = time.perf_counter() - start
    assert len(out["documents"]) == len(paths)
    return elapsed


def run_naive(model_dir: str, paths: list[Path]) -> float:
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    start = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            with Image.open(path) as img:
                inputs = processor(images=[img.convert("RGB")], return_tensors="pt")
            out = model.get_image_features(**inputs)
            features = out.pooler_output if hasattr(out, "pooler_output") else out
            torch.nn.functional.normalize(features, dim=-1).numpy()
    return time.perf_counter() - start


def describe_cpu() -> str:
    """The CPU model and whether it computes bfloat16 natively: every figure is only valid for its CPU."""
    from haystack_integrations.common.multimodal_rag.backends.dense import cpu_has_native_bf16

    name = "unknown CPU"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    listed = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return f"CPU: {name}; flags: {' '.join(listed) or 'n/a'}; native bf16: {cpu_has_native_bf16()}"


def rss_child(model_dir: str, image_dir: str, count: int, batch_size: int) -> None:
    paths = sorted(Path(image_dir).glob("img_*.png"))[:count]
    run_ours(model_dir, paths, batch_size)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"PEAK_RSS_MIB {peak_kib / 1024:.1f}")


def measure_rss(model_dir: str, image_dir: Path, count: int, batch_size: int) -> float:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--rss-child",
            str(count),
            "--model",
            model_dir,
            "--image-dir",
            str(image_dir),
            "--batch-size",
            str(batch_size),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    for line in out.stdout.splitlines():
        if line.startswith("PEAK_RSS_MIB"):
            return float(line.split()[1])
    raise RuntimeError(out.stdout + out.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rss-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--quick", action="store_true", help="32 images, 1 repeat, RSS for 32 and 128")
    parser.add_argument("--skip-naive", action="store_true", help="only fp32 vs bf16 (no naive loop)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--image-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.rss_child:
        rss_child(args.model, args.image_dir, args.rss_child, args.batch_size)
        return
    if args.quick:
        args.images, args.repeats, args.rss_sizes = 32, 1, [32, 128]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_siglip_base_random(Path(tmp) / "siglip-base-random"))
        image_dir = Path(tmp) / "images"
        paths = make_images(image_dir, max([args.images, *args.rss_sizes]))[: args.images]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
        print(f"model: SigLIP-base-sized random init; {args.images} images of 320x240; batch_size={args.batch_size}")

        print(describe_cpu())
        run_ours(model_dir, paths[:4], args.batch_size)  # warm caches / lazy init
        run_ours(model_dir, paths[:4], args.batch_size, "bfloat16")
        # Interleaved round by round, so load drift on a shared machine moves every method alike.
        ours: list[float] = []
        ours_bf16: list[float] = []
        naive: list[float] = []
        for _ in range(args.repeats):
            ours.append(run_ours(model_dir, paths, args.batch_size))
            ours_bf16.append(run_ours(model_dir, paths, args.batch_size, "bfloat16"))
            if not args.skip_naive:
                naive.append(run_naive(model_dir, paths))
        ours_ips = args.images / statistics.median(ours)
        bf16_ips = args.images / statistics.median(ours_bf16)
        if naive:
            naive_ips = args.images / statistics.median(naive)
            print(f"naive per-image loop (fp32)        : {naive_ips:8.2f} images/s (median of {args.repeats})")
            print(f"MultimodalDocumentEmbedder (fp32)  : {ours_ips:8.2f} images/s, {ours_ips / naive_ips:5.2f}x naive")
        else:
            print(f"MultimodalDocumentEmbedder (fp32)  : {ours_ips:8.2f} images/s (median of {args.repeats})")
        print(f"MultimodalDocumentEmbedder (bf16)  : {bf16_ips:8.2f} images/s, {bf16_ips / ours_ips:5.2f}x fp32")

        for count in [] if args.no_rss else args.rss_sizes:
            peak = measure_rss(model_dir, image_dir, count, args.batch_size)
            print(f"peak RSS, {count:5d} images (fp32)  : {peak:8.1f} MiB")


if __name__ == "__main__":
    main()
