from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from haystack import Document, Pipeline
from haystack.components.writers import DocumentWriter
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.document_stores.types import DuplicatePolicy

from haystack_integrations.components.converters.multimodal import MultimodalFileToDocument
from haystack_integrations.components.writers.multimodal import StaleDocumentPruner
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore
from tests.helpers import make_image, make_pdf


def _index(
    root: Path, sources: list[str], store: InMemoryDocumentStore, mv_store: InMemoryMultiVectorStore
) -> list[Document]:
    """What an indexing run writes: the converter's documents, and a multi-vector per image/page."""
    docs = MultimodalFileToDocument(root_path=str(root)).run(sources=sources)["documents"]
    DocumentWriter(document_store=store, policy=DuplicatePolicy.OVERWRITE).run(documents=docs)
    rng = np.random.default_rng(0)
    mv_store.write({d.id: rng.normal(size=(3, 4)) for d in docs if d.meta["modality"] != "text"})
    return docs


@pytest.fixture
def indexed(tmp_path: Path) -> tuple[Path, InMemoryDocumentStore, InMemoryMultiVectorStore, list[Document]]:
    root = tmp_path / "data"
    make_image(root / "docs" / "a.png")
    make_image(root / "docs" / "b.png", color="blue")
    make_pdf(root / "docs" / "report.pdf", pages=3)
    (root / "docs" / "notes.txt").write_text("first version")
    make_image(root / "other" / "c.png", color="green")
    store, mv_store = InMemoryDocumentStore(), InMemoryMultiVectorStore()
    first = _index(root, ["docs", "other"], store, mv_store)
    assert store.count_documents() == 7
    return root, store, mv_store, first


def test_pruner_removes_documents_of_deleted_shortened_and_edited_files_only_inside_the_sources(
    indexed: tuple[Path, InMemoryDocumentStore, InMemoryMultiVectorStore, list[Document]],
) -> None:
    root, store, mv_store, first = indexed
    by_key = {(d.meta["file_path"], d.meta.get("page_number")): d.id for d in first}
    (root / "docs" / "b.png").unlink()
    make_pdf(root / "docs" / "report.pdf", pages=1)
    (root / "docs" / "notes.txt").write_text("second version")
    (root / "other" / "c.png").unlink()  # gone too, but "other" is not re-indexed in this run: kept

    second = _index(root, ["docs"], store, mv_store)
    pruner = StaleDocumentPruner(document_store=store, multivector_store=mv_store, root_path=str(root))
    out = pruner.run(documents=second, sources=["docs"])

    stale = [
        by_key[("docs/b.png", None)],
        by_key[("docs/notes.txt", None)],
        by_key[("docs/report.pdf", 2)],
        by_key[("docs/report.pdf", 3)],
    ]
    assert out["deleted_ids"] == sorted(stale)
    assert out["deleted_files"] == ["docs/b.png", "docs/notes.txt", "docs/report.pdf"]
    remaining = {(d.meta["file_path"], d.meta.get("page_number"), d.content) for d in store.filter_documents()}
    assert remaining == {
        ("docs/a.png", None, None),
        ("docs/report.pdf", 1, None),
        ("docs/notes.txt", None, "second version"),
        ("other/c.png", None, None),
    }
    assert mv_store.get(stale) == {}
    kept = [by_key[("docs/a.png", None)], by_key[("docs/report.pdf", 1)], by_key[("other/c.png", None)]]
    assert sorted(mv_store.get(kept)) == sorted(kept)


def test_pruner_removes_everything_under_a_directory_that_was_emptied_or_deleted(
    indexed: tuple[Path, InMemoryDocumentStore, InMemoryMultiVectorStore, list[Document]],
) -> None:
    root, store, mv_store, _ = indexed
    for child in (root / "docs").iterdir():
        child.unlink()
    (root / "docs").rmdir()
    out = StaleDocumentPruner(document_store=store, multivector_store=mv_store, root_path=str(root)).run(
        documents=[], sources=["docs"]
    )
    assert len(out["deleted_ids"]) == 6
    assert [d.meta["file_path"] for d in store.filter_documents()] == ["other/c.png"]
    assert mv_store.count() == 1


def test_pruner_dry_run_reports_without_deleting(
    indexed: tuple[Path, InMemoryDocumentStore, InMemoryMultiVectorStore, list[Document]],
) -> None:
    root, store, mv_store, _ = indexed
    (root / "docs" / "a.png").unlink()
    second = MultimodalFileToDocument(root_path=str(root)).run(sources=["docs"])["documents"]
    out = StaleDocumentPruner(document_store=store, root_path=str(root), dry_run=True).run(
        documents=second, sources=["docs"]
    )
    assert out["deleted_files"] == ["docs/a.png"]
    assert store.count_documents() == 7
    assert mv_store.count() == 6


