from __future__ import annotations

import copy
import json
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
    detect_family,
    family_from_config,
)
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.common.multimodal_rag.errors import (
    DocumentProcessingError,
    ModelLoadError,
    MultiVectorStoreError,
)
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder, ColPaliTextEmbedder
from haystack_integrations.components.embedders.multimodal import MultimodalDocumentEmbedder, MultimodalTextEmbedder
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore, QdrantMultiVectorStore
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


# --- model family detection ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"architectures": ["ColQwen2_5"], "model_type": "qwen2_5_vl"}, "ColQwen2_5"),
        ({"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"}, "ColQwen2"),
        ({"architectures": ["ColPali"], "model_type": "paligemma"}, "ColPali"),
        ({"model_type": "idefics3"}, "ColIdefics3"),
        ({"architectures": ["MyRenamedRetriever"], "model_type": "qwen2_5_vl"}, "ColQwen2_5"),
    ],
)
def test_family_comes_from_the_config_not_the_name(config: dict, expected: str) -> None:
    assert family_from_config(config, model="org/anything").model_class == expected


def test_unsupported_config_names_the_supported_families() -> None:
    with pytest.raises(ModelLoadError, match=r"not a ColPali-family checkpoint.*ColQwen2_5 \(qwen2_5_vl\)"):
        family_from_config({"architectures": ["BertModel"], "model_type": "bert"}, model="bert-base")


