"""evaluate() and the mmrag-eval command end to end: shipped YAMLs, tiny models, a generated mini dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from haystack import tracing

from haystack_integrations.evaluation.multimodal_rag import (
    StageTimer,
    evaluate,
    load_beir_dataset,
    retrieval_metrics,
    retrieval_part,
)
from haystack_integrations.evaluation.multimodal_rag.cli import main
from haystack_integrations.evaluation.multimodal_rag.evaluate import DEFAULT_INDEXING, DEFAULT_QUERY, modality_metrics
from tests.evaluation_fixtures import write_beir_dataset
from tests.helpers import make_corrupt_image

METRIC_KEYS = [f"{m}@{k}" for m in ("ndcg", "recall") for k in (1, 5, 10, 100)] + ["mrr@10"]

# Query-by-image: the query image's dense vector -> the same embedded Qdrant index (no ColPali stage: the
# ColPali ranker takes text queries only).
IMAGE_QUERY_YAML = """
components:
  image_embedder:
    type: haystack_integrations.components.embedders.multimodal.image_embedder.MultimodalImageEmbedder
    init_parameters:
      model: google/siglip-so400m-patch14-384
  retriever:
    type: haystack_integrations.components.retrievers.qdrant.retriever.QdrantEmbeddingRetriever
    init_parameters:
      top_k: 5
      document_store:
        type: haystack_integrations.document_stores.qdrant.document_store.QdrantDocumentStore
        init_parameters:
          path: index/qdrant
          index: multimodal
          embedding_dim: 1152
          similarity: cosine
connections:
- sender: image_embedder.embedding
  receiver: retriever.query_embedding
