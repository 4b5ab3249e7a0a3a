"""The embedding-model guard: one model per dense index, checked once per store (InMemory and embedded Qdrant)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
from haystack.components.writers import DocumentWriter
from haystack.document_stores.in_memory import InMemoryDocumentStore

from haystack_integrations.common.multimodal_rag.errors import EmbeddingModelMismatchError
from haystack_integrations.components.embedders.multimodal import (
    MultimodalDocumentEmbedder,
    MultimodalImageEmbedder,
    MultimodalTextEmbedder,
)
from haystack_integrations.document_stores.qdrant import QdrantDocumentStore
from haystack_integrations.pipelines.multimodal_rag import load_pipeline
from haystack_integrations.testing.multimodal_rag.tiny_models import build_tiny_siglip
from tests.helpers import make_image


@pytest.fixture(scope="module")
def other_siglip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second tiny SigLIP: same architecture and size, different weights (a different model)."""
    return str(build_tiny_siglip(tmp_path_factory.mktemp("other") / "siglip_seed1", seed=1))


@pytest.fixture(params=["in_memory", "qdrant"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "in_memory":
        yield InMemoryDocumentStore(embedding_similarity_function="cosine")
        return
    qdrant = QdrantDocumentStore(path=str(tmp_path / "qdrant"), index="guard", embedding_dim=32, progress_bar=False)
    yield qdrant
    qdrant.close()


def _index(model: str, store, texts: list[str]) -> list[Document]:
    embedder = MultimodalDocumentEmbedder(model, progress_bar=False, document_store=store)
    docs = embedder.run([Document(content=t) for t in texts])["documents"]
    store.write_documents(docs)
    return docs


def test_writing_a_second_model_into_an_index_is_refused_naming_both(store, tiny_siglip: str, other_siglip: str):
    _index(tiny_siglip, store, ["a red square", "a bar chart"])
    embedder = MultimodalDocumentEmbedder(other_siglip, progress_bar=False, document_store=store)
    with pytest.raises(EmbeddingModelMismatchError) as info:
        embedder.warm_up()
    message = str(info.value)
    assert tiny_siglip in message
    assert other_siglip in message
    assert "2 of 2 documents" in message
    assert "NEW collection" in message
    with pytest.raises(EmbeddingModelMismatchError):
        embedder.run([Document(content="never embedded")])
    assert store.count_documents() == 2


def test_a_query_with_another_model_fails_naming_both_and_the_same_model_passes(
    store, tiny_siglip: str, other_siglip: str
):
    _index(tiny_siglip, store, ["a red square"])
    assert len(MultimodalTextEmbedder(tiny_siglip, document_store=store).run(text="red")["embedding"]) == 32
    wrong = MultimodalTextEmbedder(other_siglip, document_store=store)
    with pytest.raises(EmbeddingModelMismatchError) as info:
        wrong.run(text="red")
    assert tiny_siglip in str(info.value)
    assert other_siglip in str(info.value)
    assert "query" in str(info.value)


def test_a_copied_model_folder_is_the_same_model(store, tiny_siglip: str, tmp_path: Path):
    _index(tiny_siglip, store, ["a red square"])
    moved = str(shutil.copytree(tiny_siglip, tmp_path / "moved" / "siglip"))
    MultimodalTextEmbedder(moved, document_store=store).warm_up()
    more = MultimodalDocumentEmbedder(moved, progress_bar=False, document_store=store)
    store.write_documents(more.run([Document(content="another text")])["documents"])
    assert store.count_documents() == 2


def test_the_check_runs_once_per_store_not_per_query(store, tiny_siglip: str, monkeypatch: pytest.MonkeyPatch):
    _index(tiny_siglip, store, ["a red square"])
    calls: list[str] = []
    real = store.count_documents

    def counting() -> int:
        calls.append("count")
        return real()

    monkeypatch.setattr(store, "count_documents", counting)
    embedder = MultimodalTextEmbedder(tiny_siglip, document_store=store)
    for i in range(5):
        embedder.run(text=f"query {i}")
    assert calls == ["count"]


def test_an_empty_index_is_checked_again_once_documents_arrive(store, tiny_siglip: str, other_siglip: str):
    embedder = MultimodalTextEmbedder(other_siglip, document_store=store)
    embedder.run(text="nothing indexed yet")
    _index(tiny_siglip, store, ["a red square"])
    with pytest.raises(EmbeddingModelMismatchError):
        embedder.run(text="now the index holds another model")


def test_documents_without_a_model_record_are_warned_about_not_refused(
    store, tiny_siglip: str, caplog: pytest.LogCaptureFixture
):
    store.write_documents([Document(content="legacy", embedding=[0.1] * 32)])
    with caplog.at_level(logging.WARNING):
        MultimodalTextEmbedder(tiny_siglip, document_store=store).run(text="query")
    assert "1 of 1 documents in the index carry no embedding-model record" in caplog.text


def test_query_by_image_is_guarded_too(store, tiny_siglip: str, other_siglip: str, tmp_path: Path):
    _index(tiny_siglip, store, ["a red square"])
    image = make_image(tmp_path / "q.png")
    assert MultimodalImageEmbedder(tiny_siglip, document_store=store).run(image=str(image))["embedding"]
    with pytest.raises(EmbeddingModelMismatchError):
        MultimodalImageEmbedder(other_siglip, document_store=store).run(image=str(image))


def test_guarded_pipelines_survive_dumps_and_loads(tiny_siglip: str, other_siglip: str):
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    indexing = Pipeline()
    indexing.add_component(
        "embedder", MultimodalDocumentEmbedder(tiny_siglip, progress_bar=False, document_store=store)
    )
    indexing.add_component("writer", DocumentWriter(store))
    indexing.connect("embedder.documents", "writer.documents")
    data = indexing.to_dict()
    assert data["components"]["embedder"]["init_parameters"]["document_store"]["type"].endswith("InMemoryDocumentStore")
    restored = Pipeline.loads(indexing.dumps())
    assert isinstance(restored.get_component("embedder").document_store, InMemoryDocumentStore)
    assert restored.to_dict() == data

    query = Pipeline()
    query.add_component("embedder", MultimodalTextEmbedder(other_siglip, document_store=store))
    query.add_component("retriever", InMemoryEmbeddingRetriever(store))
    query.connect("embedder.embedding", "retriever.query_embedding")
    again = Pipeline.loads(query.dumps())
    assert isinstance(again.get_component("embedder").document_store, InMemoryDocumentStore)
    assert again.to_dict() == query.to_dict()


def _shipped(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "examples" / "pipelines" / name


def test_the_shipped_pipelines_wire_the_guard_to_their_index() -> None:
    for name, component, store_owner in (
        ("indexing.yaml", "dense_embedder", "writer"),
        ("rag.yaml", "text_embedder", "retriever"),
    ):
        components = yaml.safe_load(_shipped(name).read_text())["components"]
        guarded = components[component]["init_parameters"]["document_store"]
        assert guarded == components[store_owner]["init_parameters"]["document_store"], name


def test_the_shipped_pipelines_with_the_guard_wired_refuse_a_second_model(
    tmp_path: Path, tiny_siglip: str, other_siglip: str, tiny_colqwen2_5: str, tiny_vlm: str
):
    indexing = _shipped("indexing.yaml")
    rag = _shipped("rag.yaml")
    corpus = tmp_path / "corpus"
    make_image(corpus / "chart.png")
    (corpus / "note.txt").write_text("revenue grew in the third quarter")
    workdir = tmp_path / "work"

    def load(path: Path, dense: str) -> Pipeline:
        models = {"dense": dense, "colpali": tiny_colqwen2_5, "vlm": tiny_vlm}
        return load_pipeline(path, base_dir=workdir, models=models, embedding_dim=32, root_path=tmp_path)

    first = load(indexing, tiny_siglip)
    try:
        assert first.run({"converter": {"sources": [str(corpus)]}})["writer"]["documents_written"] == 2
    finally:
        first.get_component("writer").document_store.close()

    second = load(indexing, other_siglip)
    try:
        with pytest.raises(EmbeddingModelMismatchError, match="refusing to write"):
            second.run({"converter": {"sources": [str(corpus)]}})
    finally:
        second.get_component("writer").document_store.close()

    query = {"text_embedder": {"text": "revenue"}, "ranker": {"query": "revenue"}}
    query |= {"calibrator": {"query": "revenue"}, "prompt_builder": {"query": "revenue"}}
    good = load(rag, tiny_siglip)
    good.get_component("generator").generation_kwargs = {"max_new_tokens": 1}
    assert good.run(query, include_outputs_from={"calibrator"})["calibrator"]["documents"]
    wrong = load(rag, other_siglip)
    with pytest.raises(EmbeddingModelMismatchError) as info:
        wrong.run(query)
    assert tiny_siglip in str(info.value)
    assert other_siglip in str(info.value)
