"""Score meta keys and the ranking rules every ranker of the package shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from haystack import Document

from haystack_integrations.common.multimodal_rag.validation import check_int, check_number

#: The retriever's (stage-1) score, kept by the first ranker that replaces `score`.
DENSE_SCORE_META_KEY = "dense_score"
#: Raw MaxSim written by `ColPaliRanker`.
LATE_INTERACTION_SCORE_META_KEY = "late_interaction_score"
#: Probability of relevance written by `VisionLanguageRanker`.
CROSS_ENCODER_SCORE_META_KEY = "cross_encoder_score"
#: Written by `ModalityScoreCalibrator`.
CALIBRATED_DENSE_SCORE_META_KEY = "calibrated_dense_score"
CALIBRATED_LATE_SCORE_META_KEY = "calibrated_late_interaction_score"
FUSED_SCORE_META_KEY = "fused_score"


def rescored(doc: Document, score: float | None, meta: dict[str, Any]) -> Document:
    """
    A new Document equal to `dataclasses.replace(doc, score=score, meta=meta)`; `doc` is not modified.

    For rankers that give many candidates a new score: `replace()` re-runs `Document.__init__`, `__post_init__`
    and Haystack's mutation tracking, ~4-10 us per document (4 ms for 1000 candidates on a 2-vCPU VM), ten times
    this copy. The fields `__post_init__` derives (the id) are already final in `doc`, so copying its instance
    dict and swapping the two fields builds the same Document, sharing content, blob and embeddings exactly as
    `replace()` does. Pinned by `test_rescored_copy_equals_dataclasses_replace` (tests/test_ranking.py).

    :param doc: The document to copy.
    :param score: The copy's score.
    :param meta: The copy's meta (used as given, not copied).
    :returns: The new Document.
    """
    new = object.__new__(type(doc))
    fields = new.__dict__
    fields.update(doc.__dict__)
    fields["score"] = score
    fields["meta"] = meta
    return new


def check_top_k_and_threshold(top_k: int | None, score_threshold: float | None) -> None:
    """
    Validate `top_k` (a non-negative integer, 0 included) and `score_threshold` (a finite number or None).

    :param top_k: Number of documents to return, or `None` for all (where a component allows it).
    :param score_threshold: Minimum score, or `None`.
    :raises ValueError: On a negative or non-integer `top_k`, or a non-finite threshold.
    """
    if top_k is not None:
        check_int("top_k", top_k, minimum=0)
    if score_threshold is not None:
        check_number("score_threshold", score_threshold)


class _Ranker(Protocol):
    @property
    def top_k(self) -> int | None: ...

    @property
    def score_threshold(self) -> float | None: ...


def call_top_k_and_threshold(
    ranker: _Ranker, top_k: int | None, score_threshold: float | None
) -> tuple[int | None, float | None]:
    """
    A ranker's `top_k` and `score_threshold` for one `run()`: the call's values, else the init values; validated.

    :param ranker: The ranker (its `top_k` and `score_threshold` are the defaults).
    :param top_k: The call's `top_k`, or `None`.
    :param score_threshold: The call's `score_threshold`, or `None`.
    :returns: `(top_k, score_threshold)` in effect.
    :raises ValueError: As `check_top_k_and_threshold`.
    """
    top_k = ranker.top_k if top_k is None else top_k
    score_threshold = ranker.score_threshold if score_threshold is None else score_threshold
    check_top_k_and_threshold(top_k, score_threshold)
    return top_k, score_threshold


def _score_key(score: float | None) -> tuple[bool, float]:
    return score is None, -(score or 0.0)


def score_sort_key(document: Document) -> tuple[bool, float]:
    """
    Sort key that puts the best `score` first and documents without a score last.

    :param document: A document.
    :returns: The key.
    """
    return _score_key(document.score)


def select_top_positions(
    scores: Sequence[float | None], *, top_k: int | None, score_threshold: float | None
) -> list[int]:
    """
    `select_top` on scores alone: the positions of the documents it keeps, in its order.

    For rankers that compute new scores for many candidates but return few: they select first and build new
    Documents only for the kept ones (a Document costs ~10 us to construct).

    :param scores: One score (or `None`) per document, in the incoming order.
    :param top_k: How many to keep; `None` keeps all.
    :param score_threshold: Drop scores below it (and `None` ones); `None` keeps all.
    :returns: Positions into `scores`: best first, stable, `None` last, thresholded, cut at `top_k`.
    """
    order = sorted(range(len(scores)), key=lambda i: _score_key(scores[i]))
    if score_threshold is not None:
        order = [i for i in order if (score := scores[i]) is not None and score >= score_threshold]
    return order if top_k is None else order[:top_k]


def select_top(documents: Sequence[Document], *, top_k: int | None, score_threshold: float | None) -> list[Document]:
    """
    Sort by `score` (best first, stable, documents without a score last), apply the threshold, cut at `top_k`.

    :param documents: Scored documents.
    :param top_k: How many to keep; `None` keeps all.
    :param score_threshold: Drop documents whose score is below it (and those without a score); `None` keeps all.
    :returns: The selected documents.
    """
    positions = select_top_positions([d.score for d in documents], top_k=top_k, score_threshold=score_threshold)
    return [documents[i] for i in positions]