def test_pruner_leaves_documents_without_a_usable_file_path_and_refuses_bad_sources(tmp_path: Path) -> None:
    store = InMemoryDocumentStore()
    store.write_documents(
        [
            Document(id="no-path", content="plain text"),
            Document(id="int-path", content="x", meta={"file_path": 7}),
            Document(id="nul-path", content="x", meta={"file_path": "a\x00b"}),
        ]
    )
    pruner = StaleDocumentPruner(document_store=store, root_path=str(tmp_path))
    assert pruner.run(documents=[], sources=["."])["deleted_ids"] == []
    assert store.count_documents() == 3
    with pytest.raises(TypeError, match="sources must be a list"):
        pruner.run(documents=[], sources=".")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside root_path"):
        pruner.run(documents=[], sources=["../elsewhere"])


def test_pruner_survives_a_pipeline_round_trip(tmp_path: Path) -> None:
    mv_store = InMemoryMultiVectorStore(index="pruner-round-trip")
    pipe = Pipeline()
    pipe.add_component(
        "pruner",
        StaleDocumentPruner(
            document_store=InMemoryDocumentStore(), multivector_store=mv_store, root_path=str(tmp_path), dry_run=True
        ),
    )
    restored = Pipeline.loads(pipe.dumps()).get_component("pruner")
    assert isinstance(restored.document_store, InMemoryDocumentStore)
    assert isinstance(restored.multivector_store, InMemoryMultiVectorStore)
    assert restored.to_dict() == pipe.get_component("pruner").to_dict()
    assert (restored.root_path, restored.dry_run) == (str(tmp_path), True)


def test_a_file_that_only_failed_to_be_read_in_this_run_keeps_its_stored_documents(
    indexed: tuple[Path, InMemoryDocumentStore, InMemoryMultiVectorStore, list[Document]],
) -> None:
    root, store, mv_store, first = indexed
    a_png = next(d for d in first if d.meta["file_path"] == "docs/a.png")
    # This run: a.png could not be read (locked, flaky mount); with on_error="skip" it is a failed document.
    produced = [d for d in first if d.meta["file_path"].startswith("docs/") and d.id != a_png.id]
    failed = [Document(id=a_png.id, meta={**a_png.meta, "embedding_error": "cannot open: resource busy"})]
    pruner = StaleDocumentPruner(document_store=store, multivector_store=mv_store, root_path=str(root))
    out = pruner.run(documents=produced, sources=["docs"], failed_documents=failed)
    assert out == {"deleted_ids": [], "deleted_files": []}
    assert store.filter_documents({"field": "id", "operator": "==", "value": a_png.id})
    assert mv_store.get([a_png.id])
    # Without the failure reported, the same run would prune it (the documented old behaviour).
    dry = StaleDocumentPruner(document_store=store, root_path=str(root), dry_run=True)
    assert dry.run(documents=produced, sources=["docs"])["deleted_ids"] == [a_png.id]


def test_a_failed_document_whose_file_path_is_a_directory_keeps_everything_under_it(
    indexed: tuple[Path, InMemoryDocumentStore, InMemoryMultiVectorStore, list[Document]],
) -> None:
    root, store, mv_store, first = indexed
    # This run produced nothing under docs/ (the folder could not be listed) and reported the folder as failed.
    failed = [Document(meta={"file_path": "docs", "embedding_error": "cannot list: permission denied"})]
    pruner = StaleDocumentPruner(document_store=store, multivector_store=mv_store, root_path=str(root))
    out = pruner.run(documents=[], sources=["docs"], failed_documents=failed)
    assert out == {"deleted_ids": [], "deleted_files": []}
    assert store.count_documents() == 7
    # A failed sibling folder does not protect docs/ (a prefix of the name is not a parent).
    (root / "doc").mkdir()
    sibling = [Document(meta={"file_path": "doc"})]
    dry = StaleDocumentPruner(document_store=store, root_path=str(root), dry_run=True)
    deleted = dry.run(documents=[], sources=["docs"], failed_documents=sibling)["deleted_files"]
    assert set(deleted) == {d.meta["file_path"] for d in first if d.meta["file_path"].startswith("docs/")}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"documents": None}, "documents must be a list of Documents, got a NoneType"),
        ({"documents": [None]}, r"documents\[0\] is None, not a Document"),
        ({"documents": [], "failed_documents": [None]}, r"failed_documents\[0\] is None, not a Document"),
        (
            {"documents": [], "failed_documents": "docs/a.png"},
            "failed_documents must be a list of Documents, got a str",
        ),
    ],
)
def test_documents_or_failed_documents_that_are_not_documents_are_refused_naming_the_input(
    indexed: tuple[Path, InMemoryDocumentStore, InMemoryMultiVectorStore, list[Document]],
    kwargs: dict,
    message: str,
) -> None:
    root, store, _, _ = indexed
    with pytest.raises(TypeError, match=message):
        StaleDocumentPruner(document_store=store, root_path=str(root)).run(sources=["docs"], **kwargs)
    assert store.count_documents() == 7
