"""Mini evaluation datasets written with Pillow (images, a PDF, text) for the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import COLORS, make_image, make_pdf


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_beir_dataset(root: Path, *, image_query: bool = False) -> Path:
    """
    A BEIR-style folder: 4 images (with captions), a 3-page PDF (pages as documents), 2 text documents;
    6 text queries with graded qrels over every modality (one query has relevant documents of two modalities),
    and optionally one query-by-image.
    """
    for i, color in enumerate(COLORS[:4]):
        make_image(root / "images" / f"{color}.png", size=(60 + 8 * i, 56), color=color)
    make_pdf(root / "docs" / "report.pdf", pages=3, size=(80, 100))
    corpus = [
        {"_id": f"img-{color}", "path": f"images/{color}.png", "caption": f"a {color} square"} for color in COLORS[:4]
    ]
    corpus += [{"_id": f"page-{n}", "path": "docs/report.pdf", "page_number": n, "modality": "page"} for n in (1, 2, 3)]
    corpus += [
        {"_id": "txt-revenue", "text": "Revenue in Q3 was the strongest quarter.", "title": "Q3 results"},
        {"_id": "txt-hiring", "text": "Hiring will slow down next year.", "source": "memo"},
    ]
    queries = [
        {"_id": "q-red", "text": "the red picture"},
        {"_id": "q-blue", "text": "something blue"},
        {"_id": "q-page", "text": "the second page of the report"},
        {"_id": "q-revenue", "text": "Which quarter had the strongest revenue?"},
        {"_id": "q-mixed", "text": "hiring plans and the green chart"},
        {"_id": "q-none", "text": "a query nobody judged relevant"},
    ]
    qrels = [
        ("q-red", "img-red", 2),
        ("q-red", "img-yellow", 1),
        ("q-blue", "img-blue", 1),
        ("q-page", "page-2", 2),
        ("q-page", "page-1", 1),
        ("q-revenue", "txt-revenue", 1),
        ("q-mixed", "txt-hiring", 1),
        ("q-mixed", "img-green", 1),
        ("q-none", "txt-hiring", 0),
    ]
    if image_query:
        make_image(root / "queries" / "probe.png", size=(50, 50), color="red")
        queries.append({"_id": "q-image", "image": "queries/probe.png"})
        qrels.append(("q-image", "img-red", 1))
    _write_jsonl(root / "corpus.jsonl", corpus)
    _write_jsonl(root / "queries.jsonl", queries)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_vidore_export(root: Path) -> Path:
    """A folder as the README's ViDoRe export recipe writes it (5 rows, a duplicate query, a None query)."""
    rows = [
        {"query": "What is the total revenue?", "image_filename": "docs/a page 1.png", "page": "1"},
        {"query": "Who signed the letter?", "image_filename": "docs/b.png", "page": "3"},
        {"query": None, "image_filename": "docs/c.png", "page": "2"},
        # The same query again, on another page: vidore-benchmark keeps one query, relevant to the last row's page.
        {"query": "What is the total revenue?", "image_filename": "docs/d.png", "page": "7"},
        # The same page again (same filename): one document.
        {"query": "When was it signed?", "image_filename": "docs/b.png", "page": "3"},
    ]
    out = []
    for i, row in enumerate(rows):
        image = f"images/{i:05d}.png"
        make_image(root / image, size=(40 + 4 * i, 40), color=COLORS[i % len(COLORS)])
        out.append({**row, "image": image, "source": "test"})
    _write_jsonl(root / "vidore.jsonl", out)
    return root
