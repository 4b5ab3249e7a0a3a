"""The standard six-column TREC run format."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from haystack_integrations.evaluation.multimodal_rag.dataset import check_id
from haystack_integrations.evaluation.multimodal_rag.metrics import rank_documents


def write_trec_run(run: Mapping[str, Mapping[str, float]], path: str | Path, *, tag: str = "mmrag") -> Path:
    """
    Write a run as TREC lines `qid Q0 docid rank score tag` (space-separated, rank from 1).

    Documents are ranked the way `retrieval_metrics` (and trec_eval) rank them: score descending, ties by
    document id descending, so `trec_eval qrels run.trec` reproduces the report's figures. Queries are written
    in sorted order.

    :param run: `{query_id: {doc_id: score}}`.
    :param path: The file to write (its folder must exist).
    :param tag: The run tag (no whitespace).
    :returns: The path written.
    :raises ValueError: On an id or tag containing whitespace, or a non-finite score.
    """
    check_id("run tag", tag)
    lines = []
    for query_id in sorted(run):
        check_id("query", query_id)
        scores = run[query_id]
        for rank, doc_id in enumerate(rank_documents(scores), start=1):
            check_id("document", doc_id)
            lines.append(f"{query_id} Q0 {doc_id} {rank} {float(scores[doc_id])!r} {tag}\n")
    out = Path(path)
    out.write_text("".join(lines), encoding="utf-8")
    return out
