"""Tests that need a Qdrant server or cluster. Run with QDRANT_URL (and QDRANT_API_KEY if needed) set:

    QDRANT_URL=http://localhost:6333 pytest integration_tests

They skip, saying why, when QDRANT_URL is unset.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import COLORS, make_image, make_pdf

from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim
from haystack_integrations.document_stores.multivector import QdrantMultiVectorStore
from haystack_integrations.pipelines.multimodal_rag import load_pipeline

QDRANT_URL = os.environ.get("QDRANT_URL")
pytestmark = pytest.mark.skipif(
    not QDRANT_URL, reason="QDRANT_URL is not set: these tests need a Qdrant server or cluster"
)
PIPELINES = Path(__file__).resolve().parents[1] / "examples" / "pipelines"


def test_multivector_store_on_a_server_round_trips_and_scores_server_side() -> None:
    collection = f"mv_test_{uuid.uuid4().hex[:8]}"
    store = QdrantMultiVectorStore(url=QDRANT_URL, collection=collection)
    rng = np.random.default_rng(0)
    vectors = {f"d{i}": rng.standard_normal((30 + i, 128)).astype(np.float32) for i in range(5)}
    try:
        store.write(vectors)
        assert store.count() == 5
        query = rng.standard_normal((8, 128)).astype(np.float32)
        server = store.score(query, list(vectors))
        local = maxsim(query, [v.astype(np.float16) for v in vectors.values()])
        for (doc_id, value), expected in zip(server.items(), local, strict=True):
            assert value == pytest.approx(float(expected), rel=1e-2), doc_id
    finally:
        store.client.delete_collection(collection)
        store.close()


def test_shipped_pipelines_run_against_the_server(
    tmp_path: Path, tiny_siglip: str, tiny_colqwen2_5: str, tiny_vlm: str
) -> None:
    corpus = tmp_path / "corpus"
    for i, color in enumerate(COLORS[:3]):
        make_image(corpus / f"img{i}.png", color=color)
    make_pdf(corpus / "r.pdf", pages=2)
    models = {"dense": tiny_siglip, "colpali": tiny_colqwen2_5, "vlm": tiny_vlm}
    indexing = load_pipeline(
        PIPELINES / "indexing.yaml", base_dir=tmp_path, models=models, embedding_dim=32, qdrant_url=QDRANT_URL
    )
    assert indexing.run({"converter": {"sources": [str(corpus)]}})["writer"]["documents_written"] == 5
    rag = load_pipeline(
        PIPELINES / "rag.yaml", base_dir=tmp_path, models=models, embedding_dim=32, qdrant_url=QDRANT_URL
    )
    rag.get_component("generator").generation_kwargs = {"max_new_tokens": 2}
    q = "which image"
    out = rag.run(
        {
            "text_embedder": {"text": q},
            "ranker": {"query": q},
            "calibrator": {"query": q},
            "prompt_builder": {"query": q},
        },
        include_outputs_from={"calibrator"},
    )
    assert out["calibrator"]["documents"]
    assert all("late_interaction_score" in d.meta for d in out["calibrator"]["documents"])