def test_peft_adapter_checkpoint_is_followed_to_its_base(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    family = detect_family(str(adapter), token=None, local_files_only=True, component="Test")
    assert family.model_class == "ColQwen2_5"


def test_a_peft_adapter_checkpoint_loads_through_the_components_and_applies(
    tiny_colqwen2_5: str, tmp_path: Path
) -> None:
    from haystack_integrations.testing.multimodal_rag.tiny_models import build_tiny_colpali_adapter

    adapter = build_tiny_colpali_adapter(tmp_path / "adapter", tiny_colqwen2_5)
    assert not (adapter / "config.json").exists()
    with_adapter = ColPaliTextEmbedder(str(adapter)).run(text="hello")["multivector_embedding"]
    base = ColPaliTextEmbedder(tiny_colqwen2_5).run(text="hello")["multivector_embedding"]
    assert np.asarray(with_adapter).shape == np.asarray(base).shape
    assert not np.allclose(with_adapter, base)


def test_a_dual_encoder_is_refused_as_colpali_model(tiny_siglip: str) -> None:
    with pytest.raises(ModelLoadError, match="not a ColPali-family checkpoint"):
        ColPaliTextEmbedder(tiny_siglip).warm_up()


def test_missing_model_fails_in_warm_up_with_advice(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"local directory path|local path"):
        ColPaliTextEmbedder("org/not-cached-colpali", local_files_only=True).warm_up()


# --- document embedder ---------------------------------------------------------------------------


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


# --- text embedder -------------------------------------------------------------------------------


def test_text_embedder_uses_query_processing_with_augmentation_tokens(tiny_colqwen2: str) -> None:
    out = ColPaliTextEmbedder(tiny_colqwen2).run(text="which slide shows the forecast")
    vectors = out["multivector_embedding"]
    assert isinstance(vectors, list)
    assert all(isinstance(v, list) and len(v) == 128 for v in vectors)
    encoder = LateInteractionEncoder.get(
        LoadSpec(model=tiny_colqwen2, component="t", device="cpu", token=None, local_files_only=True, model_kwargs=None)
    )
    batch = encoder.processor.process_queries(texts=["which slide shows the forecast"])
    plain = encoder.processor.process_texts(texts=["which slide shows the forecast"])
    assert len(vectors) == int(batch["attention_mask"].sum())
    assert len(vectors) >= int(plain["attention_mask"].sum()) + 10  # 10 augmentation tokens


@pytest.mark.parametrize("bad", ["", "   \n"])
def test_empty_query_is_a_clear_error(tiny_colqwen2: str, bad: str) -> None:
    with pytest.raises(ValueError, match="empty query"):
        ColPaliTextEmbedder(tiny_colqwen2).run(text=bad)
    with pytest.raises(ValueError, match="empty query"):
        ColPaliRanker(tiny_colqwen2).run(query=bad, documents=[Document(content="x")])


# --- ranker --------------------------------------------------------------------------------------


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
    with pytest.raises(MultiVectorStoreError, match=r"'odd-page'.*dim 128"):
        ranker.run(query="q", documents=[Document(id="odd-page", content="x")])


def test_ranker_does_not_mutate_input(tiny_colqwen2: str, pages_dir: Path) -> None:
    docs = _page_docs(pages_dir)[:2]
    before = copy.deepcopy(docs)
    ColPaliRanker(tiny_colqwen2).run(query="q", documents=docs)
    assert docs == before


# --- Qdrant store ---------------------------------------------------------------------------------


def test_qdrant_local_store_round_trip_replace_persist_and_server_side_score(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = {f"doc-{i}": rng.standard_normal((20 + i, 128)).astype(np.float32) for i in range(5)}
    path = str(tmp_path / "qdrant")
    store = QdrantMultiVectorStore(path=path)
    assert store.write(vectors) == 5
    assert store.count() == 5
    got = store.get(["doc-0", "doc-3", "unknown"])
    assert set(got) == {"doc-0", "doc-3"}
    np.testing.assert_allclose(got["doc-3"], vectors["doc-3"].astype(np.float16), rtol=1e-3)
    replacement = rng.standard_normal((7, 128))
    store.write({"doc-0": replacement})
    assert store.count() == 5
    assert store.get(["doc-0"])["doc-0"].shape == (7, 128)
    store.delete(["doc-4", "never-there"])
    assert store.count() == 4

    query = rng.standard_normal((9, 128)).astype(np.float32)
    server = store.score(query, ["doc-0", "doc-1", "doc-2", "doc-3", "unknown"])
    from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim

    stored = store.get(list(server))
    client = dict(zip(stored, maxsim(query, list(stored.values())), strict=True))
    assert set(server) == {"doc-0", "doc-1", "doc-2", "doc-3"}
    for doc_id, value in server.items():
        assert value == pytest.approx(client[doc_id], rel=1e-3, abs=1e-3)
    store.close()

    reopened = QdrantMultiVectorStore(path=path)
    assert reopened.count() == 4
    assert reopened.get(["doc-0"])["doc-0"].shape == (7, 128)
    with pytest.raises(MultiVectorStoreError, match="created with dim 128"):
        QdrantMultiVectorStore(path=path, dim=64).count()
    with pytest.raises(MultiVectorStoreError, match="width 64"):
        reopened.write({"bad": np.ones((2, 64))})
    reopened.close()


def test_stores_and_document_store_share_one_embedded_qdrant_folder(tmp_path: Path) -> None:
    from haystack_integrations.document_stores.qdrant import QdrantDocumentStore

    path = str(tmp_path / "shared")
    doc_store_a = QdrantDocumentStore(path=path, embedding_dim=4)
    doc_store_b = QdrantDocumentStore(path=path, embedding_dim=4)
    mv_a = QdrantMultiVectorStore(path=path)
    mv_b = QdrantMultiVectorStore(path=path, collection="multivectors")
    doc_store_a.write_documents([Document(content="hello", embedding=[0.1, 0.2, 0.3, 0.4])])
    assert doc_store_b.count_documents() == 1
    mv_a.write({"p": np.ones((3, 128))})
    assert mv_b.count() == 1
    for closeable in (doc_store_a, doc_store_b, mv_a, mv_b):
        closeable.close()
    # Every user closed: the folder is free again for a fresh client.
    import qdrant_client

    fresh = qdrant_client.QdrantClient(path=path)
    assert fresh.count("multivectors").count == 1
    fresh.close()


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


# --- serialization ---------------------------------------------------------------------------------


def test_components_round_trip_through_to_dict(tiny_colqwen2: str, tmp_path: Path) -> None:
    store = QdrantMultiVectorStore(path=str(tmp_path / "q"), collection="pages", dim=128, datatype="float32")
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
