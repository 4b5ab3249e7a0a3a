"""The shared ranking rule (numerics/ranking.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from haystack import Document

from haystack_integrations.common.multimodal_rag.numerics.ranking import rescored, select_top, select_top_positions

SCORES = [0.5, None, 0.9, 0.5, -1.0, None, 0.0, 0.9, 0.2]


@pytest.mark.parametrize("top_k", [None, 0, 1, 3, 100])
@pytest.mark.parametrize("score_threshold", [None, 0.0, 0.5, 2.0])
def test_positions_are_those_select_top_keeps_in_its_order(top_k: int | None, score_threshold: float | None) -> None:
    docs = [Document(id=str(i), score=score) for i, score in enumerate(SCORES)]
    positions = select_top_positions(SCORES, top_k=top_k, score_threshold=score_threshold)
    kept = select_top(docs, top_k=top_k, score_threshold=score_threshold)
    assert [docs[i] for i in positions] == kept
    assert all(a is b for a, b in zip([docs[i] for i in positions], kept, strict=True))


def test_ties_keep_the_incoming_order_and_unscored_come_last() -> None:
    assert select_top_positions(SCORES, top_k=None, score_threshold=None) == [2, 7, 0, 3, 8, 6, 4, 1, 5]
    assert select_top_positions(SCORES, top_k=2, score_threshold=0.5) == [2, 7]
    assert select_top_positions([], top_k=3, score_threshold=None) == []


def test_rescored_copy_equals_dataclasses_replace() -> None:
    from haystack.dataclasses import ByteStream

    doc = Document(
        id="x",
        content="text",
        blob=ByteStream(b"abc", mime_type="image/png"),
        meta={"modality": "text", "dense_score": 0.5},
        score=0.5,
        embedding=[0.1, 0.2],
    )
    before = copy.deepcopy(doc)
    meta = {**doc.meta, "fused_score": 0.7}
    fast = rescored(doc, 0.7, meta)
    assert fast == dataclasses.replace(doc, score=0.7, meta=meta)
    assert type(fast) is Document
    assert fast.to_dict() == dataclasses.replace(doc, score=0.7, meta=meta).to_dict()
    assert doc == before
    assert fast is not doc
