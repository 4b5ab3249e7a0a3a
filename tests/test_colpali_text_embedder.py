from __future__ import annotations

import pytest
from haystack import Document

from haystack_integrations.common.multimodal_rag.backends.colpali import (
    LateInteractionEncoder,
)
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.components.embedders.colpali import ColPaliTextEmbedder
from haystack_integrations.components.rankers.colpali import ColPaliRanker


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
