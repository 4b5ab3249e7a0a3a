"""Retrieval metrics with trec_eval's definitions: nDCG@k, Recall@k and MRR@10."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import NoReturn

from haystack_integrations.common.multimodal_rag.validation import check_int

#: Cut-off of the reciprocal rank (`mrr@10`), as in MS MARCO, BEIR and the ViDoRe/MTEB reports.
MRR_CUTOFF = 10


def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """
    Order one query's retrieved documents the way trec_eval does.

    Highest score first; documents with the same score are ordered by document id in DESCENDING order
    (trec_eval sorts a run by score, then by docno, both decreasing, in `form_res_rels.c`; pytrec_eval embeds
    trec_eval and does the same, which the tests check), so the ranking and every metric are deterministic and
    agree with those tools even when scores tie. Ids are compared as strings (`str(doc_id)`), as trec_eval
    compares the docnos of a run file: ids of mixed types (`1` and `"a"`) do not break the sort, and integer ids
    tie-break like their TREC run lines (`"9"` before `"10"`).

    :param scores: `{doc_id: score}` of one query.
    :returns: The document ids, best first.
    :raises ValueError: On a score that is not a finite number.
    """
    for doc_id, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
            msg = f"score of document '{doc_id}' is {score!r}; expected a finite number"
            raise ValueError(msg)
    return [doc_id for doc_id, _ in sorted(scores.items(), key=lambda item: (item[1], str(item[0])), reverse=True)]


def _check_relevance(query_id: object, relevance: object) -> Mapping[object, float]:
    if not isinstance(relevance, Mapping):
        msg = f"qrels of query '{query_id}' are {relevance!r}; expected a mapping {{doc_id: relevance}}"
        raise ValueError(msg)
    for doc_id, level in relevance.items():
        if isinstance(level, bool) or not isinstance(level, numbers.Real) or not math.isfinite(level):
            msg = (
                f"relevance of document '{doc_id}' for query '{query_id}' is {level!r}; expected a finite number "
                "(graded relevance: > 0 is relevant)"
            )
            raise ValueError(msg)
    return relevance


class _IdTypeCheck:
    """Refuse ids that match only as text (`1` in qrels, `"1"` in the run): they would silently score 0."""

    def __init__(self, run: Mapping) -> None:
        self.run = run
        self._query_texts: dict[str, object] | None = None

    @staticmethod
    def _refuse(what: str, wanted: object, twin: object, where: str = "") -> NoReturn:
        msg = (
            f"{what} {wanted!r} ({type(wanted).__name__}){where} in qrels is {twin!r} ({type(twin).__name__}) in "
            "the run: use one type for ids (str, as in TREC files)"
        )
        raise ValueError(msg)

    def check(self, query_id: object, relevance: Mapping) -> None:
        if query_id not in self.run:
            if self._query_texts is None:
                self._query_texts = {str(other): other for other in self.run}
            twin = self._query_texts.get(str(query_id))
            if twin is not None:
                self._refuse("query id", query_id, twin)
            return
        scores = self.run[query_id]
        doc_texts: dict[str, object] | None = None
        for doc_id, level in relevance.items():
            if level > 0 and doc_id not in scores:
                if doc_texts is None:
                    doc_texts = {str(other): other for other in scores}
                twin = doc_texts.get(str(doc_id))
                if twin is not None:
                    self._refuse("document id", doc_id, twin, f" of query '{query_id}'")


def _check_k_values(k_values: Iterable[int]) -> list[int]:
    ks = list(k_values)
    if not ks:
        msg = "k_values must not be empty"
        raise ValueError(msg)
    for k in ks:
        check_int("every k", k, minimum=1)
    return sorted(set(ks))


def _query_metrics(ranking: Sequence[str], relevance: Mapping[str, int], k_values: Sequence[int]) -> dict[str, float]:
    # Gains as trec_eval's ndcg: gain = the judged relevance level, only levels > 0 count; discount log2(rank + 1).
    gains = [float(relevance.get(doc_id, 0)) if relevance.get(doc_id, 0) > 0 else 0.0 for doc_id in ranking]
    ideal = sorted((float(r) for r in relevance.values() if r > 0), reverse=True)
    n_relevant = len(ideal)
    out: dict[str, float] = {}
    for k in k_values:
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]) if g > 0)
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
        out[f"ndcg@{k}"] = dcg / idcg
        out[f"recall@{k}"] = sum(1 for g in gains[:k] if g > 0) / n_relevant
    first = next((i for i, g in enumerate(gains[:MRR_CUTOFF]) if g > 0), None)
    out[f"mrr@{MRR_CUTOFF}"] = 0.0 if first is None else 1.0 / (first + 1)
    return out


def per_query_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Iterable[int] = (1, 5, 10, 100),
) -> dict[str, dict[str, float]]:
    """
    The metrics of `retrieval_metrics`, for each query that has at least one relevant document.

    :param run: `{query_id: {doc_id: score}}`; a query missing from the run scores 0 everywhere.
    :param qrels: `{query_id: {doc_id: relevance}}` (graded, relevance > 0 means relevant).
    :param k_values: Cut-offs for `ndcg@k` and `recall@k`.
    :returns: `{query_id: {"ndcg@k": ..., "recall@k": ..., "mrr@10": ...}}`.
    :raises ValueError: On an invalid k, a non-finite score or relevance, or a query or relevant document id
        that matches the run's only as text (`1` in qrels, `"1"` in the run).
    """
    ks = _check_k_values(k_values)
    results: dict[str, dict[str, float]] = {}
    id_types = _IdTypeCheck(run)
    for query_id, relevance in qrels.items():
        if not any(r > 0 for r in _check_relevance(query_id, relevance).values()):
            continue
        id_types.check(query_id, relevance)
        ranking = rank_documents(run.get(query_id, {}))
        results[query_id] = _query_metrics(ranking, relevance, ks)
    return results


def retrieval_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Iterable[int] = (1, 5, 10, 100),
) -> dict[str, float]:
    """
    nDCG@k, Recall@k and MRR@10 of a run against graded relevance judgements, as trec_eval computes them.

    - `ndcg@k`: trec_eval's `ndcg_cut.k`: gain = relevance level, discount `log2(rank + 1)`, normalised by the
      ideal DCG of the query's judged relevant documents (from `qrels`, not from the run);
    - `recall@k`: relevant documents in the top k / relevant documents of the query (relevance > 0);
    - `mrr@10`: 1 / rank of the first relevant document in the top 10, 0 when there is none.

    Each metric is averaged over the queries of `qrels` with at least one relevant document; such a query
    that is missing from `run` counts as 0 (trec_eval's `-c`). Documents with equal scores are ranked by
    document id in descending order, compared as strings, trec_eval's rule (see `rank_documents`), so results
    are deterministic and agree with trec_eval / pytrec_eval (checked to 1e-6 in the tests). Ids are not
    converted: a query or relevant document id that matches the run's only as text (`1` against `"1"`) is
    refused rather than silently scored 0. Relevance values are checked like scores (finite numbers, not bool).

    :param run: `{query_id: {doc_id: score}}`, higher is better.
    :param qrels: `{query_id: {doc_id: relevance}}`, graded integer relevance.
    :param k_values: Cut-offs for `ndcg@k` and `recall@k`.
    :returns: `{"ndcg@1": ..., "recall@1": ..., ..., "mrr@10": ...}` (lower-case keys, k in increasing order).
    :raises ValueError: When no query has a relevant document, on an invalid k, a non-finite score or relevance
        (the message names the query and document), or ids whose types differ between `qrels` and `run`.
    """
    ks = _check_k_values(k_values)
    per_query = per_query_metrics(run, qrels, ks)
    if not per_query:
        msg = "no query in qrels has a relevant document (relevance > 0): nothing to average"
        raise ValueError(msg)
    keys = [f"{name}@{k}" for name in ("ndcg", "recall") for k in ks] + [f"mrr@{MRR_CUTOFF}"]
    n = len(per_query)
    return {key: math.fsum(values[key] for values in per_query.values()) / n for key in keys}
