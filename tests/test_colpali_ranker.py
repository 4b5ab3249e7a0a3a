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
from haystack_integrations.document_stores.multivector import (
    InMemoryMultiVectorStore,
    QdrantMultiVectorStore,
    SQLiteMultiVectorStore,
)
from tests.colpali_fixtures import check_kept_until_the_store_changes as _check_kept_until_the_store_changes
from tests.colpali_fixtures import embed_pages as _embed_pages
from tests.colpali_fixtures import page_docs as _page_docs
from tests.helpers import make_image

#: Tests that compare with a float32 CPU reference or fake a device pin the CPU (the default is the best device).
CPU = ComponentDevice.from_str("cpu")


def _reference_scores(model: str, query: str, store: InMemoryMultiVectorStore, ids: list[str]) -> np.ndarray:
    """MaxSim computed independently with colpali-engine's own scorer, one page at a time."""
    encoder = LateInteractionEncoder.get(
        LoadSpec(model=model, component="t", device="cpu", token=None, local_files_only=True, model_kwargs=None)
    )
    with torch.inference_mode():
        # The training recipe's query: the family's trained prefix (e.g. "Query: ") + query + 10 augmentation tokens.
        batch = encoder.processor.process_queries(texts=[encoder.default_query_prefix + query])
        q = encoder.model(**batch)[0]
    q = q[batch["attention_mask"][0].bool()].float()
    pages = store.get(ids)
    return np.array(
        [
            float(encoder.processor.score_multi_vector([q], [torch.from_numpy(pages[i].astype(np.float32))])[0, 0])
            for i in ids
        ]
    )


def _sqlite_pages(
    model: str, pages_dir: Path, tmp_path: Path, *, pages: int | None = None
) -> tuple[str, SQLiteMultiVectorStore, list[Document]]:
    """A SQLite store at `tmp_path/mv.sqlite` holding the embedded test pages (the first `pages` of them)."""
    path = str(tmp_path / "mv.sqlite")
    store = SQLiteMultiVectorStore(path)
    return path, store, _embed_pages(model, _page_docs(pages_dir)[:pages], store)["documents"]


def test_ranking_equals_reference_maxsim_from_colpali_engine(tiny_colqwen2: str, pages_dir: Path) -> None:
    # On the CPU throughout, like the float32 reference (on a GPU the model runs in bfloat16).
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store, device=CPU)["documents"]
    query = "a bar chart of quarterly revenue"
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store, top_k=len(docs), device=CPU)
    out = ranker.run(query=query, documents=docs)
    ranked = out["documents"]
    reference = _reference_scores(tiny_colqwen2, query, store, [d.id for d in docs])
    expected_order = [docs[i].id for i in np.argsort(-reference, kind="stable")]
    assert [d.id for d in ranked] == expected_order
    by_id = dict(zip([d.id for d in docs], reference, strict=True))
    n_tokens = len(ColPaliTextEmbedder(tiny_colqwen2, device=CPU).run(text=query)["multivector_embedding"])
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


def test_pages_missing_from_the_given_store_are_warned_about_once(
    tiny_colqwen2: str, pages_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A ranker pointed at an empty store (a mistyped path, indexing that skipped ColPali) encoded every page at
    # query time without a word: correct results, silently slow.
    empty = SQLiteMultiVectorStore(tmp_path / "typo.sqlite")
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=empty)
    docs = _page_docs(pages_dir)[:3]
    with caplog.at_level(logging.WARNING):
        ranker.run(query="q", documents=docs)
        ranker.run(query="again", documents=docs)
    warnings = [r.getMessage() for r in caplog.records if "no vectors in the multi-vector store" in r.getMessage()]
    assert len(warnings) == 1
    assert "3 image/page candidate(s)" in warnings[0]
    assert str(tmp_path / "typo.sqlite") in warnings[0]
    assert "ColPaliDocumentEmbedder" in warnings[0]

    # Stored pages, and a ranker without a store (read-through is its documented mode), say nothing.
    caplog.clear()
    store = InMemoryMultiVectorStore()
    stored = _embed_pages(tiny_colqwen2, docs, store)["documents"]
    with caplog.at_level(logging.WARNING):
        ColPaliRanker(tiny_colqwen2, multivector_store=store).run(query="q", documents=stored)
        ColPaliRanker(tiny_colqwen2).run(query="q", documents=docs)
        # Text candidates never have page vectors: a store is not "missing" them.
        ColPaliRanker(tiny_colqwen2, multivector_store=InMemoryMultiVectorStore()).run(
            query="q", documents=[Document(content="a text candidate", score=0.5)]
        )
    assert "no vectors in the multi-vector store" not in caplog.text


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
            device_cache_mb=64,
            host_cache_mb=32,
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


