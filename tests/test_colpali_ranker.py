from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice, Secret

from haystack_integrations.common.multimodal_rag.backends.colpali import (
    LateInteractionEncoder,
)
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.common.multimodal_rag.errors import (
    MultiVectorStoreError,
)
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder, ColPaliTextEmbedder
from haystack_integrations.components.embedders.multimodal import MultimodalDocumentEmbedder, MultimodalTextEmbedder
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore, QdrantMultiVectorStore
from tests.helpers import COLORS, make_image, make_pdf


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


def _reference_scores(model: str, query: str, store: InMemoryMultiVectorStore, ids: list[str]) -> np.ndarray:
    """MaxSim computed independently with colpali-engine's own scorer, one page at a time."""
    encoder = LateInteractionEncoder.get(
        LoadSpec(model=model, component="t", device="cpu", token=None, local_files_only=True, model_kwargs=None)
    )
    with torch.inference_mode():
        batch = encoder.processor.process_queries(texts=[query])
        q = encoder.model(**batch)[0]
    q = q[batch["attention_mask"][0].bool()].float()
    pages = store.get(ids)
    return np.array(
        [
            float(encoder.processor.score_multi_vector([q], [torch.from_numpy(pages[i].astype(np.float32))])[0, 0])
            for i in ids
        ]
    )


def test_ranking_equals_reference_maxsim_from_colpali_engine(tiny_colqwen2: str, pages_dir: Path) -> None:
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store)["documents"]
    query = "a bar chart of quarterly revenue"
    out = ColPaliRanker(tiny_colqwen2, multivector_store=store, top_k=len(docs)).run(query=query, documents=docs)
    ranked = out["documents"]
    reference = _reference_scores(tiny_colqwen2, query, store, [d.id for d in docs])
    expected_order = [docs[i].id for i in np.argsort(-reference, kind="stable")]
    assert [d.id for d in ranked] == expected_order
    by_id = dict(zip([d.id for d in docs], reference, strict=True))
    n_tokens = len(ColPaliTextEmbedder(tiny_colqwen2).run(text=query)["multivector_embedding"])
    for doc in ranked:
        assert doc.meta["late_interaction_score"] == pytest.approx(by_id[doc.id], rel=1e-4)
        assert doc.score == pytest.approx(by_id[doc.id] / n_tokens, rel=1e-4)
        assert doc.meta["dense_score"] == next(d.score for d in docs if d.id == doc.id)


def test_stored_and_on_the_fly_paths_give_identical_scores(tiny_colqwen2: str, pages_dir: Path) -> None:
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store)["documents"]
    query = "the system architecture diagram"
    stored = ColPaliRanker(tiny_colqwen2, multivector_store=store, top_k=20).run(query=query, documents=docs)
    fly = ColPaliRanker(tiny_colqwen2, top_k=20).run(query=query, documents=docs)
    assert [d.id for d in stored["documents"]] == [d.id for d in fly["documents"]]
    assert [d.score for d in stored["documents"]] == [d.score for d in fly["documents"]]


def test_on_the_fly_pages_are_cached(tiny_colqwen2: str, pages_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ranker = ColPaliRanker(tiny_colqwen2, cache_size=3)
    ranker.warm_up()
    calls: list[int] = []
    real = ranker._encoder.embed_images

    def counting(images, **kwargs):
        calls.append(len(images))
        return real(images, **kwargs)

    monkeypatch.setattr(ranker._encoder, "embed_images", counting)
    docs = _page_docs(pages_dir)[:3]
    ranker.run(query="first", documents=docs)
    ranker.run(query="second", documents=docs)
    assert sum(calls) == 3
    ranker.run(query="third", documents=_page_docs(pages_dir)[3:5])
    assert len(ranker._cache) == 3


def test_text_and_unreadable_candidates_keep_their_score_and_are_named(
    tiny_colqwen2: str, pages_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = InMemoryMultiVectorStore()
    pages = _embed_pages(tiny_colqwen2, _page_docs(pages_dir)[:2], store)["documents"]
    text = Document(content="a text passage", score=0.9)
    ghost = Document(id="ghost", meta={"modality": "image"}, score=0.05)
    missing = Document(id="gone", meta={"file_path": str(pages_dir / "nope.png")}, score=0.01)
    with caplog.at_level(logging.WARNING):
        out = ColPaliRanker(tiny_colqwen2, multivector_store=store, top_k=10).run(
            query="q", documents=[*pages, text, ghost, missing]
        )
    got = {d.id: d for d in out["documents"]}
    assert len(got) == 5
    assert got[text.id].score == 0.9
    assert "late_interaction_score" not in got[text.id].meta
    assert got["ghost"].score == 0.05
    assert got["gone"].score == 0.01
    assert "'ghost'" in caplog.text
    assert "'gone'" in caplog.text
    assert text.id not in caplog.text


def test_top_k_and_threshold_overrides_use_explicit_none_checks(tiny_colqwen2: str, pages_dir: Path) -> None:
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store)["documents"]
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store, top_k=3)
    assert len(ranker.run(query="q", documents=docs)["documents"]) == 3
    assert len(ranker.run(query="q", documents=docs, top_k=100)["documents"]) == len(docs)
    assert ranker.run(query="q", documents=docs, top_k=0)["documents"] == []
    all_scores = [d.score for d in ranker.run(query="q", documents=docs, top_k=100)["documents"]]
    cut = sorted(all_scores)[len(all_scores) // 2]
    kept = ranker.run(query="q", documents=docs, top_k=100, score_threshold=cut)["documents"]
    assert [d.score for d in kept] == [s for s in all_scores if s >= cut]
    assert ranker.run(query="q", documents=[])["documents"] == []
    with pytest.raises(ValueError, match="top_k"):
        ranker.run(query="q", documents=docs, top_k=-1)


def test_stored_vector_of_wrong_dim_is_a_clear_error(tiny_colqwen2: str) -> None:
    store = InMemoryMultiVectorStore()
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store)
    ranker.warm_up()  # binds the model; the store is still empty
    store.write({"odd-page": np.ones((5, 32))})
    with pytest.raises(MultiVectorStoreError, match=r"store holds vectors of dim 32.*has dim 128"):
        ranker.run(query="q", documents=[Document(id="odd-page", content="x")])


