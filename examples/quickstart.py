"""Multimodal RAG over charts, diagrams, a PDF and notes, end to end.

1. Generates a small sample corpus (a bar chart, an architecture diagram, a 3-page PDF report, text notes).
2. Indexes it with `examples/pipelines/indexing.yaml` into an embedded Qdrant folder plus an SQLite file of
   ColPali multi-vectors (both under `--workdir`/index, no server needed).
3. Answers a few questions with `examples/pipelines/rag.yaml` and prints, per question, the ranked citations
   (number, modality, score, file, page) and the generated answer.

Models: the real ones by default (downloaded from the Hugging Face Hub on first use: SigLIP so400m,
ColQwen2.5, Qwen2.5-VL-3B; ~15 GB, a GPU recommended). `--tiny` builds tiny random-weight models locally
instead, so the whole flow runs offline in about a minute on a CPU; its answers are meaningless.
The generator is `OpenAIChatGenerator` when OPENAI_API_KEY is set, the in-process `LocalVLMChatGenerator`
otherwise. Set QDRANT_URL (and QDRANT_API_KEY) to index into a Qdrant server or cluster instead.

    python examples/quickstart.py            # real models
    python examples/quickstart.py --tiny     # offline, tiny random models

Haystack's telemetry is off in this process unless HAYSTACK_TELEMETRY_ENABLED is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
PIPELINES = HERE / "pipelines"

QUESTIONS = (
    "Which quarter had the highest revenue in the bar chart?",
    "Which services appear in the architecture diagram?",
    "What does the annual report say about hiring?",
)

NOTES = {
    "notes/meeting_notes.txt": (
        "Planning meeting, March. Revenue in Q3 was the strongest of the year, driven by the EMEA region. "
        "The team agreed to move the search service to the new cluster before the summer."
    ),
    "notes/faq.md": (
        "# FAQ\n\nWhat is the retention policy? Documents are kept for seven years.\n\n"
        "Who approves hiring? The head of each department approves new positions."
    ),
}

REPORT_PAGES = (
    ("Annual report 2025", ["Revenue grew 18% year over year.", "Q3 was the strongest quarter."]),
    ("People", ["We hired 42 engineers in 2025.", "Hiring will slow down in 2026 to 15 positions."]),
    ("Outlook", ["We expect growth in EMEA and APAC.", "The search platform moves to a new cluster."]),
)


def _text_page(title: str, lines: list[str], size: tuple[int, int] = (850, 1100)) -> Image.Image:
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    draw.text((60, 60), title, fill="black")
    for i, line in enumerate(lines):
        draw.text((60, 140 + 40 * i), line, fill="black")
    return page


def build_corpus(data_dir: Path) -> list[Path]:
    """Write the sample corpus and return the paths to index."""
    data_dir.mkdir(parents=True, exist_ok=True)
    chart = Image.new("RGB", (640, 420), "white")
    draw = ImageDraw.Draw(chart)
    draw.text((20, 10), "Quarterly revenue (M$)", fill="black")
    for i, (label, value) in enumerate([("Q1", 120), ("Q2", 150), ("Q3", 260), ("Q4", 190)]):
        x = 80 + i * 130
        draw.rectangle([x, 380 - value, x + 80, 380], fill=("steelblue" if label != "Q3" else "darkorange"))
        draw.text((x + 30, 388), label, fill="black")
        draw.text((x + 25, 360 - value), str(value), fill="black")
    chart.save(data_dir / "revenue_chart.png")

    diagram = Image.new("RGB", (640, 360), "white")
    draw = ImageDraw.Draw(diagram)
    for i, name in enumerate(["web app", "search service", "vector DB"]):
        x = 30 + i * 210
        draw.rectangle([x, 140, x + 170, 220], outline="black", width=3)
        draw.text((x + 20, 172), name, fill="black")
        if i:
            draw.line([x - 40, 180, x, 180], fill="black", width=3)
    draw.text((30, 30), "System architecture", fill="black")
    diagram.save(data_dir / "architecture_diagram.png")

    pages = [_text_page(title, list(lines)) for title, lines in REPORT_PAGES]
    pages[0].save(data_dir / "annual_report.pdf", format="PDF", save_all=True, append_images=pages[1:])

    for name, text in NOTES.items():
        path = data_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return [
        data_dir / "revenue_chart.png",
        data_dir / "architecture_diagram.png",
        data_dir / "annual_report.pdf",
        data_dir / "notes",
    ]


def tiny_models(folder: Path) -> dict[str, str]:
    """Build (once) tiny random-weight models in `folder` and return their paths by role."""
    from haystack_integrations.testing.multimodal_rag import tiny_models as builders

    paths = {"dense": folder / "siglip", "colpali": folder / "colqwen2_5", "vlm": folder / "qwen2_vl"}
    if not (paths["dense"] / "config.json").exists():
        builders.build_tiny_siglip(paths["dense"])
    if not (paths["colpali"] / "config.json").exists():
        builders.build_tiny_qwen2_vl(paths["colpali"], kind="colpali", version="2.5")
    if not (paths["vlm"] / "config.json").exists():
        builders.build_tiny_qwen2_vl(paths["vlm"], kind="vlm", version="2")
    return {role: str(path) for role, path in paths.items()}


def _root_cause(error: BaseException) -> BaseException:
    seen = set()
    while error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__
    return error


def _quiet_transformers() -> None:
    """Keep transformers to errors: no per-load progress bars or config notices between the results."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def run(args: argparse.Namespace) -> int:
    from haystack_integrations.pipelines.multimodal_rag import load_pipeline

    _quiet_transformers()
    workdir = Path(args.workdir).resolve()
    models: dict[str, str] = {}
    embedding_dim = None
    if args.tiny:
        print("=" * 78)
        print("TINY MODE: tiny RANDOM-WEIGHT models built locally. Retrieval order and answers are")
        print("MEANINGLESS; this mode only shows that the whole pipeline runs, offline, on a CPU.")
        print("Their tokenizers know fewer than a hundred pieces (about 4 tokens per word), so")
        print("the embedder warns that text chunks were truncated; a real model's tokenizer")
        print("needs far fewer tokens per word.")
        print("=" * 78)
        models = tiny_models(workdir / "tiny_models")
        embedding_dim = 32
    generator = "openai" if os.environ.get("OPENAI_API_KEY") and not args.tiny else "local"

    sources = build_corpus(workdir / "data")
    indexing = load_pipeline(PIPELINES / "indexing.yaml", base_dir=workdir, models=models, embedding_dim=embedding_dim)
    print(f"Indexing {len(sources)} sources into {workdir / 'index'} ...")
    try:
        result = indexing.run({"converter": {"sources": [str(s) for s in sources]}})
    finally:
        # Releases the embedded Qdrant folder for the query pipeline.
        indexing.close()
    print(f"Indexed {result['writer']['documents_written']} documents (images, PDF pages, text).")

    rag = load_pipeline(
        PIPELINES / "rag.yaml", base_dir=workdir, models=models, embedding_dim=embedding_dim, generator=generator
    )
    if args.tiny:
        # Keep generation short: random weights produce random tokens.
        rag.get_component("generator").generation_kwargs = {"max_new_tokens": 16}
    try:
        for question in args.question or list(QUESTIONS):
            _answer(rag, question)
    finally:
        rag.close()
    return 0