def test_query_multivector_embedding_is_used_instead_of_encoding_the_query(
    tiny_colqwen2: str, pages_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store)["documents"]
    query = "the revenue chart"
    by_text = ColPaliRanker(tiny_colqwen2, multivector_store=store).run(query=query, documents=docs)["documents"]
    embedding = ColPaliTextEmbedder(tiny_colqwen2).run(text=query)["multivector_embedding"]
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store)
    ranker.warm_up()

    def no_encoding(*args, **kwargs):
        raise AssertionError("the query was encoded again")

    monkeypatch.setattr(ranker._encoder, "embed_queries", no_encoding)
    by_embedding = ranker.run(documents=docs, query_multivector_embedding=embedding)["documents"]
    assert [d.id for d in by_embedding] == [d.id for d in by_text]
    for a, b in zip(by_embedding, by_text, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-5)
        assert a.meta["late_interaction_score"] == pytest.approx(b.meta["late_interaction_score"], rel=1e-5)


def test_one_colpali_text_embedding_feeds_the_ranker_in_a_pipeline(tiny_colqwen2: str, pages_dir: Path) -> None:
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store)["documents"]
    pipe = Pipeline()
    pipe.add_component("query_embedder", ColPaliTextEmbedder(tiny_colqwen2))
    pipe.add_component("ranker", ColPaliRanker(tiny_colqwen2, multivector_store=store))
    pipe.connect("query_embedder.multivector_embedding", "ranker.query_multivector_embedding")
    out = pipe.run({"query_embedder": {"text": "revenue"}, "ranker": {"documents": docs}})
    direct = ColPaliRanker(tiny_colqwen2, multivector_store=store).run(query="revenue", documents=docs)
    assert [d.id for d in out["ranker"]["documents"]] == [d.id for d in direct["documents"]]
    restored = Pipeline.loads(pipe.dumps())
    again = restored.run({"query_embedder": {"text": "revenue"}, "ranker": {"documents": docs}})
    assert [d.score for d in again["ranker"]["documents"]] == [d.score for d in out["ranker"]["documents"]]


@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        ([[0.1] * 64, [0.2] * 64], "dim 64"),
        ([[0.1] * 128, [float("nan")] * 128], "NaN"),
        ([], "non-empty"),
        ([[0.1] * 128, [0.2] * 3], "equal-length"),
    ],
)
def test_a_malformed_query_embedding_is_a_clear_error(tiny_colqwen2: str, embedding: list, message: str) -> None:
    ranker = ColPaliRanker(tiny_colqwen2)
    ranker.warm_up()
    with pytest.raises(ValueError, match=message):
        ranker.run(documents=[Document(content="x")], query_multivector_embedding=embedding)


def test_a_query_embedding_of_another_width_is_named_also_when_pages_are_encoded_on_the_fly(
    tiny_colqwen2: str, pages_dir: Path
) -> None:
    # An empty store records no width and the ranker is not warmed up: the mismatch was found only inside MaxSim,
    # as "page 0 has vectors of dim 128 but the query has dim 32", naming neither the component nor the input.
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=InMemoryMultiVectorStore())
    dense_like = [[0.1] * 32]  # what a dense embedder's `embedding` becomes on this socket (Haystack wraps it)
    with pytest.raises(ValueError, match=r"query_multivector_embedding has vectors of dim 32.*ColPaliTextEmbedder"):
        ranker.run(documents=_page_docs(pages_dir), query_multivector_embedding=dense_like)


def test_without_query_or_embedding_the_ranker_says_so(tiny_colqwen2: str) -> None:
    with pytest.raises(ValueError, match="query"):
        ColPaliRanker(tiny_colqwen2).run(documents=[Document(content="x")])


def test_by_default_every_candidate_passes_so_text_is_not_cut_against_pages(
    tiny_colqwen2: str, pages_dir: Path
) -> None:
    store = InMemoryMultiVectorStore()
    pages = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store)["documents"]
    texts = [Document(content=f"passage {i}", score=0.1 * i) for i in range(12)]
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store)
    assert ranker.top_k is None
    out = ranker.run(query="q", documents=[*texts, *pages])["documents"]
    assert {d.id for d in out} == {d.id for d in [*texts, *pages]}
    assert ColPaliRanker.from_dict(ranker.to_dict()).top_k is None


