"""ColPali test fixtures: tiny checkpoints of every colpali-engine family (built once per session) and page corpora.

Registered as a pytest plugin by `tests/conftest.py`; the plain helpers are imported by the ColPali test modules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from haystack import Document

from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder
from haystack_integrations.testing.multimodal_rag.tiny_colpali import build_tiny_colpali_family
from tests.helpers import COLORS, make_image, make_pdf


@pytest.fixture(scope="session", name="tiny_colpali_family")
def tiny_colpali_family_fixture(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """`get(family)`: the path of a tiny checkpoint of that colpali-engine family (built on first use)."""
    root = tmp_path_factory.mktemp("tiny_colpali_families")
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(build_tiny_colpali_family(Path(root) / family, family))
        return built[family]

    return get


@pytest.fixture
def pages_dir(tmp_path: Path) -> Path:
    """Five images of different widths and a three-page PDF."""
    for i, color in enumerate(COLORS[:5]):
        make_image(tmp_path / f"page{i}.png", size=(56 + 14 * i, 56), color=color)
    make_pdf(tmp_path / "deck.pdf", pages=3, size=(80, 60))
    return tmp_path


def page_docs(pages_dir: Path) -> list[Document]:
    """Documents for `pages_dir`'s images and PDF pages, with descending retriever scores."""
    docs = [Document(meta={"file_path": str(pages_dir / f"page{i}.png")}, score=0.5 - i / 100) for i in range(5)]
    docs += [Document(meta={"file_path": str(pages_dir / "deck.pdf"), "page_number": p}, score=0.3) for p in (1, 2, 3)]
    return docs


def embed_pages(model: str, docs: list[Document], store: object, **kwargs: object) -> dict[str, list[Document]]:
    """Run a `ColPaliDocumentEmbedder` (progress bar off) writing to `store`."""
    kwargs.setdefault("progress_bar", False)
    return ColPaliDocumentEmbedder(model, multivector_store=store, **kwargs).run(docs)  # type: ignore[arg-type]


def check_kept_until_the_store_changes(
    ranker: Any, path: str, docs: list[Document], expected: list[Document], monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """
    Rank `docs` twice with a caching `ranker` over the SQLite store at `path` (its `multivector_store`): the first
    run fetches every page, the second none, both as `expected`; then another connection re-indexes the best page
    with the worst page's vectors, and the next run fetches everything again and scores the change.

    :returns: The list recording every id the store was asked for (cleared between the checks), for more checks.
    """
    from haystack_integrations.document_stores.multivector import SQLiteMultiVectorStore

    store = ranker.multivector_store
    asked: list[str] = []
    real_get = store.get
    monkeypatch.setattr(store, "get", lambda ids: (asked.extend(ids), real_get(ids))[1])
    first = ranker.run(query="chart", documents=docs)["documents"]
    assert sorted(asked) == sorted(d.id for d in docs)
    asked.clear()
    again = ranker.run(query="chart", documents=docs)["documents"]
    assert asked == []  # every page came from the cache
    for out in (first, again):
        assert [d.id for d in out] == [d.id for d in expected]
        assert [d.score for d in out] == pytest.approx([d.score for d in expected], rel=1e-5)
    assert [d.score for d in again] == [d.score for d in first]  # cached pages score exactly as fetched ones
    best, worst = expected[0].id, expected[-1].id
    other = SQLiteMultiVectorStore(path)
    other.write({best: other.get([worst])[worst]})
    other.close()
    changed = {d.id: d.score for d in ranker.run(query="chart", documents=docs)["documents"]}
    assert changed[best] == pytest.approx(changed[worst], rel=1e-5)
    assert sorted(asked) == sorted(d.id for d in docs)  # everything fetched again
    return asked
