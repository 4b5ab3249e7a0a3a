"""Evaluation datasets: BEIR-style folders, ViDoRe exports, caption-as-query."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from haystack_integrations.components.converters.multimodal import MultimodalFileToDocument
from haystack_integrations.evaluation.multimodal_rag import (
    CorpusEntry,
    QueryEntry,
    caption_queries,
    corpus_from_documents,
    load_beir_dataset,
    load_dataset,
    load_vidore_dataset,
)
from tests.evaluation_fixtures import write_beir_dataset, write_vidore_export
from tests.helpers import make_image, make_pdf


def _rewrite_corpus(root: Path, edit: dict) -> None:
    rows = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines()]
    rows[0] = {**rows[0], **edit}
    rows[0] = {k: v for k, v in rows[0].items() if v is not None}
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_beir_folder_loads_every_modality_with_graded_qrels(tmp_path: Path) -> None:
    ds = load_beir_dataset(write_beir_dataset(tmp_path / "ds", image_query=True))
    assert ds.name == "ds"
    assert ds.root == (tmp_path / "ds").resolve()
    assert ds.modalities() == {
        "img-red": "image",
        "img-green": "image",
        "img-blue": "image",
        "img-yellow": "image",
        "page-1": "page",
        "page-2": "page",
        "page-3": "page",
        "txt-revenue": "text",
        "txt-hiring": "text",
    }
    assert ds.qrels["q-red"] == {"img-red": 2, "img-yellow": 1}
    assert ds.qrels["q-none"] == {"txt-hiring": 0}
    assert [q.id for q in ds.queries][-1] == "q-image"
    assert ds.queries[-1] == QueryEntry(id="q-image", image="queries/probe.png")

    by_id = {e.id: e for e in ds.corpus}
    # BEIR's title is prepended; unknown fields land in meta.
    assert by_id["txt-revenue"].text == "Q3 results\nRevenue in Q3 was the strongest quarter."
    assert by_id["txt-hiring"].meta == {"source": "memo"}
    page = by_id["page-2"].to_document()
    assert page.id == "page-2"
    assert page.content is None
    assert page.meta == {"file_path": "docs/report.pdf", "page_number": 2, "modality": "page"}
    image = by_id["img-red"].to_document()
    assert image.meta == {"file_path": "images/red.png", "modality": "image", "caption": "a red square"}


def test_only_queries_with_qrels_in_the_split_are_kept(tmp_path: Path) -> None:
    root = write_beir_dataset(tmp_path / "ds")
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq-blue\timg-blue\t1\n")
    ds = load_beir_dataset(root, split="dev")
    assert [q.id for q in ds.queries] == ["q-blue"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"path": "images/missing.png"}, r"corpus.jsonl:1: file 'images/missing.png' does not exist"),
        ({"path": "../outside.png"}, r"corpus.jsonl:1: .*outside root_path"),
        ({"text": "also text"}, r"corpus.jsonl:1: corpus entry 'img-red': give either .* not both"),
        ({"path": "docs/report.pdf", "caption": None}, r"a PDF page needs 'page_number'"),
        ({"path": "docs/report.pdf", "page_number": 9}, r"page_number 9 but 'docs/report.pdf' has 3 page"),
        ({"modality": "text"}, r"modality 'text' does not match its source \(a image\)"),
        ({"_id": "has space"}, r"without whitespace"),
        ({"_id": "img-green"}, r"duplicate corpus ids \['img-green'\]"),
    ],
)
def test_a_bad_corpus_line_is_reported_with_its_file_line_and_reason(tmp_path: Path, edit: dict, message: str) -> None:
    root = write_beir_dataset(tmp_path / "ds")
    make_image(tmp_path / "outside.png")
    _rewrite_corpus(root, edit)
    with pytest.raises(ValueError, match=message):
        load_beir_dataset(root)


def test_bad_qrels_and_missing_files_are_reported(tmp_path: Path) -> None:
    root = write_beir_dataset(tmp_path / "ds")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq-red\timg-red\t0.5\n")
    with pytest.raises(ValueError, match=r"test.tsv:2: score '0.5' is not an integer"):
        load_beir_dataset(root)
    (root / "qrels" / "test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.tsv"):
        load_beir_dataset(root)


def test_image_query_must_exist_in_the_dataset_folder(tmp_path: Path) -> None:
    root = write_beir_dataset(tmp_path / "ds", image_query=True)
    (root / "queries" / "probe.png").unlink()
    with pytest.raises(ValueError, match=r"queries.jsonl:7: file 'queries/probe.png' does not exist"):
        load_beir_dataset(root)


def test_vidore_export_becomes_corpus_queries_and_qrels_like_vidore_benchmark(tmp_path: Path) -> None:
    ds = load_vidore_dataset(write_vidore_export(tmp_path / "docvqa"))
    # One document per distinct image_filename (whitespace made TREC-safe), in order of first appearance.
    assert [e.id for e in ds.corpus] == ["docs/a_page_1.png", "docs/b.png", "docs/c.png", "docs/d.png"]
    assert all(e.modality == "image" for e in ds.corpus)
    assert ds.corpus[1].path == "images/00001.png"
    assert ds.corpus[1].meta["page"] == "3"
    # Queries deduplicated, None dropped; a repeated query is relevant to its last row's page.
    assert [(q.id, q.text) for q in ds.queries] == [
        ("q0", "What is the total revenue?"),
        ("q1", "Who signed the letter?"),
        ("q2", "When was it signed?"),
    ]
    assert ds.qrels == {"q0": {"docs/d.png": 1}, "q1": {"docs/b.png": 1}, "q2": {"docs/b.png": 1}}


def test_vidore_row_without_image_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "vidore.jsonl").write_text(json.dumps({"query": "q", "image_filename": "x.png"}) + "\n")
    with pytest.raises(ValueError, match=r"vidore.jsonl:1: a ViDoRe row needs 'image'"):
        load_vidore_dataset(root)


def test_captions_become_queries_and_shared_captions_share_one_query(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", color="blue")
    make_pdf(tmp_path / "r.pdf", pages=2)
    corpus = [
        CorpusEntry.create("a", path="a.png", meta={"caption": " sales chart "}),
        CorpusEntry.create("b", path="b.png", meta={"alt_text": "sales chart"}),
        CorpusEntry.create("p1", path="r.pdf", page_number=1, meta={"alt": "cover page"}),
        CorpusEntry.create("p2", path="r.pdf", page_number=2),
        CorpusEntry.create("t", text="a text document", meta={"caption": "ignored for text"}),
    ]
    queries, qrels = caption_queries(corpus)
    assert queries == [QueryEntry(id="cap0", text="sales chart"), QueryEntry(id="cap1", text="cover page")]
    assert qrels == {"cap0": {"a": 1, "b": 1}, "cap1": {"p1": 1}}
    with pytest.raises(ValueError, match="no image or page document has a caption"):
        caption_queries(corpus[3:])


def test_converter_documents_with_captions_become_a_synthetic_corpus(tmp_path: Path) -> None:
    make_image(tmp_path / "files" / "chart.png")
    make_pdf(tmp_path / "files" / "deck.pdf", pages=2)
    docs = MultimodalFileToDocument(root_path=str(tmp_path / "files")).run(sources=["."])["documents"]
    captioned = [d for d in docs if d.meta.get("page_number") != 2]
    entries = corpus_from_documents(docs)
    assert {e.id for e in entries} == {d.id for d in docs}
    assert {e.modality for e in entries} == {"image", "page"}
    entries = [
        CorpusEntry.create(e.id, path=e.path, page_number=e.page_number, meta={"caption": f"caption of {e.id}"})
        if e.id in {d.id for d in captioned}
        else e
        for e in entries
    ]
    queries, qrels = caption_queries(entries)
    assert len(queries) == 2
    assert {doc_id for rels in qrels.values() for doc_id in rels} == {d.id for d in captioned}


def test_load_dataset_detects_the_layout(tmp_path: Path) -> None:
    beir = write_beir_dataset(tmp_path / "beir")
    assert load_dataset(beir).queries[0].id == "q-red"
    assert load_dataset(write_vidore_export(tmp_path / "vidore")).queries[0].id == "q0"
    synthetic = tmp_path / "synthetic"
    shutil.copytree(beir, synthetic)
    (synthetic / "queries.jsonl").unlink()
    ds = load_dataset(synthetic)
    assert ds.name == "synthetic-captions"
    assert sorted(q.text for q in ds.queries) == ["a blue square", "a green square", "a red square", "a yellow square"]
    assert load_dataset(beir, format="synthetic").name == "beir-captions"
    with pytest.raises(FileNotFoundError, match="not a dataset folder"):
        load_dataset(tmp_path / "nothing")