def test_top_k_and_threshold_return_exactly_the_head_of_the_full_ranking_and_leave_inputs_alone(
    tiny_colqwen2: str,
) -> None:
    # The ranker selects on the new scores before building Documents for the kept candidates only: what it returns
    # must be the full ranking's head (ids, scores, meta), ties in incoming order, unscored candidates last.
    rng = np.random.default_rng(40)
    n_pages, dim = 120, 128
    pages = {f"page-{i:03d}": rng.standard_normal((3 + i % 5, dim)).astype(np.float32) for i in range(n_pages)}
    best = rng.standard_normal((4, dim)).astype(np.float32) * 10
    pages["page-007"] = pages["page-003"] = best  # a tie for first place: page-003 comes later in the input
    store = InMemoryMultiVectorStore(dtype="float32")
    store.write(pages)
    docs = [Document(id=doc_id, meta={"modality": "page", "n": i}, score=i / 1000) for i, doc_id in enumerate(pages)]
    docs[7], docs[3] = docs[3], docs[7]  # page-007 now precedes page-003
    # Text candidates keep their incoming score; those without one rank last.
    docs += [Document(content=f"passage {i}", meta={"modality": "text"}, score=[0.2, None][i % 2]) for i in range(20)]
    before = copy.deepcopy(docs)
    query = rng.standard_normal((6, dim)).astype(np.float32).tolist()
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store, device=CPU)
    full = ranker.run(documents=docs, query_multivector_embedding=query)["documents"]
    assert len(full) == len(docs)
    assert [d.id for d in full[:2]] == ["page-007", "page-003"]
    assert full[-1].score is None

    def summary(ranked: list[Document]) -> list[tuple[str, float | None, dict]]:
        return [(d.id, d.score, d.meta) for d in ranked]

    top2 = ranker.run(documents=docs, query_multivector_embedding=query, top_k=2)["documents"]
    assert summary(top2) == summary(full[:2])
    cut = full[40].score
    assert cut is not None
    above = [d for d in full if d.score is not None and d.score >= cut]
    for top_k in (2, None):
        kept = ranker.run(documents=docs, query_multivector_embedding=query, top_k=top_k, score_threshold=cut)
        assert summary(kept["documents"]) == summary(above if top_k is None else above[:top_k])
    assert ranker.run(documents=docs, query_multivector_embedding=query, top_k=2, score_threshold=1e9) == {
        "documents": []
    }
    assert docs == before  # not mutated
    assert [d.meta for d in docs] == [d.meta for d in before]
    assert all(out is not doc for out in [*full, *top2] for doc in docs)


def test_read_through_pages_are_pooled_like_the_stored_ones(
    tiny_colqwen2: str, pages_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = _page_docs(pages_dir)
    pooled_store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, docs, pooled_store, pool_factor=2)["documents"]
    pooled_store.bind_pool_factor(2)  # what the indexing run records (ColPaliDocumentEmbedder's pool_factor)
    empty_store = InMemoryMultiVectorStore()
    empty_store.bind_pool_factor(2)
    stored = ColPaliRanker(tiny_colqwen2, multivector_store=pooled_store).run(query="chart", documents=docs)
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=empty_store)
    ranker.warm_up()
    factors: list[int | None] = []
    real = ranker._encoder.embed_images

    def spy(images, **kwargs):
        factors.append(kwargs.get("pool_factor"))
        return real(images, **kwargs)

    monkeypatch.setattr(ranker._encoder, "embed_images", spy)
    read_through = ranker.run(query="chart", documents=docs)
    assert factors
    assert set(factors) == {2}
    assert [d.id for d in read_through["documents"]] == [d.id for d in stored["documents"]]
    for a, b in zip(read_through["documents"], stored["documents"], strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-5)
        assert ranker._cache.get(ranker._cache_key(a)).shape == pooled_store.get([a.id])[a.id].shape


def test_the_embedder_records_its_pool_factor_so_a_page_missing_from_the_store_scores_the_same(
    tiny_colqwen2: str, pages_dir: Path
) -> None:
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store, pool_factor=3)["documents"]
    assert store.pool_factor == 3  # recorded by ColPaliDocumentEmbedder, nobody bound it by hand
    before = ColPaliRanker(tiny_colqwen2, multivector_store=store).run(query="chart", documents=docs)
    missing = docs[0].id
    store.delete([missing])
    after = ColPaliRanker(tiny_colqwen2, multivector_store=store).run(query="chart", documents=docs)
    scores_before = {d.id: d.score for d in before["documents"]}
    scores_after = {d.id: d.score for d in after["documents"]}
    assert scores_after[missing] == pytest.approx(scores_before[missing], rel=1e-5)


