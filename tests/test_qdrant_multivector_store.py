from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from haystack import Document

from haystack_integrations.common.multimodal_rag.errors import (
    MultiVectorStoreError,
)
from haystack_integrations.document_stores.multivector import QdrantMultiVectorStore


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
    from haystack_integrations.document_stores.multivector import share_embedded_qdrant_document_stores
    from haystack_integrations.document_stores.qdrant import QdrantDocumentStore

    # What a hand-built pipeline does once (load_pipeline does it itself); without it this test fails alone.
    assert share_embedded_qdrant_document_stores() is True

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


def test_the_private_qdrant_haystack_methods_the_sharing_wraps_are_still_there() -> None:
    # qdrant_sharing.py wraps QdrantDocumentStore._initialize_client and calls _set_up_collection with these
    # arguments (qdrant-haystack 13): a new release that renames them must fail here, not in a user's pipeline.
    import inspect

    from haystack_integrations.document_stores.qdrant import QdrantDocumentStore

    assert list(inspect.signature(QdrantDocumentStore._initialize_client).parameters) == ["self"]
    params = list(inspect.signature(QdrantDocumentStore._set_up_collection).parameters)
    assert params[:9] == [
        "self",
        "collection_name",
        "embedding_dim",
        "recreate_collection",
        "similarity",
        "use_sparse_embeddings",
        "sparse_idf",
        "on_disk",
        "payload_fields_to_index",
    ]
