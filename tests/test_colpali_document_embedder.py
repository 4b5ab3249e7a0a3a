from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from haystack import Document

from haystack_integrations.common.multimodal_rag.errors import (
    DocumentProcessingError,
    MultiVectorStoreError,
)
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore
from tests.helpers import COLORS, make_corrupt_image, make_image, make_pdf


@pytest.fixture
def pages_dir(tmp_path: Path) -> Path:
    for i, color in enumerate(COLORS[:5]):
        make_image(tmp_path / f"page{i}.png", size=(56 + 14 * i, 56), color=color)
    make_pdf(tmp_path / "deck.pdf", pages=3, size=(80, 60))
    return tmp_path


def _page_docs(pages_dir: Path) -> list[Document]:
    docs = [Document(meta={"file_path": str(pages_dir / f"page{i}.png")}, score=0.5 - i / 100) for i in range(5)]
    docs += [Document(meta={"file_path": str(pages_dir / "deck.pdf"), "page_number": p}, score=0.3) for p in (1, 2, 3)]
    return docs


def _embed_pages(model: str, docs: list[Document], store, **kwargs) -> dict[str, list[Document]]:
    kwargs.setdefault("progress_bar", False)
    return ColPaliDocumentEmbedder(model, multivector_store=store, **kwargs).run(docs)


@pytest.mark.parametrize("model_fixture", ["tiny_colqwen2", "tiny_colqwen2_5"])
def test_document_embedder_writes_one_multivector_per_page(
    request: pytest.FixtureRequest, model_fixture: str, pages_dir: Path
) -> None:
    model = request.getfixturevalue(model_fixture)
    store = InMemoryMultiVectorStore()
    text = Document(content="plain text passes through")
    docs = [text, *_page_docs(pages_dir)]
    before = copy.deepcopy(docs)
    out = _embed_pages(model, docs, store, batch_size=3)
    assert docs == before
    assert out["failed_documents"] == []
    assert out["documents"][0] is text
    assert store.count() == len(docs) - 1
    stored = store.get([d.id for d in docs])
    for doc in out["documents"][1:]:
        array = stored[doc.id]
        assert array.dtype == np.float16
        assert array.shape == (doc.meta["multivector_count"], 128)
        np.testing.assert_allclose(np.linalg.norm(array.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert out["documents"][1].meta["modality"] == "image"
    assert out["documents"][-1].meta["modality"] == "page"


def test_document_embedder_bad_input_raises_before_writing_and_skip_returns_it(
    tiny_colqwen2: str, pages_dir: Path
) -> None:
    make_corrupt_image(pages_dir / "broken.png")
    docs = [*_page_docs(pages_dir)[:2], Document(id="broken", meta={"file_path": str(pages_dir / "broken.png")})]
    docs.append(Document(id="beyond", meta={"file_path": str(pages_dir / "deck.pdf"), "page_number": 9}))
    store = InMemoryMultiVectorStore()
    with pytest.raises(DocumentProcessingError) as info:
        _embed_pages(tiny_colqwen2, docs, store)
    assert "'broken'" in str(info.value)
    assert "'beyond'" in str(info.value)
    assert store.count() == 0

    out = _embed_pages(tiny_colqwen2, docs, store, on_error="skip")
    assert len(out["documents"]) + len(out["failed_documents"]) == len(docs)
    assert {d.id for d in out["failed_documents"]} == {"broken", "beyond"}
    assert store.count() == 2


def test_pool_factor_shrinks_the_stored_vectors(tiny_colqwen2: str, pages_dir: Path) -> None:
    docs = _page_docs(pages_dir)[:3]
    full, pooled = InMemoryMultiVectorStore(), InMemoryMultiVectorStore()
    counts = [d.meta["multivector_count"] for d in _embed_pages(tiny_colqwen2, docs, full)["documents"]]
    pooled_counts = [
        d.meta["multivector_count"] for d in _embed_pages(tiny_colqwen2, docs, pooled, pool_factor=2)["documents"]
    ]
    for n, m in zip(counts, pooled_counts, strict=True):
        assert m <= n // 2 + 1
        assert m >= 1
    assert sum(a.nbytes for a in pooled.get([d.id for d in docs]).values()) < sum(
        a.nbytes for a in full.get([d.id for d in docs]).values()
    )


def test_store_of_another_model_is_refused_naming_both(
    tiny_colqwen2: str, tiny_colqwen2_5: str, pages_dir: Path
) -> None:
    store = InMemoryMultiVectorStore()
    _embed_pages(tiny_colqwen2, _page_docs(pages_dir)[:1], store)
    with pytest.raises(MultiVectorStoreError) as info:
        _embed_pages(tiny_colqwen2_5, _page_docs(pages_dir)[1:2], store)
    assert tiny_colqwen2 in str(info.value)
    assert tiny_colqwen2_5 in str(info.value)
    with pytest.raises(MultiVectorStoreError):
        ColPaliRanker(tiny_colqwen2_5, multivector_store=store).warm_up()


def test_store_with_another_dim_is_refused(tiny_colqwen2: str) -> None:
    store = InMemoryMultiVectorStore()
    store.write({"x": np.ones((3, 64))})
    with pytest.raises(MultiVectorStoreError, match=r"dim 64.*produces dim 128"):
        ColPaliDocumentEmbedder(tiny_colqwen2, multivector_store=store).warm_up()
