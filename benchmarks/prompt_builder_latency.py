"""Per-query cost of `MultimodalChatPromptBuilder`: decoding, shrinking and JPEG-encoding the retrieved images.

A query shows the same few images again and again (the best pages of a corpus), so the builder keeps the encoded
`ImageContent` of each (file, page, size, modification time) in a bounded LRU cache. This compares, round by
round in one run (so load drift on a shared machine moves both alike):

- `cache off`: `image_cache_size=0`, every query decodes and encodes its images (what the builder did before);
- `cache on`: the default cache, warm after the first query.

The query: 4 images shown (two 4000x3000 (12 MP) JPEG photos, a 1200x900 PNG chart, one page of a 3-page PDF) and 6 text
chunks, `image_size=(1024, 1024)`. Prints the medians in milliseconds and their ratio.

    python benchmarks/prompt_builder_latency.py [--rounds 30] [--photo 4000x3000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from haystack import Document
from PIL import Image, ImageDraw

from haystack_integrations.components.builders.multimodal import MultimodalChatPromptBuilder


def _photo(path: Path, size: tuple[int, int], seed: int) -> None:
    img = Image.effect_noise(size, 40 + seed).convert("RGB")
    ImageDraw.Draw(img).ellipse([size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2], fill=(200, 30, 30))
    img.save(path, quality=90)


def _corpus(folder: Path, photo: tuple[int, int] = (4000, 3000)) -> list[Document]:
    _photo(folder / "a.jpg", photo, 1)
    _photo(folder / "b.jpg", photo, 2)
    chart = Image.new("RGB", (1200, 900), "white")
    ImageDraw.Draw(chart).rectangle([100, 300, 400, 850], fill="blue")
    chart.save(folder / "chart.png")
    pages = [Image.effect_noise((612, 792), 30 + i).convert("RGB") for i in range(3)]
    pages[0].save(folder / "report.pdf", save_all=True, append_images=pages[1:])
    docs = [
        Document(content=f"Chunk {i}: revenue grew in quarter {i}.", meta={"modality": "text"}, score=0.9 - i / 100)
        for i in range(6)
    ]
    docs += [
        Document(meta={"modality": "image", "file_path": "a.jpg"}, score=0.8),
        Document(meta={"modality": "image", "file_path": "b.jpg"}, score=0.7),
        Document(meta={"modality": "image", "file_path": "chart.png"}, score=0.6),
        Document(meta={"modality": "page", "file_path": "report.pdf", "page_number": 2}, score=0.5),
    ]
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--photo", default="4000x3000", help="size of the two JPEG photos, WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(side) for side in args.photo.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        docs = _corpus(folder, (width, height))
        common = {"max_images": 4, "image_size": (1024, 1024), "root_path": str(folder)}
        builders = {
            "cache off": MultimodalChatPromptBuilder(**common, image_cache_size=0),
            "cache on": MultimodalChatPromptBuilder(**common),
        }
        times: dict[str, list[float]] = {name: [] for name in builders}
        for name, builder in builders.items():  # warm-up (and fill the cache)
            assert len(builder.run(query="q", documents=docs)["messages"][-1].images) == 4, name
        for _ in range(args.rounds):
            for name, builder in builders.items():
                start = time.perf_counter()
                builder.run(query="What grew?", documents=docs)
                times[name].append((time.perf_counter() - start) * 1000)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, value in medians.items():
            print(f"{name:>9}: median {value:8.2f} ms per query ({args.rounds} rounds, photos {args.photo})")
        print(f"    ratio: {medians['cache off'] / medians['cache on']:.1f}x faster with the cache")


if __name__ == "__main__":
    main()
