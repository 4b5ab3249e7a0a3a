"""retrieval_metrics: trec_eval definitions, checked against pytrec_eval (trec_eval's own C code)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from haystack_integrations.evaluation.multimodal_rag import retrieval_metrics, write_trec_run
from haystack_integrations.evaluation.multimodal_rag.metrics import per_query_metrics, rank_documents

K_VALUES = (1, 3, 5, 10, 100)


def _random_collection(seed: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """Graded qrels (0-3, some queries with no relevant doc) and runs full of tied scores."""
    rng = random.Random(seed)
    docs = [f"d{i:03d}" for i in range(60)]
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in range(40):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 12))
        qrels[qid] = {d: rng.choice([0, 0, 1, 1, 2, 3]) for d in judged}
        if q % 9 == 0:
            qrels[qid] = dict.fromkeys(judged, 0)  # judged, nothing relevant: excluded from the average
        retrieved = rng.sample(docs, rng.randint(1, 50))
        # Few distinct values: many ties, across relevant and non-relevant documents and across cut-offs.
        run[qid] = {d: rng.choice([0.1, 0.2, 0.25, 0.5, 0.75, 1.0, -0.3]) for d in retrieved}
    return run, qrels


def _peer(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    measures = {"ndcg_cut." + ",".join(map(str, K_VALUES)), "recall." + ",".join(map(str, K_VALUES)), "recip_rank"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    counted = [q for q, rels in qrels.items() if any(r > 0 for r in rels.values())]
    assert set(counted) <= set(per_query)
    out = {}
    for k in K_VALUES:
        out[f"ndcg@{k}"] = math.fsum(per_query[q][f"ndcg_cut_{k}"] for q in counted) / len(counted)
        out[f"recall@{k}"] = math.fsum(per_query[q][f"recall_{k}"] for q in counted) / len(counted)
    # MRR@10 from the uncut reciprocal rank: 1/r counts when r <= 10.
    out["mrr@10"] = math.fsum(
        per_query[q]["recip_rank"] if per_query[q]["recip_rank"] >= 0.1 - 1e-12 else 0.0 for q in counted
    ) / len(counted)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_metrics_agree_with_pytrec_eval_on_random_graded_runs_with_ties(seed: int) -> None:
    run, qrels = _random_collection(seed)
    ours = retrieval_metrics(run, qrels, K_VALUES)
    peer = _peer(run, qrels)
    assert set(ours) == set(peer)
    for key, value in peer.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    # The collection does exercise what it claims to.
    assert any(len(set(scores.values())) < len(scores) for scores in run.values())
    assert any(r >= 2 for rels in qrels.values() for r in rels.values())
    assert 0.0 < ours["ndcg@10"] < 1.0


def test_keys_are_lower_case_ndcg_recall_per_k_and_mrr_at_10() -> None:
    metrics = retrieval_metrics({"q": {"a": 1.0}}, {"q": {"a": 1}})
    assert list(metrics) == [
        "ndcg@1",
        "ndcg@5",
        "ndcg@10",
        "ndcg@100",
        "recall@1",
        "recall@5",
        "recall@10",
        "recall@100",
        "mrr@10",
    ]
    assert all(v == 1.0 for v in metrics.values())


def test_graded_ndcg_matches_the_hand_computed_trec_eval_value() -> None:
    # Ranking: c (0), a (2), d (0), b (1). DCG@4 = 2/log2(3) + 1/log2(5); ideal: 2/log2(2) + 1/log2(3).
    run = {"q": {"c": 0.9, "a": 0.8, "d": 0.7, "b": 0.6}}
    qrels = {"q": {"a": 2, "b": 1, "c": 0}}
    metrics = retrieval_metrics(run, qrels, k_values=(1, 4))
    expected = (2 / math.log2(3) + 1 / math.log2(5)) / (2 + 1 / math.log2(3))
    assert metrics["ndcg@4"] == pytest.approx(expected, abs=1e-12)
    assert metrics["ndcg@1"] == 0.0
    assert metrics["recall@1"] == 0.0
    assert metrics["recall@4"] == 1.0
    assert metrics["mrr@10"] == 0.5


def test_ties_are_ranked_by_document_id_descending_like_trec_eval() -> None:
    assert rank_documents({"a": 1.0, "b": 1.0, "c": 2.0, "d": 1.0}) == ["c", "d", "b", "a"]
    run = {"q": {"a": 1.0, "b": 1.0}}
    qrels = {"q": {"a": 1}}
    ours = retrieval_metrics(run, qrels, k_values=(1,))
    assert ours["mrr@10"] == 0.5  # b ranks before a
    peer = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
    assert peer["q"]["recip_rank"] == 0.5


def test_numpy_scores_are_accepted() -> None:
    run = {"q": {"a": np.float32(0.25), "b": np.float64(0.5)}}
    assert retrieval_metrics(run, {"q": {"a": 1}}, k_values=(1, 2)) == pytest.approx(
        {"ndcg@1": 0.0, "ndcg@2": 1 / math.log2(3), "recall@1": 0.0, "recall@2": 1.0, "mrr@10": 0.5}
    )


def test_mrr_counts_only_the_top_ten() -> None:
    run = {"q": {f"d{i:02d}": float(100 - i) for i in range(20)}}
    assert retrieval_metrics(run, {"q": {"d10": 1}})["mrr@10"] == 0.0
    assert retrieval_metrics(run, {"q": {"d09": 1}})["mrr@10"] == pytest.approx(0.1)


def test_queries_without_relevant_documents_are_not_averaged_and_missing_runs_count_zero() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 0}, "q3": {"c": 1}}
    run = {"q1": {"a": 0.5}, "q2": {"b": 0.9}}  # q3 retrieved nothing
    metrics = retrieval_metrics(run, qrels, k_values=(1,))
    assert metrics["ndcg@1"] == 0.5
    assert set(per_query_metrics(run, qrels, (1,))) == {"q1", "q3"}


@pytest.mark.parametrize(
    ("run", "qrels", "k_values", "message"),
    [
        ({"q": {"a": 1.0}}, {"q": {"a": 0}}, (1,), "no query"),
        ({"q": {"a": 1.0}}, {"q": {"a": 1}}, (0,), "positive integer"),
        ({"q": {"a": 1.0}}, {"q": {"a": 1}}, (), "must not be empty"),
        ({"q": {"a": float("nan")}}, {"q": {"a": 1}}, (1,), "document 'a'"),
    ],
)
def test_invalid_inputs_are_refused_with_the_reason(run: dict, qrels: dict, k_values: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(run, qrels, k_values)


def test_trec_run_file_reproduces_the_metrics_through_pytrec_eval(tmp_path: Path) -> None:
    run, qrels = _random_collection(11)
    path = write_trec_run(run, tmp_path / "run.trec", tag="test")
    parsed: dict[str, dict[str, float]] = {}
    previous: tuple[str, int] | None = None
    for line in path.read_text().splitlines():
        qid, q0, doc_id, rank, score, tag = line.split(" ")
        assert (q0, tag) == ("Q0", "test")
        # Ranks start at 1 and increase by one within a query.
        assert int(rank) == (previous[1] + 1 if previous is not None and previous[0] == qid else 1)
        previous = (qid, int(rank))
        parsed.setdefault(qid, {})[doc_id] = float(score)
    assert parsed == run
    assert _peer(parsed, qrels) == pytest.approx(retrieval_metrics(run, qrels, K_VALUES), abs=1e-6)


def test_trec_run_refuses_ids_that_would_break_the_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run({"q 1": {"a": 1.0}}, tmp_path / "run.trec")


@pytest.mark.parametrize("relevance", [float("inf"), float("nan"), -float("inf"), "1", None, True])
def test_a_relevance_that_is_not_a_finite_number_is_refused_with_the_query_and_doc_id(relevance: object) -> None:
    run = {"q7": {"d1": 0.9, "d2": 0.5}}
    with pytest.raises(ValueError, match=r"relevance of document 'd1' for query 'q7' is .*expected a finite number"):
        retrieval_metrics(run, {"q7": {"d1": relevance, "d2": 1}}, k_values=(1,))


def test_qrels_of_a_query_that_are_not_a_mapping_are_refused_naming_the_query() -> None:
    with pytest.raises(ValueError, match="qrels of query 'q7' are None"):
        retrieval_metrics({"q7": {"d1": 0.5}}, {"q7": None}, k_values=(1,))  # type: ignore[dict-item]


def test_mixed_type_doc_ids_that_tie_are_ranked_by_their_text_descending() -> None:
    assert rank_documents({1: 0.5, "a": 0.5, "b": 0.9}) == ["b", "a", 1]  # type: ignore[dict-item]
    # Integer ids tie-break like the docnos of their TREC run lines, which trec_eval compares as text.
    assert rank_documents({9: 0.5, 10: 0.5}) == [9, 10]  # type: ignore[dict-item]
    run = {"q": {1: 0.5, "a": 0.5}}
    assert retrieval_metrics(run, {"q": {1: 1}}, k_values=(1,))["mrr@10"] == 0.5  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("run", "qrels", "message"),
    [
        ({"1": {"d1": 0.5}}, {1: {"d1": 1}}, r"query id 1 \(int\) in qrels is '1' \(str\) in the run"),
        ({1: {"d1": 0.5}}, {"1": {"d1": 1}}, r"query id '1' \(str\) in qrels is 1 \(int\) in the run"),
        ({"q": {"1": 0.5}}, {"q": {1: 1}}, r"document id 1 \(int\) of query 'q' in qrels is '1' \(str\) in the run"),
    ],
)
def test_ids_that_match_the_run_only_as_text_are_refused_not_scored_zero(run: dict, qrels: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(run, qrels, k_values=(1,))