def test_a_corrupt_stored_page_with_nan_never_ranks_first(
    tiny_colqwen2: str, pages_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    path, store, docs = _sqlite_pages(tiny_colqwen2, pages_dir, tmp_path)
    victim = docs[3]
    # Write around the store's validation, as disk corruption or another writer would: every value NaN.
    n = store.get([victim.id])[victim.id].shape[0]
    nan_blob = np.full((n, 128), np.nan, dtype=np.float16).tobytes()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE mv_vectors SET data = ? WHERE id = ?", (nan_blob, victim.id))
    store.close()
    assert not np.isfinite(store.score(np.ones((2, 128)), [victim.id])[victim.id])
    with caplog.at_level(logging.WARNING):
        out = ColPaliRanker(tiny_colqwen2, multivector_store=store).run(query="chart", documents=docs)["documents"]
    assert out[-1].id == victim.id
    assert out[-1].score is None
    assert "late_interaction_score" not in out[-1].meta
    assert all(d.score is not None for d in out[:-1])
    assert f"'{victim.id}'" in caplog.text
    assert "not finite" in caplog.text


def test_query_prefix_is_passed_to_an_encoder_that_supports_it(
    tiny_colqwen2: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import inspect

    supported = "query_prefix" in inspect.signature(LateInteractionEncoder.embed_queries).parameters
    if not supported:
        with pytest.raises(ValueError, match="query_prefix"):
            ColPaliRanker(tiny_colqwen2, query_prefix="Query: ")
        return
    ranker = ColPaliRanker(tiny_colqwen2, query_prefix="Query: ")
    assert ColPaliRanker.from_dict(ranker.to_dict()).query_prefix == "Query: "
    ranker.warm_up()
    seen: list[object] = []
    real = ranker._encoder.embed_queries

    def spy(texts, **kwargs):
        seen.append(kwargs.get("query_prefix"))
        return real(texts, **kwargs)

    monkeypatch.setattr(ranker._encoder, "embed_queries", spy)
    ranker.run(query="q", documents=[Document(content="x")])
    assert seen == ["Query: "]


class _OwnStore(InMemoryMultiVectorStore):
    """A store of another type: the ranker leaves its scoring to its own `score`."""


def test_on_a_gpu_model_the_store_scores_on_the_models_device(
    tiny_colqwen2: str, pages_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _OwnStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir)[:3], store, device=CPU)["documents"]
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store, device=CPU)
    ranker.warm_up()
    devices: list[object] = []
    real = store.score

    def spy(query, ids, *, device=None):
        devices.append(device)
        return real(query, ids, device="cpu")  # no GPU on the test machine: the plumbing is what is tested

    monkeypatch.setattr(store, "score", spy)
    on_cpu = ranker.run(query="q", documents=docs)["documents"]
    embedding = ColPaliTextEmbedder(tiny_colqwen2, device=CPU).run(text="q")["multivector_embedding"]
    monkeypatch.setattr(ranker._encoder, "device", "cuda:0")  # the model "moved" to a GPU
    on_gpu = ranker.run(documents=docs, query_multivector_embedding=embedding)["documents"]
    assert devices == [None, "cuda:0"]
    assert [d.score for d in on_gpu] == pytest.approx([d.score for d in on_cpu], rel=1e-5)


def test_an_edited_page_file_is_encoded_again_not_served_from_the_cache(tiny_colqwen2: str, tmp_path: Path) -> None:
    import os

    page = make_image(tmp_path / "slide.png", color="red")
    doc = Document(id="slide", meta={"file_path": str(page)})
    ranker = ColPaliRanker(tiny_colqwen2)
    first = ranker.run(query="chart", documents=[doc])["documents"][0].score
    again = ranker.run(query="chart", documents=[doc])["documents"][0].score
    assert again == first  # served from the cache
    make_image(page, color="blue")  # same path, same id, new pixels
    stat = page.stat()
    os.utime(page, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000_000))
    edited = ranker.run(query="chart", documents=[doc])["documents"][0].score
    assert edited != pytest.approx(first, rel=1e-6)