def test_ranker_does_not_mutate_input(tiny_colqwen2: str, pages_dir: Path) -> None:
    docs = _page_docs(pages_dir)[:2]
    before = copy.deepcopy(docs)
    ColPaliRanker(tiny_colqwen2).run(query="q", documents=docs)
    assert docs == before


def test_colpali_ranker_uses_qdrant_server_side_scoring(tiny_colqwen2: str, pages_dir: Path, tmp_path: Path) -> None:
    qdrant = QdrantMultiVectorStore(location=":memory:")
    memory = InMemoryMultiVectorStore()
    docs = _page_docs(pages_dir)
    _embed_pages(tiny_colqwen2, docs, qdrant)
    _embed_pages(tiny_colqwen2, docs, memory)
    a = ColPaliRanker(tiny_colqwen2, multivector_store=qdrant, top_k=20).run(query="revenue", documents=docs)
    b = ColPaliRanker(tiny_colqwen2, multivector_store=memory, top_k=20).run(query="revenue", documents=docs)
    assert [d.id for d in a["documents"]] == [d.id for d in b["documents"]]
    for x, y in zip(a["documents"], b["documents"], strict=True):
        assert x.score == pytest.approx(y.score, rel=1e-3)


def test_components_round_trip_through_to_dict(tiny_colqwen2: str, tmp_path: Path) -> None:
    store = QdrantMultiVectorStore(path=str(tmp_path / "q"), collection="pages", dim=128, dtype="float32")
    kwargs = {
        "device": ComponentDevice.from_str("cpu"),
        "token": Secret.from_env_var("X_TOKEN", strict=False),
        "local_files_only": True,
        "model_kwargs": {"attn_implementation": "sdpa"},
    }
    for component in (
        ColPaliDocumentEmbedder(
            tiny_colqwen2,
            multivector_store=store,
            batch_size=2,
            pool_factor=3,
            progress_bar=False,
            on_error="skip",
            root_path="/r",
            file_path_meta_field="path",
            **kwargs,
        ),
        ColPaliTextEmbedder(tiny_colqwen2, **kwargs),
        ColPaliRanker(
            tiny_colqwen2,
            multivector_store=store,
            top_k=0,
            score_threshold=0.25,
            normalize_scores=False,
            batch_size=2,
            cache_size=0,
            root_path="/r",
            file_path_meta_field="path",
            **kwargs,
        ),
        ColPaliRanker(tiny_colqwen2),
    ):
        data = component.to_dict()
        restored = type(component).from_dict(copy.deepcopy(data))
        assert restored.to_dict() == data


def test_yaml_round_trip_of_text_embedder_retriever_colpali_ranker(
    tiny_siglip: str, tiny_colqwen2: str, pages_dir: Path
) -> None:
    doc_store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    mv_store = InMemoryMultiVectorStore()
    docs = MultimodalDocumentEmbedder(tiny_siglip, progress_bar=False).run(
        [*_page_docs(pages_dir), Document(content="quarterly revenue table")]
    )["documents"]
    docs = _embed_pages(tiny_colqwen2, docs, mv_store)["documents"]
    doc_store.write_documents(docs)

    pipe = Pipeline()
    pipe.add_component("text_embedder", MultimodalTextEmbedder(tiny_siglip))
    pipe.add_component("retriever", InMemoryEmbeddingRetriever(doc_store, top_k=100))
    pipe.add_component("ranker", ColPaliRanker(tiny_colqwen2, multivector_store=mv_store, top_k=4))
    pipe.connect("text_embedder.embedding", "retriever.query_embedding")
    pipe.connect("retriever.documents", "ranker.documents")
    query = "which page shows the revenue chart"
    before = pipe.run({"text_embedder": {"text": query}, "ranker": {"query": query}})

    restored = Pipeline.loads(pipe.dumps())
    ranker = restored.get_component("ranker")
    assert isinstance(ranker.multivector_store, InMemoryMultiVectorStore)
    assert ranker.multivector_store.count() == mv_store.count()
    after = restored.run({"text_embedder": {"text": query}, "ranker": {"query": query}})
    ids_before = [d.id for d in before["ranker"]["documents"]]
    assert [d.id for d in after["ranker"]["documents"]] == ids_before
    assert len(ids_before) == 4
    assert [d.score for d in after["ranker"]["documents"]] == [d.score for d in before["ranker"]["documents"]]
