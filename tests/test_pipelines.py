"""End to end: the shipped YAML pipelines, the quickstart, idempotent and killable indexing, concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from haystack import Pipeline
from haystack.core.errors import PipelineRuntimeError

from haystack_integrations.common.multimodal_rag.errors import DocumentProcessingError
from haystack_integrations.document_stores.multivector import QdrantMultiVectorStore, SQLiteMultiVectorStore
from haystack_integrations.document_stores.qdrant import QdrantDocumentStore
from haystack_integrations.pipelines.multimodal_rag import load_pipeline, rewrite_pipeline_dict
from tests.helpers import COLORS, make_corrupt_image, make_image, make_pdf

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "examples" / "pipelines"


@pytest.fixture(scope="module")
def models(tiny_siglip: str, tiny_colqwen2_5: str, tiny_vlm: str) -> dict[str, str]:
    return {"dense": tiny_siglip, "colpali": tiny_colqwen2_5, "vlm": tiny_vlm}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for i, color in enumerate(COLORS[:4]):
        make_image(root / f"image{i}.png", size=(60 + 10 * i, 60), color=color)
    make_pdf(root / "report.pdf", pages=3, size=(80, 100))
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("Revenue in Q3 was the strongest quarter.")
    (root / "notes" / "b.md").write_text("Hiring will slow down next year.")
    return root


def _index(workdir: Path, corpus: Path, models: dict[str, str]) -> dict:
    pipe = load_pipeline(PIPELINES / "indexing.yaml", base_dir=workdir, models=models, embedding_dim=32)
    try:
        return pipe.run({"converter": {"sources": [str(corpus)]}})
    finally:
        pipe.get_component("writer").document_store.close()


def _state(workdir: Path) -> tuple[set[str], set[str]]:
    """(document ids in the embedded Qdrant, ids in the SQLite multi-vector file)."""
    store = QdrantDocumentStore(path=str(workdir / "index" / "qdrant"), index="multimodal", embedding_dim=32)
    try:
        doc_ids = {d.id for d in store.filter_documents()}
    finally:
        store.close()
    mv = SQLiteMultiVectorStore(str(workdir / "index" / "multivectors.sqlite"), read_only=True)
    mv_ids = set(mv.get(list(doc_ids)))
    assert mv.count() == len(mv_ids)
    mv.close()
    return doc_ids, mv_ids


def _ask(pipe: Pipeline, question: str) -> dict:
    return pipe.run(
        {
            "text_embedder": {"text": question},
            "ranker": {"query": question},
            "calibrator": {"query": question},
            "prompt_builder": {"query": question},
        },
        include_outputs_from={"calibrator", "monitor", "prompt_builder"},
    )


def test_shipped_yaml_pipelines_load_as_shipped() -> None:
    indexing = Pipeline.loads((PIPELINES / "indexing.yaml").read_text())
    rag = Pipeline.loads((PIPELINES / "rag.yaml").read_text())
    assert set(indexing.to_dict()["components"]) == {
        "converter",
        "router",
        "splitter",
        "joiner",
        "dense_embedder",
        "colpali_embedder",
        "writer",
    }
    assert list(rag.to_dict()["components"]) == [
        "text_embedder",
        "retriever",
        "ranker",
        "calibrator",
        "monitor",
        "prompt_builder",
        "generator",
    ]
    ranker = rag.get_component("ranker")
    assert isinstance(ranker.multivector_store, SQLiteMultiVectorStore) or ranker.multivector_store is None
    assert rag.get_component("retriever")._top_k == 100
    # Round trip of the shipped pipelines themselves.
    restored = Pipeline.loads(rag.dumps()).to_dict()
    assert restored["components"] == rag.to_dict()["components"]

    def key(c: dict) -> tuple:
        return c["sender"], c["receiver"]

    assert sorted(restored["connections"], key=key) == sorted(rag.to_dict()["connections"], key=key)


def test_index_then_answer_end_to_end_and_reload_in_the_same_process(
    tmp_path: Path, corpus: Path, models: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    result = _index(workdir, corpus, models)
    assert result["writer"]["documents_written"] == 4 + 3 + 2
    doc_ids, mv_ids = _state(workdir)
    assert len(doc_ids) == 9
    assert len(mv_ids) == 7  # images and pages; text has no multi-vector

    rag = load_pipeline(PIPELINES / "rag.yaml", base_dir=workdir, models=models, embedding_dim=32)
    rag.get_component("generator").generation_kwargs = {"max_new_tokens": 4}
    out = _ask(rag, "Which quarter had the strongest revenue?")
    reply = out["generator"]["replies"][0]
    assert isinstance(reply.text, str)
    assert reply.meta["images"] >= 1
    sources = [s for s in out["prompt_builder"]["sources"] if s["included"]]
    assert {s["modality"] for s in sources} >= {"text"}
    assert any(s["modality"] in ("image", "page") for s in sources)
    assert [s["number"] for s in sources] == list(range(1, len(sources) + 1))
    calibrated = out["calibrator"]["documents"]
    assert all("fused_score" in d.meta for d in calibrated)
    assert out["monitor"]["drift_report"]["calls"] == 1

    # A second copy of the same YAML, loaded while the first holds the embedded folder, runs too.
    rag.get_component("monitor").close()  # the monitor batches its writes; close() writes the rest
    again = load_pipeline(PIPELINES / "rag.yaml", base_dir=workdir, models=models, embedding_dim=32)
    again.get_component("generator").generation_kwargs = {"max_new_tokens": 4}
    second = _ask(again, "Which quarter had the strongest revenue?")
    assert [d.id for d in second["calibrator"]["documents"]] == [d.id for d in calibrated]
    # The drift monitor continued from its state file.
    assert second["monitor"]["drift_report"]["calls"] == 2

    # Metadata filters pass through to the retriever.
    filtered = rag.run(
        {
            "text_embedder": {"text": "revenue"},
            "retriever": {"filters": {"field": "meta.modality", "operator": "==", "value": "text"}},
            "ranker": {"query": "revenue"},
            "calibrator": {"query": "revenue"},
            "prompt_builder": {"query": "revenue"},
        },
        include_outputs_from={"calibrator"},
    )
    assert {d.meta["modality"] for d in filtered["calibrator"]["documents"]} == {"text"}


def test_long_text_is_split_into_chunks_the_dense_encoder_reads_and_visual_documents_pass_untouched(
    tmp_path: Path, models: dict[str, str]
) -> None:
    corpus = tmp_path / "corpus"
    make_image(corpus / "chart.png", color="green")
    make_pdf(corpus / "slides.pdf", pages=2)
    long_text = " ".join(f"Sentence {i} says revenue grew in region {i % 7} this quarter." for i in range(60))
    (corpus / "long.txt").write_text(long_text)
    workdir = tmp_path / "work"
    result = _index(workdir, corpus, models)
    store = QdrantDocumentStore(path=str(workdir / "index" / "qdrant"), index="multimodal", embedding_dim=32)
    try:
        stored = store.filter_documents()
    finally:
        store.close()
    texts = [d for d in stored if d.meta["modality"] == "text"]
    visual = [d for d in stored if d.meta["modality"] in ("image", "page")]
    assert len(texts) >= 20  # 600 words in chunks of 32 (overlap 4)
    assert result["writer"]["documents_written"] == len(texts) + 3
    assert max(len(d.content.split()) for d in texts) <= 32
    assert {d.meta["file_path"].rsplit("/", 1)[-1] for d in texts} == {"long.txt"}
    assert sorted((d.meta["file_path"].rsplit("/", 1)[-1], d.meta.get("page_number")) for d in visual) == [
        ("chart.png", None),
        ("slides.pdf", 1),
        ("slides.pdf", 2),
    ]
    assert all(d.content is None for d in visual)
    # Every word of the file is in some chunk: splitting loses nothing.
    assert set(long_text.split()) == {word for d in texts for word in d.content.split()}


def test_indexing_twice_leaves_the_same_documents_and_multivectors(
    tmp_path: Path, corpus: Path, models: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    _index(workdir, corpus, models)
    first = _state(workdir)
    _index(workdir, corpus, models)
    assert _state(workdir) == first


_KILLABLE_INDEXING = textwrap.dedent(
    """
    import json, sys
    from haystack_integrations.pipelines.multimodal_rag import load_pipeline
    workdir, corpus, models, yaml_path = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    pipe = load_pipeline(yaml_path, base_dir=workdir, models=models, embedding_dim=32)
    pipe.get_component("colpali_embedder").batch_size = 1
    pipe.run({"converter": {"sources": [corpus]}})
    print("FINISHED", flush=True)
    """
)


def test_indexing_killed_halfway_and_run_again_ends_like_an_uninterrupted_run(
    tmp_path: Path, models: dict[str, str]
) -> None:
    corpus = tmp_path / "big"
    for i in range(60):
        make_image(corpus / f"img{i:03d}.png", size=(112, 112), color=COLORS[i % len(COLORS)])
    (corpus / "note.txt").write_text("a note")

    clean = tmp_path / "clean"
    _index(clean, corpus, models)
    expected = _state(clean)

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HAYSTACK_TELEMETRY_ENABLED": "False"}
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLABLE_INDEXING,
            str(killed),
            str(corpus),
            json.dumps(models),
            str(PIPELINES / "indexing.yaml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    sqlite_path = killed / "index" / "multivectors.sqlite"
    deadline = time.monotonic() + 120
    written = 0
    while time.monotonic() < deadline and child.poll() is None:
        if sqlite_path.exists():
            try:
                written = SQLiteMultiVectorStore(str(sqlite_path), read_only=True).count()
            except Exception:
                written = 0
            if written >= 5:
                break
        time.sleep(0.02)
    assert child.poll() is None, "indexing finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert 0 < written < 60

    _index(killed, corpus, models)
    assert _state(killed) == expected


def test_concurrent_queries_give_the_sequential_rankings_and_every_call_is_monitored(
    tmp_path: Path, corpus: Path, models: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    _index(workdir, corpus, models)
    rag = load_pipeline(PIPELINES / "rag.yaml", base_dir=workdir, models=models, embedding_dim=32)
    rag.get_component("generator").generation_kwargs = {"max_new_tokens": 1}
    rag.warm_up()
    questions = [f"question number {i} about revenue" for i in range(50)]
    sequential = {q: [d.id for d in _ask(rag, q)["calibrator"]["documents"]] for q in questions}
    monitor = rag.get_component("monitor")
    calls_before = monitor.run(documents=[])["drift_report"]["calls"]

    def ask(q: str) -> tuple[str, list[str]]:
        return q, [d.id for d in _ask(rag, q)["calibrator"]["documents"]]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, [q for _ in range(8) for q in questions]))
    assert len(results) == 400
    for q, ids in results:
        assert ids == sequential[q]
    calls_after = monitor.run(documents=[])["drift_report"]["calls"]
    assert calls_after == calls_before + 400 + 1


def test_bad_input_gives_the_clear_error_and_loses_nothing(
    tmp_path: Path, corpus: Path, models: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    _index(workdir, corpus, models)
    before = _state(workdir)
    make_corrupt_image(corpus / "zz_broken.png")
    pipe = load_pipeline(PIPELINES / "indexing.yaml", base_dir=workdir, models=models, embedding_dim=32)
    with pytest.raises(PipelineRuntimeError) as info:
        pipe.run({"converter": {"sources": [str(corpus)]}})
    pipe.get_component("writer").document_store.close()
    cause = info.value.__cause__
    assert isinstance(cause, DocumentProcessingError)
    assert "zz_broken.png" in str(cause)
    assert _state(workdir) == before

    rag = load_pipeline(PIPELINES / "rag.yaml", base_dir=workdir, models=models, embedding_dim=32)
    with pytest.raises(PipelineRuntimeError) as info:
        _ask(rag, "   ")
    assert "empty query" in str(info.value.__cause__)


def test_qdrant_url_switches_both_stores_to_the_server() -> None:
    data = yaml.safe_load((PIPELINES / "rag.yaml").read_text())
    rewritten = rewrite_pipeline_dict(data, qdrant_url="http://qdrant.example:6333", generator="openai")
    store = rewritten["components"]["retriever"]["init_parameters"]["document_store"]["init_parameters"]
    assert store["url"] == "http://qdrant.example:6333"
    assert store["path"] is None
    assert store["api_key"]["env_vars"] == ["QDRANT_API_KEY"]
    mv = rewritten["components"]["ranker"]["init_parameters"]["multivector_store"]
    assert mv["type"].endswith("QdrantMultiVectorStore")
    assert mv["init_parameters"]["url"] == "http://qdrant.example:6333"
    assert rewritten["components"]["generator"]["type"].endswith("OpenAIChatGenerator")
    os.environ.setdefault("OPENAI_API_KEY", "sk-test-not-used")
    pipe = Pipeline.from_dict(rewritten)  # builds without connecting
    assert isinstance(pipe.get_component("ranker").multivector_store, QdrantMultiVectorStore)
    assert data["components"]["retriever"]["init_parameters"]["document_store"]["init_parameters"]["path"] == (
        "index/qdrant"
    )


def test_quickstart_tiny_runs_offline_and_prints_sources_and_answers(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HAYSTACK_TELEMETRY_ENABLED": "False"}
    env.pop("OPENAI_API_KEY", None)
    env.pop("QDRANT_URL", None)
    out = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--tiny", "--workdir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TINY MODE" in out.stdout
    assert out.stdout.count("\nQ: ") == 3
    assert out.stdout.count("\nA: ") == 3
    assert "sources:" in out.stdout
    assert "image" in out.stdout
    assert "page 1" in out.stdout or "page 2" in out.stdout or "page 3" in out.stdout


def test_quickstart_without_models_fails_with_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HAYSTACK_TELEMETRY_ENABLED": "False"}
    env.pop("OPENAI_API_KEY", None)
    env["HF_HOME"] = str(tmp_path / "empty-hf-cache")
    out = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--workdir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "google/siglip-so400m-patch14-384" in error_lines[0]
    assert "--tiny" in error_lines[0]
    assert "Traceback" not in out.stderr