def test_processor_kwargs_reach_the_ranker_s_encoder_and_round_trip(tiny_colqwen2: str) -> None:
    from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec

    ranker = ColPaliRanker(tiny_colqwen2, processor_kwargs={"max_num_visual_tokens": 4})
    assert LoadSpec.of(ranker).processor_kwargs == {"max_num_visual_tokens": 4}
    restored = ColPaliRanker.from_dict(ranker.to_dict())
    assert restored.processor_kwargs == {"max_num_visual_tokens": 4}
    with pytest.raises(TypeError, match="processor_kwargs"):
        ColPaliRanker(tiny_colqwen2, processor_kwargs="max_pixels=4")  # type: ignore[arg-type]


def _staging_on_cpu(ranker: ColPaliRanker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the GPU path (fetch and stage while the query encodes, then `maxsim_staged`) on the CPU."""
    monkeypatch.setattr(ranker, "_overlap_device", lambda: torch.device("cpu"))


def test_the_gpu_path_fetches_in_the_background_and_scores_like_the_store(
    tiny_colqwen2: str, pages_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    for store in (InMemoryMultiVectorStore(), SQLiteMultiVectorStore(str(tmp_path / "mv.sqlite"))):
        docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store)["documents"]
        docs = [*docs, Document(id="no-vectors", content="text")]
        ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store)
        expected = ranker.run(query="chart", documents=docs)["documents"]
        _staging_on_cpu(ranker, monkeypatch)
        fetch_threads: list[str] = []
        real_get = store.get

        def get(ids, real_get=real_get, fetch_threads=fetch_threads):
            fetch_threads.append(threading.current_thread().name)
            return real_get(ids)

        def no_score(*args, **kwargs):
            raise AssertionError("the GPU path scores the fetched pages itself")

        monkeypatch.setattr(store, "get", get)
        monkeypatch.setattr(store, "score", no_score)
        out = ranker.run(query="chart", documents=docs)["documents"]
        assert [d.id for d in out] == [d.id for d in expected]
        assert out[-1].id == "no-vectors"
        assert out[-1].score is None
        assert "late_interaction_score" not in out[-1].meta
        assert [d.score for d in out[:-1]] == pytest.approx([d.score for d in expected[:-1]], rel=1e-5)
        assert [d.meta["late_interaction_score"] for d in out[:-1]] == pytest.approx(
            [d.meta["late_interaction_score"] for d in expected[:-1]], rel=1e-5
        )
        assert fetch_threads
        assert all(name.startswith("colpali-ranker-fetch") for name in fetch_threads)
        monkeypatch.undo()


def test_the_gpu_path_with_a_given_query_embedding_scores_like_the_store(
    tiny_colqwen2: str, pages_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir)[:3], store)["documents"]
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store)
    ranker.warm_up()
    embedding = ColPaliTextEmbedder(tiny_colqwen2).run(text="q")["multivector_embedding"]
    expected = ranker.run(documents=docs, query_multivector_embedding=embedding)["documents"]
    _staging_on_cpu(ranker, monkeypatch)
    out = ranker.run(documents=docs, query_multivector_embedding=embedding)["documents"]
    assert [d.score for d in out] == pytest.approx([d.score for d in expected], rel=1e-5)


def test_the_gpu_path_raises_the_store_s_errors_unchanged(
    tiny_colqwen2: str, pages_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    path, store, docs = _sqlite_pages(tiny_colqwen2, pages_dir, tmp_path, pages=3)
    with sqlite3.connect(path) as conn:  # a truncated blob: corruption the store reports by document id
        conn.execute("UPDATE mv_vectors SET data = ? WHERE id = ?", (b"\0" * 6, docs[1].id))
    store.close()
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store)
    with pytest.raises(MultiVectorStoreError) as today:
        ranker.run(query="chart", documents=docs)
    _staging_on_cpu(ranker, monkeypatch)
    with pytest.raises(MultiVectorStoreError) as staged:
        ranker.run(query="chart", documents=docs)
    assert str(staged.value) == str(today.value)
    assert docs[1].id in str(staged.value)


def test_the_gpu_path_refuses_a_query_that_is_not_finite_like_the_store(
    tiny_colqwen2: str, pages_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir)[:3], store)["documents"]
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store)
    ranker.warm_up()
    assert ranker._encoder is not None
    nan_query = np.full((4, 128), np.nan, dtype=np.float32)
    monkeypatch.setattr(ranker._encoder, "embed_queries", lambda texts, **kwargs: [nan_query])
    monkeypatch.setattr(ranker._encoder, "embed_query_tensor", lambda text, **kwargs: torch.from_numpy(nan_query))
    with pytest.raises(MultiVectorStoreError, match="contains NaN or infinite values") as today:
        ranker.run(query="chart", documents=docs)
    _staging_on_cpu(ranker, monkeypatch)
    with pytest.raises(MultiVectorStoreError) as staged:
        ranker.run(query="chart", documents=docs)
    assert str(staged.value) == str(today.value)


def test_a_query_encoded_on_the_device_equals_the_host_copy(tiny_colqwen2: str) -> None:
    encoder = LateInteractionEncoder.get(
        LoadSpec(model=tiny_colqwen2, component="t", device="cpu", token=None, local_files_only=True, model_kwargs=None)
    )
    for prefix in (None, ""):
        on_device = encoder.embed_query_tensor("a bar chart", query_prefix=prefix)
        assert isinstance(on_device, torch.Tensor)
        host = encoder.embed_queries(["a bar chart"], query_prefix=prefix)[0]
        np.testing.assert_array_equal(on_device.float().numpy(), host)


def test_the_gpu_path_keeps_ranked_pages_on_the_device_until_the_store_changes(
    tiny_colqwen2: str, pages_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, store, docs = _sqlite_pages(tiny_colqwen2, pages_dir, tmp_path)
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store)
    expected = ranker.run(query="chart", documents=docs)["documents"]
    _staging_on_cpu(ranker, monkeypatch)
    asked = _check_kept_until_the_store_changes(ranker, path, docs, expected, monkeypatch)
    no_cache = ColPaliRanker(tiny_colqwen2, multivector_store=store, device_cache_mb=0)
    _staging_on_cpu(no_cache, monkeypatch)
    asked.clear()
    no_cache.run(query="chart", documents=docs)
    no_cache.run(query="chart", documents=docs)
    assert len(asked) == 2 * len(docs)
    with pytest.raises(ValueError, match="device_cache_mb"):
        ColPaliRanker(tiny_colqwen2, device_cache_mb=-1)


def test_on_a_cpu_ranked_sqlite_pages_are_kept_in_memory_until_the_store_changes(
    tiny_colqwen2: str, pages_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, store, docs = _sqlite_pages(tiny_colqwen2, pages_dir, tmp_path)
    expected = ColPaliRanker(tiny_colqwen2, multivector_store=store).run(query="chart", documents=docs)["documents"]
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store, host_cache_mb=64)
    asked: list[str] = []
    scored: list[int] = []
    real_get, real_score = store.get, store.score
    monkeypatch.setattr(store, "get", lambda ids: (asked.extend(ids), real_get(ids))[1])
    monkeypatch.setattr(store, "score", lambda *a, **k: (scored.append(1), real_score(*a, **k))[1])
    for _ in range(2):
        out = ranker.run(query="chart", documents=docs)["documents"]
        assert [d.id for d in out] == [d.id for d in expected]
        assert [d.score for d in out] == pytest.approx([d.score for d in expected], rel=1e-5)
    assert sorted(asked) == sorted(d.id for d in docs)  # fetched once: the second query read no blob
    assert scored == []  # scored by the kernel on the cached arrays, not by store.score
    best, worst = expected[0].id, expected[-1].id
    other = SQLiteMultiVectorStore(path)
    other.write({best: other.get([worst])[worst]})  # another connection re-indexes the best page
    other.close()
    changed = {d.id: d.score for d in ranker.run(query="chart", documents=docs)["documents"]}
    assert changed[best] == pytest.approx(changed[worst], rel=1e-5)
    off = ColPaliRanker(tiny_colqwen2, multivector_store=store)
    off.run(query="chart", documents=docs)
    assert scored == [1]  # host_cache_mb=0 (the default): store.score, as before


def test_on_a_cpu_the_in_memory_store_is_not_cached_its_get_is_free(tiny_colqwen2: str, pages_dir: Path) -> None:
    store = InMemoryMultiVectorStore()
    docs = _embed_pages(tiny_colqwen2, _page_docs(pages_dir), store)["documents"]
    ranker = ColPaliRanker(tiny_colqwen2, multivector_store=store, host_cache_mb=64)
    ranker.run(query="chart", documents=docs)
    assert ranker._host_cache is not None
    assert len(ranker._host_cache) == 0
    with pytest.raises(ValueError, match="host_cache_mb"):
        ColPaliRanker(tiny_colqwen2, host_cache_mb=-1)