def _answer(rag: Any, question: str) -> None:
    out = rag.run(
        {
            "text_embedder": {"text": question},
            "ranker": {"query": question},
            "calibrator": {"query": question},
            "prompt_builder": {"query": question},
        },
        include_outputs_from={"prompt_builder", "monitor"},
    )
    print(f"\nQ: {question}")
    print("   citations:")
    for citation in out["prompt_builder"]["citations"]:
        if not citation["included"]:
            continue
        # Text chunks carry their file's page_number too (DocumentSplitter); PDF pages and the pages of multi-page
        # TIFF scans are cited by page.
        file_name = Path(citation["file_path"]).name if citation["file_path"] else "-"
        paged = citation["modality"] == "page" or Path(file_name).suffix.lower() in (".tif", ".tiff")
        page = f", page {citation['page_number']}" if paged and citation["page_number"] else ""
        score = f"{citation['score']:.3f}" if citation["score"] is not None else "n/a"
        print(f"   [{citation['number']}] {citation['modality']:<8} score {score}  {file_name}{page}")
    answer = out["generator"]["replies"][0].text or ""
    # A random tiny model emits arbitrary tokens: keep control characters off the terminal.
    answer = "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in answer)
    print("A: " + textwrap.fill(answer, width=100, subsequent_indent="   "))
    drift = out["monitor"]["drift_report"]
    print(f"   (drift monitor: {drift['status']}, {drift['samples']} scores in window)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use tiny random-weight models built locally (offline)")
    parser.add_argument("--workdir", default=str(HERE), help="where data/, index/ and tiny_models/ are written")
    parser.add_argument("--question", action="append", help="ask this instead of the built-in questions")
    args = parser.parse_args()
    # Set before Haystack is imported: no telemetry (it retries against an unreachable server when offline),
    # unless the user chose; with --tiny no model hub either.
    os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
    if args.tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from haystack_integrations.common.multimodal_rag.errors import ModelLoadError, PipelineLoadError

    try:
        return run(args)
    except Exception as error:
        known = next(
            (e for e in (error, _root_cause(error)) if isinstance(e, (ModelLoadError, PipelineLoadError))), None
        )
        if known is None:
            raise
        message = str(known).splitlines()[0]
        if isinstance(known, ModelLoadError):
            message += " Or run offline with: python examples/quickstart.py --tiny"
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