"""


@pytest.fixture(scope="module")
def models(tiny_siglip: str, tiny_colqwen2_5: str) -> dict[str, str]:
    # No "vlm": the generator keeps its real Hub id, which cannot load offline, so the runs below also show
    # that the generator is never built or warmed up.
    return {"dense": tiny_siglip, "colpali": tiny_colqwen2_5}


def test_retrieval_part_of_the_shipped_query_pipeline_ends_at_the_calibrator() -> None:
    data = yaml.safe_load(DEFAULT_QUERY.read_text())
    cut, final = retrieval_part(data)
    assert final == "calibrator"
    assert list(cut["components"]) == ["text_embedder", "retriever", "ranker", "calibrator"]
    assert {(c["sender"], c["receiver"]) for c in cut["connections"]} == {
        ("text_embedder.embedding", "retriever.query_embedding"),
        ("retriever.documents", "ranker.documents"),
        ("ranker.documents", "calibrator.documents"),
    }
    cut, final = retrieval_part(data, stop_after="ranker")
    assert list(cut["components"]) == ["text_embedder", "retriever", "ranker"]
    assert retrieval_part(yaml.safe_load(IMAGE_QUERY_YAML))[1] == "retriever"
    with pytest.raises(ValueError, match="stop_after='nope' is not a component"):
        retrieval_part(data, stop_after="nope")
    with pytest.raises(ValueError, match="no ranker or retriever"):
        retrieval_part(yaml.safe_load(DEFAULT_INDEXING.read_text()))


def test_modality_metrics_judge_each_modality_on_its_own_relevant_documents() -> None:
    modalities = {"t": "text", "i": "image", "x": "image"}
    run = {"q": {"t": 3.0, "x": 2.0, "i": 1.0}}
    qrels = {"q": {"t": 1, "i": 1}}
    metrics, counts = modality_metrics(run, qrels, modalities, (1,))
    assert counts == {"image": 1, "text": 1}
    assert metrics["text"]["mrr@10"] == 1.0
    # The relevant text document is removed from the image ranking: x then i.
    assert metrics["image"]["mrr@10"] == 0.5
    assert retrieval_metrics(run, qrels, (1,))["recall@1"] == 0.5


def test_stage_timer_records_component_spans_and_restores_the_previous_tracer() -> None:
    before = tracing.tracer.actual_tracer
    with StageTimer() as timer:
        assert tracing.tracer.actual_tracer is timer
        with tracing.tracer.trace("haystack.component.run", tags={"haystack.component.name": "ranker"}):
            pass
        with tracing.tracer.trace("haystack.pipeline.run"):
            pass
    assert tracing.tracer.actual_tracer is before
    assert list(timer.durations) == ["ranker"]
    assert len(timer.durations["ranker"]) == 1


def test_evaluate_indexes_queries_and_reports_every_modality(
    tmp_path: Path, models: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    dataset = load_beir_dataset(write_beir_dataset(tmp_path / "ds", image_query=True))
    result = evaluate(
        dataset,
        base_dir=tmp_path / "work",
        models=models,
        embedding_dim=32,
        image_query_pipeline=IMAGE_QUERY_YAML,
        progress_bar=False,
    )
    report = result.report
    assert set(report) == {
        "dataset",
        "k_values",
        "overall",
        "by_modality",
        "queries",
        "corpus",
        "latency_ms",
        "indexing",
        "pipeline",
    }
    assert list(report["overall"]) == METRIC_KEYS
    assert set(report["by_modality"]) == {"text", "image", "page"}
    for metrics in [report["overall"], *report["by_modality"].values()]:
        assert list(metrics) == METRIC_KEYS
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
        assert metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"] <= metrics["recall@100"]
    # 7 queries, q-none has no relevant document; q-mixed counts for text and image.
    assert report["queries"] == {
        "total": 7,
        "evaluated": 6,
        "text": 6,
        "image": 1,
        "by_modality": {"image": 4, "page": 1, "text": 2},
    }
    assert report["corpus"] == {"documents": 9, "by_modality": {"image": 4, "page": 3, "text": 2}}
    assert report["indexing"]["documents_written"] == 9
    assert report["indexing"]["index_documents"] == 9
    # The report's figures are the metrics of the returned run.
    assert report["overall"] == pytest.approx(retrieval_metrics(result.run, dataset.qrels))
    assert set(result.per_query) == {"q-red", "q-blue", "q-page", "q-revenue", "q-mixed", "q-image"}

    # Retrieval part only: no prompt builder, generator or monitor; the calibrator's top_k (6) bounds text runs.
    assert report["pipeline"]["stages"] == [
        "text_embedder",
        "retriever",
        "ranker",
        "calibrator",
        "image/image_embedder",
        "image/retriever",
    ]
    assert report["pipeline"]["final_stage"] == {"text": "calibrator", "image": "retriever"}
    assert set(result.run) == {q.id for q in dataset.queries}
    corpus_ids = {e.id for e in dataset.corpus}
    for query_id, scores in result.run.items():
        assert set(scores) <= corpus_ids
        assert 1 <= len(scores) <= (5 if query_id == "q-image" else 6)
    # Every measured query was timed once per stage (after one untimed warm-up query per pipeline).
    latency = report["latency_ms"]
    assert set(latency) == {*report["pipeline"]["stages"], "total"}
    for stage, summary in latency.items():
        assert summary["n"] == (1 if stage.startswith("image/") else 6 if stage != "total" else 7)
        assert 0.0 < summary["p50"] <= summary["p95"]
    assert latency["total"]["p95"] >= latency["ranker"]["p50"]
    assert not (tmp_path / "work" / "index" / "drift.json").exists()  # the monitor never ran
    json.dumps(report)  # serialisable as it is


def test_configuration_errors_fail_before_indexing(tmp_path: Path, models: dict[str, str]) -> None:
    dataset = load_beir_dataset(write_beir_dataset(tmp_path / "ds", image_query=True))
    with pytest.raises(ValueError, match=r"1 image queries \(e.g. 'q-image'\): pass image_query_pipeline"):
        evaluate(dataset, base_dir=tmp_path / "work", models=models, embedding_dim=32, progress_bar=False)
    with pytest.raises(ValueError, match=r"pipeline YAML 'no/such.yaml' does not exist"):
        evaluate(dataset, base_dir=tmp_path / "work", query_pipeline="no/such.yaml", image_query_pipeline="x")
    dataset.qrels = {q: dict.fromkeys(rels, 0) for q, rels in dataset.qrels.items()}
    with pytest.raises(ValueError, match="no query has a relevant document"):
        evaluate(dataset, base_dir=tmp_path / "work", image_query_pipeline=IMAGE_QUERY_YAML)
    assert not (tmp_path / "work" / "index").exists()


def _read_trec(path: Path) -> dict[str, list[tuple[str, int, float]]]:
    rows: dict[str, list[tuple[str, int, float]]] = {}
    for line in path.read_text().splitlines():
        fields = line.split(" ")
        assert len(fields) == 6, line
        qid, q0, doc_id, rank, score, tag = fields
        assert (q0, tag) == ("Q0", "mmrag")
        rows.setdefault(qid, []).append((doc_id, int(rank), float(score)))
    for ranked in rows.values():
        assert [rank for _, rank, _ in ranked] == list(range(1, len(ranked) + 1))
        scores = [score for _, _, score in ranked]
        assert scores == sorted(scores, reverse=True)
    return rows


def test_cli_writes_report_and_trec_run_and_reuses_its_index(
    tmp_path: Path, models: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_beir_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    models_arg = ",".join(f"{k}={v}" for k, v in models.items())
    args = ["--dataset", str(root), "--models", models_arg, "--embedding-dim", "32", "--output", str(out)]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert list(report["overall"]) == METRIC_KEYS
    assert report["queries"]["evaluated"] == 5
    assert (out / "index" / "multivectors.sqlite").is_file()  # --base-dir defaults to --output
    run = _read_trec(out / "run.trec")
    assert set(run) == {"q-red", "q-blue", "q-page", "q-revenue", "q-mixed", "q-none"}
    for line in ("overall", "image", "page", "text", "latency (ms)", "calibrator", "total"):
        assert f"\n{line} " in printed
    assert f"{report['overall']['ndcg@5']:.4f}" in printed

    # Again on the same index, stopping after the ColPali ranker with run-time inputs: same documents ranked.
    again = tmp_path / "again"
    assert (
        main(
            [
                *args[:-1],
                str(again),
                "--base-dir",
                str(out),
                "--no-indexing",
                "--stop-after",
                "ranker",
                "--param",
                "ranker.top_k=3",
                "--k",
                "1,3",
                "--no-progress",
            ]
        )
        == 0
    )
    report2 = json.loads((again / "report.json").read_text())
    assert list(report2["overall"]) == ["ndcg@1", "ndcg@3", "recall@1", "recall@3", "mrr@10"]
    assert report2["pipeline"]["stages"] == ["text_embedder", "retriever", "ranker"]
    assert report2["indexing"]["skipped"] is True
    rerun = _read_trec(again / "run.trec")
    assert all(len(ranked) == 3 for ranked in rerun.values())


def test_cli_help_documents_the_options_and_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for option in ("--dataset", "--indexing", "--query", "--base-dir", "--models", "--embedding-dim", "--output"):
        assert option in shown
    assert "report.json" in shown
    assert "run.trec" in shown

    root = write_beir_dataset(tmp_path / "ds", image_query=True)
    with pytest.raises(SystemExit) as exited:
        main(["--dataset", str(root), "--output", str(tmp_path / "out")])
    assert exited.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1
    assert errors[0].startswith("error: ")
    assert "pass image_query_pipeline" in errors[0]

    with pytest.raises(SystemExit) as exited:
        main(["--dataset", str(root), "--output", str(tmp_path / "out"), "--models", "dense"])
    assert exited.value.code == 2
    assert "expected dense=ID,colpali=ID,vlm=ID" in capsys.readouterr().err


def test_a_corrupt_corpus_image_stops_the_cli_with_one_line_naming_the_document(
    tmp_path: Path, models: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_beir_dataset(tmp_path / "ds")
    make_corrupt_image(root / "images" / "blue.png")
    models_arg = ",".join(f"{k}={v}" for k, v in models.items())
    argv = ["--dataset", str(root), "--models", models_arg, "--embedding-dim", "32", "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--no-progress"])
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "img-blue" in errors[0]
    assert "images/blue.png" in errors[0]


def test_chunks_of_one_corpus_document_count_once_with_their_best_score() -> None:
    from haystack import Document

    from haystack_integrations.evaluation.multimodal_rag.evaluate import _ranking

    docs = [
        Document(id="chunk-b", content="x", meta={"source_id": "doc-1"}, score=0.9),
        Document(id="img-1", meta={"modality": "image"}, score=0.7),
        Document(id="chunk-a", content="y", meta={"source_id": "doc-1"}, score=0.4),
    ]
    assert _ranking(docs) == {"doc-1": 0.9, "img-1": 0.7}
    unscored = [Document(id="c1", content="a", meta={"source_id": "d"}), Document(id="c2", content="b")]
    assert _ranking(unscored) == {"d": 2.0, "c2": 1.0}
