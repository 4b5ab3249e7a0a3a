"""End to end: the shipped YAML pipelines, the quickstart, idempotent and killable indexing, concurrency; and the
loader's safeguards (alias bombs, root_path, store checks at warm_up before any model runs)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from haystack import Document, Pipeline
from haystack.core.errors import PipelineRuntimeError

from haystack_integrations.common.multimodal_rag.backends.dense import DenseEncoder
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.common.multimodal_rag.errors import (
    DocumentProcessingError,
    MediaError,
    ModelLoadError,
    PipelineLoadError,
)
from haystack_integrations.common.multimodal_rag.inputs.media import resolve_path
from haystack_integrations.components.embedders.multimodal import MultimodalTextEmbedder
from haystack_integrations.document_stores.multivector import QdrantMultiVectorStore, SQLiteMultiVectorStore
from haystack_integrations.document_stores.qdrant import QdrantDocumentStore
from haystack_integrations.pipelines.multimodal_rag import (
    MultimodalRAGPipeline,
    load_pipeline,
    rewrite_pipeline_dict,
)
from haystack_integrations.pipelines.multimodal_rag.loader import READS_FILES
from haystack_integrations.pipelines.multimodal_rag.pipeline import dense_output_dim
from tests.helpers import COLORS, make_corrupt_image, make_image, make_pdf

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "examples" / "pipelines"
_COLPALI_RANKER = "haystack_integrations.components.rankers.colpali.ranker.ColPaliRanker"
_SQLITE = "haystack_integrations.document_stores.multivector.sqlite.SQLiteMultiVectorStore"
_LOCAL_VLM = "haystack_integrations.components.generators.local_vlm.chat_generator.LocalVLMChatGenerator"


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
    # The corpus and the index folders share one root (the test's tmp_path), as in a real project folder.
    pipe = load_pipeline(
        PIPELINES / "indexing.yaml", base_dir=workdir, models=models, embedding_dim=32, root_path=corpus.parent
    )
    try:
        return pipe.run({"converter": {"sources": [str(corpus)]}})
    finally:
        pipe.close()


def _rag(workdir: Path, corpus: Path, models: dict[str, str], max_new_tokens: int = 4) -> MultimodalRAGPipeline:
    rag = load_pipeline(
        PIPELINES / "rag.yaml", base_dir=workdir, models=models, embedding_dim=32, root_path=corpus.parent
    )
    rag.get_component("generator").generation_kwargs = {"max_new_tokens": max_new_tokens}
    return rag


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


def _yaml_components(name: str) -> dict:
    return yaml.safe_load((PIPELINES / name).read_text())["components"]


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
    assert isinstance(rag.get_component("ranker").multivector_store, SQLiteMultiVectorStore)
    # Every setting written in the YAML survives loading and dumping again.
    for name, pipe in (("indexing.yaml", indexing), ("rag.yaml", rag)):
        restored = Pipeline.loads(pipe.dumps()).to_dict()["components"]
        for component, spec in _yaml_components(name).items():
            assert restored[component]["type"] == spec["type"]
            for key, value in spec["init_parameters"].items():
                got = restored[component]["init_parameters"][key]
                if isinstance(value, dict) and "init_parameters" in value:  # a nested store
                    assert got["type"] == value["type"]
                    assert {k: got["init_parameters"][k] for k in value["init_parameters"]} == value["init_parameters"]
                elif isinstance(value, list) and value and isinstance(value[0], int):
                    assert list(got) == value, (component, key)
                else:
                    assert got == value, (component, key)
    assert rag.to_dict()["components"]["retriever"]["init_parameters"]["top_k"] == 100


def test_every_component_that_reads_files_is_confined_to_the_base_dir(tmp_path: Path) -> None:
    # In the shipped YAMLs ...
    file_readers = {f"{cls.__module__}.{cls.__name__}" for cls in READS_FILES}
    for name in ("indexing.yaml", "rag.yaml"):
        for component, spec in _yaml_components(name).items():
            if spec["type"] in file_readers:
                assert spec["init_parameters"].get("root_path") == ".", (name, component)
    # ... and, resolved, in what load_pipeline builds.
    for name in ("indexing.yaml", "rag.yaml"):
        pipe = load_pipeline(PIPELINES / name, base_dir=tmp_path)
        readers = [(n, c) for n, c in pipe.walk() if isinstance(c, READS_FILES)]
        assert len(readers) == (3 if name == "indexing.yaml" else 2)
        for component_name, component in readers:
            assert component.root_path == str(tmp_path.resolve()), component_name


def test_the_package_has_no_file_reading_component_the_loader_does_not_confine() -> None:
    src = REPO / "src"
    found = set()
    for path in sorted((src / "haystack_integrations" / "components").rglob("*.py")):
        module = importlib.import_module(".".join(path.relative_to(src).with_suffix("").parts))
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and "root_path" in inspect.signature(cls.__init__).parameters:
                found.add(cls)
    assert found == set(READS_FILES)


def test_load_pipeline_confines_a_yaml_without_root_path_and_keeps_an_explicit_one(tmp_path: Path) -> None:
    data = yaml.safe_load((PIPELINES / "rag.yaml").read_text())
    del data["components"]["ranker"]["init_parameters"]["root_path"]
    data["components"]["prompt_builder"]["init_parameters"]["root_path"] = "docs"
    pipe = load_pipeline(yaml.safe_dump(data), base_dir=tmp_path)
    assert pipe.get_component("ranker").root_path == str(tmp_path.resolve())
    assert pipe.get_component("prompt_builder").root_path == str((tmp_path / "docs").resolve())
    elsewhere = tmp_path / "files"
    pipe = load_pipeline(yaml.safe_dump(data), base_dir=tmp_path, root_path=elsewhere)
    assert pipe.get_component("ranker").root_path == str(elsewhere.resolve())
    assert pipe.get_component("prompt_builder").root_path == str(elsewhere.resolve())


def test_a_stored_file_path_outside_the_base_dir_is_refused_at_query_time(tmp_path: Path) -> None:
    outside = make_image(tmp_path / "secret" / "private.png")
    rag = load_pipeline(PIPELINES / "rag.yaml", base_dir=tmp_path / "project")
    builder = rag.get_component("prompt_builder")
    out = builder.run(
        query="q",
        documents=[Document(id="d1", content=None, meta={"file_path": str(outside), "modality": "image"})],
    )
    assert out["citations"][0]["included"] is False
    assert "outside root_path" in out["citations"][0]["skipped_reason"]
    with pytest.raises(MediaError, match="outside root_path"):
        resolve_path("../secret/private.png", builder.root_path)


# The classic "billion laughs": 9 levels of 9 aliases, about 400 bytes, 9**9 (387 million) leaves expanded.
ALIAS_BOMB = "a0: &a0 [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)
)


def test_an_alias_bomb_is_refused_before_it_is_expanded() -> None:
    assert len(ALIAS_BOMB.encode()) < 400
    # Refused while parsing, by the expanded-size bound: without it the loader would walk the expansion.
    with pytest.raises(PipelineLoadError, match=r"expands to more than 1000000 nodes through its aliases"):
        load_pipeline(ALIAS_BOMB)


def test_a_recursive_alias_and_a_non_mapping_are_refused() -> None:
    with pytest.raises(PipelineLoadError, match="recursive"):
        load_pipeline("components: &c [*c]\n")
    with pytest.raises(PipelineLoadError, match="mapping"):
        load_pipeline("- just\n- a list\n")


def test_ordinary_anchors_still_load(tmp_path: Path) -> None:
    text = (PIPELINES / "indexing.yaml").read_text()
    text = text.replace("on_error: raise", "on_error: &policy raise", 1)
    text = text.replace("metadata: {}", "metadata: {on_error: *policy}")
    assert "*policy" in text
    pipe = load_pipeline(text, base_dir=tmp_path)
    assert pipe.metadata == {"on_error": "raise"}


@pytest.mark.parametrize("family", ["siglip", "siglip2", "clip"])
def test_the_dense_size_read_from_the_config_is_the_size_the_embedder_makes(
    family: str, request: pytest.FixtureRequest
) -> None:
    embedder = MultimodalTextEmbedder(model=str(request.getfixturevalue(f"tiny_{family}")))
    embedder.warm_up()
    made = len(embedder.run(text="a bar chart")["embedding"])
    assert dense_output_dim(DenseEncoder.get(LoadSpec.of(embedder))) == made


def test_a_query_pipeline_without_an_index_warns_at_load_and_refuses_to_run_creating_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    typo = tmp_path / "projcet"
    bogus = {"dense": str(tmp_path / "no-model"), "colpali": str(tmp_path / "no-model"), "vlm": str(tmp_path / "no")}
    with caplog.at_level("WARNING"):
        rag = load_pipeline(PIPELINES / "rag.yaml", base_dir=typo, models=bogus)
    assert any(str(typo / "index" / "qdrant") in r.getMessage() for r in caplog.records)
    # Refused before any model loads (the models do not even exist): a PipelineLoadError, not a ModelLoadError.
    with pytest.raises(PipelineLoadError, match=r"no index at .*Run the indexing pipeline first"):
        rag.warm_up()
    with pytest.raises(PipelineLoadError):
        _ask(rag, "revenue")
    assert not typo.exists()


def test_a_wrong_embedding_dim_fails_at_warm_up_before_anything_is_embedded(
    tmp_path: Path, corpus: Path, models: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    pipe = load_pipeline(
        PIPELINES / "indexing.yaml", base_dir=workdir, models=models, embedding_dim=1152, root_path=tmp_path
    )
    with pytest.raises(PipelineLoadError, match=r"makes 32-d vectors.*embedding_dim=1152.*pass embedding_dim=32"):
        pipe.warm_up()
    pipe.close()
    assert not (workdir / "index" / "multivectors.sqlite").exists()
    assert not (workdir / "index" / "qdrant").exists()
    # The corrected run works.
    assert _index(workdir, corpus, models)["writer"]["documents_written"] == 9


def test_an_empty_collection_left_with_another_size_is_recreated_and_a_full_one_says_how_to_recover(
    tmp_path: Path, corpus: Path, models: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    workdir = tmp_path / "work"
    folder = workdir / "index" / "qdrant"
    # What an earlier run with embedding_dim=1152 left behind (before the checks at warm_up existed).
    leftover = QdrantDocumentStore(path=str(folder), index="multimodal", embedding_dim=1152)
    assert leftover.count_documents() == 0
    leftover.close()
    with caplog.at_level("WARNING"):
        assert _index(workdir, corpus, models)["writer"]["documents_written"] == 9
    assert any("recreating it with 32-d vectors" in r.getMessage() for r in caplog.records)

    # A collection that holds documents of another size is never dropped: the error says what to do.
    pipe = load_pipeline(
        PIPELINES / "indexing.yaml", base_dir=workdir, models=models, embedding_dim=48, root_path=tmp_path
    )
    with pytest.raises(PipelineLoadError, match=r"holds 9 documents with 32-d vectors.*pass embedding_dim=32"):
        pipe.warm_up()
    pipe.close()
    assert len(_state(workdir)[0]) == 9


_HOLD_FOLDER = textwrap.dedent(
    """
    import sys
    import qdrant_client
    client = qdrant_client.QdrantClient(path=sys.argv[1])
    print("HOLDING", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def folder_held_by_another_process(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "work" / "index" / "qdrant"
    folder.mkdir(parents=True)
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_FOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "HOLDING"
        yield folder
    finally:
        child.kill()
        child.wait(timeout=30)


def test_a_qdrant_folder_held_by_another_process_fails_at_warm_up_before_any_model_loads(
    tmp_path: Path, folder_held_by_another_process: Path
) -> None:
    bogus = {"dense": str(tmp_path / "no-model"), "colpali": str(tmp_path / "no-model")}
    pipe = load_pipeline(PIPELINES / "indexing.yaml", base_dir=tmp_path / "work", models=bogus, embedding_dim=32)
    with pytest.raises(PipelineLoadError, match="open in another process") as info:
        pipe.warm_up()
    assert str(folder_held_by_another_process) in str(info.value)
    assert not isinstance(info.value.__cause__, ModelLoadError)


@pytest.mark.slow
def test_index_then_answer_end_to_end_and_reload_in_the_same_process(
    tmp_path: Path, corpus: Path, models: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    result = _index(workdir, corpus, models)
    assert result["writer"]["documents_written"] == 4 + 3 + 2
    doc_ids, mv_ids = _state(workdir)
    assert len(doc_ids) == 9
    assert len(mv_ids) == 7  # images and pages; text has no multi-vector

    rag = _rag(workdir, corpus, models)
    out = _ask(rag, "Which quarter had the strongest revenue?")
    reply = out["generator"]["replies"][0]
    assert isinstance(reply.text, str)
    assert reply.meta["images"] >= 1
    sources = [s for s in out["prompt_builder"]["citations"] if s["included"]]
    assert {s["modality"] for s in sources} >= {"text"}
    assert any(s["modality"] in ("image", "page") for s in sources)
    assert [s["number"] for s in sources] == list(range(1, len(sources) + 1))
    calibrated = out["calibrator"]["documents"]
    assert all("fused_score" in d.meta for d in calibrated)
    assert out["monitor"]["drift_report"]["calls"] == 1

    # A second copy of the same YAML, loaded while the first holds the embedded folder, runs too.
    rag.get_component("monitor").close()  # the monitor batches its writes; close() writes the rest
    again = _rag(workdir, corpus, models)
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
    again.close()
    rag.close()


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
    workdir, corpus, models, yaml_path, root = sys.argv[1:6]
    pipe = load_pipeline(yaml_path, base_dir=workdir, models=json.loads(models), embedding_dim=32, root_path=root)
    embedder = pipe.get_component("colpali_embedder")
    embedder.batch_size = 1
    store = embedder.multivector_store
    write = store.write
    batches = []

    def write_then_pause(batch):
        write(batch)
        batches.append(len(batch))
        if len(batches) == 5:
            print("PAUSED", flush=True)
            sys.stdin.read()  # never returns: the parent kills this process here

    store.write = write_then_pause
    pipe.run({"converter": {"sources": [corpus]}})
    print("FINISHED", flush=True)
    """
)


@pytest.mark.slow
def test_indexing_killed_halfway_and_run_again_ends_like_an_uninterrupted_run(
    tmp_path: Path, models: dict[str, str]
) -> None:
    corpus = tmp_path / "big"
    for i in range(30):
        make_image(corpus / f"img{i:03d}.png", size=(112, 112), color=COLORS[i % len(COLORS)])
    (corpus / "note.txt").write_text("a note")

    clean = tmp_path / "clean"
    _index(clean, corpus, models)
    expected = _state(clean)

    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLABLE_INDEXING,
            str(killed),
            str(corpus),
            json.dumps(models),
            str(PIPELINES / "indexing.yaml"),
            str(tmp_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        # The child stops after its 5th write of multi-vectors, with the Qdrant writer not reached: kill it there.
        assert child.stdout.readline().strip() == "PAUSED"
        assert SQLiteMultiVectorStore(str(killed / "index" / "multivectors.sqlite"), read_only=True).count() == 5
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    _index(killed, corpus, models)
    assert _state(killed) == expected


@pytest.mark.slow
def test_concurrent_queries_give_the_sequential_rankings_and_every_call_is_monitored(
    tmp_path: Path, corpus: Path, models: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    _index(workdir, corpus, models)
    rag = _rag(workdir, corpus, models, max_new_tokens=1)
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
    rag.close()


def test_bad_input_gives_the_clear_error_and_loses_nothing(
    tmp_path: Path, corpus: Path, models: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    _index(workdir, corpus, models)
    before = _state(workdir)
    make_corrupt_image(corpus / "zz_broken.png")
    pipe = load_pipeline(
        PIPELINES / "indexing.yaml", base_dir=workdir, models=models, embedding_dim=32, root_path=tmp_path
    )
    with pytest.raises(PipelineRuntimeError) as info:
        pipe.run({"converter": {"sources": [str(corpus)]}})
    pipe.close()
    cause = info.value.__cause__
    assert isinstance(cause, DocumentProcessingError)
    assert "zz_broken.png" in str(cause)
    assert _state(workdir) == before

    rag = _rag(workdir, corpus, models)
    with pytest.raises(PipelineRuntimeError) as info:
        _ask(rag, "   ")
    assert "empty query" in str(info.value.__cause__)
    rag.close()


def test_qdrant_url_switches_both_stores_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
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
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    pipe = Pipeline.from_dict(rewritten)  # builds without connecting
    assert isinstance(pipe.get_component("ranker").multivector_store, QdrantMultiVectorStore)
    assert data["components"]["retriever"]["init_parameters"]["document_store"]["init_parameters"]["path"] == (
        "index/qdrant"
    )


def _quickstart_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in ("OPENAI_API_KEY", "QDRANT_URL", "HAYSTACK_TELEMETRY_ENABLED"):
        env.pop(name, None)  # the quickstart switches telemetry off by itself
    return env


@pytest.mark.slow
def test_quickstart_tiny_runs_offline_quietly_and_prints_citations_and_answers(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--tiny", "--workdir", str(tmp_path)],
        cwd=REPO,
        env=_quickstart_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TINY MODE" in out.stdout
    assert out.stdout.count("\nQ: ") == 3
    assert out.stdout.count("\nA: ") == 3
    assert "citations:" in out.stdout
    assert "image" in out.stdout
    assert "page 1" in out.stdout or "page 2" in out.stdout or "page 3" in out.stdout
    # Quiet: no blank-line runs, no model-config warnings, no teardown traceback, no telemetry retries.
    assert "\n\n\n" not in out.stdout
    for noise in ("bos_token_id", "Traceback", "__del__", "telemetry", "Retry", "Writing model shards"):
        assert noise not in out.stdout + out.stderr, noise


@pytest.mark.slow
def test_quickstart_without_models_fails_with_one_clear_line(tmp_path: Path) -> None:
    env = _quickstart_env(tmp_path)
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


def test_a_wrapped_retriever_gets_the_same_store_rewrite_as_a_top_level_one(tmp_path: Path) -> None:
    data = yaml.safe_load((PIPELINES / "rag.yaml").read_text())
    retriever = data["components"]["retriever"]
    data["components"]["retriever"] = {
        "type": "haystack_integrations.components.retrievers.oversampling.retriever.FilterAwareRetriever",
        "init_parameters": {"retriever": retriever, "top_k": 100},
    }
    out = rewrite_pipeline_dict(data, base_dir=tmp_path, embedding_dim=32)
    store = out["components"]["retriever"]["init_parameters"]["retriever"]["init_parameters"]["document_store"]
    assert store["init_parameters"]["path"] == str((tmp_path / "index" / "qdrant").resolve())
    assert store["init_parameters"]["embedding_dim"] == 32
    served = rewrite_pipeline_dict(data, qdrant_url="http://localhost:6333")
    inner = served["components"]["retriever"]["init_parameters"]["retriever"]["init_parameters"]["document_store"]
    assert inner["init_parameters"].get("url") == "http://localhost:6333"


def test_models_keys_replace_only_their_components_and_unknown_keys_are_refused() -> None:
    data = {
        "components": {
            "generator": {
                "type": "haystack_integrations.components.generators.local_vlm.chat_generator.LocalVLMChatGenerator",
                "init_parameters": {"model": "gen"},
            },
            "reranker": {
                "type": "haystack_integrations.components.rankers.vlm.ranker.VisionLanguageRanker",
                "init_parameters": {"model": "rerank"},
            },
        }
    }
    out = rewrite_pipeline_dict(data, models={"vlm": "new-generator"})
    assert out["components"]["generator"]["init_parameters"]["model"] == "new-generator"
    assert out["components"]["reranker"]["init_parameters"]["model"] == "rerank"
    out = rewrite_pipeline_dict(data, models={"reranker": "new-reranker"})
    assert out["components"]["reranker"]["init_parameters"]["model"] == "new-reranker"
    with pytest.raises(ValueError, match="unknown keys \\['vlmm'\\]"):
        rewrite_pipeline_dict(data, models={"vlmm": "typo"})


def test_the_shipped_pipelines_are_found_in_a_checkout_and_travel_inside_the_wheel() -> None:
    import tomllib

    from haystack_integrations.pipelines.multimodal_rag import shipped_pipeline

    assert shipped_pipeline("rag.yaml").read_text() == (PIPELINES / "rag.yaml").read_text()
    with pytest.raises(FileNotFoundError, match="no shipped pipeline"):
        shipped_pipeline("nope.yaml")
    pyproject = tomllib.loads((PIPELINES.parents[1] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    for name in ("indexing.yaml", "rag.yaml"):
        assert shipped[f"examples/pipelines/{name}"] == f"haystack_integrations/pipelines/multimodal_rag/shipped/{name}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("components:\n  - a\n  - b\n", "'components' is a list"),
        ("components:\n  x: null\n", "component 'x' is not a mapping"),
        ("components:\n  x:\n    type: a.B\n    init_parameters: [1, 2]\n", "'init_parameters' that are not a mapping"),
        ("- just\n- a list\n", "got list"),
        ("components:\n  1:\n    type: a.B\n", "component name 1 \\(int\\) is not a string"),
        ("components: {}\nconnections: x\n", "'connections' is a str, not a list"),
        ("components: {}\nconnections: [1]\n", "connection 0 \\(1\\) is not a mapping with a 'sender'"),
        (
            f"components:\n  r:\n    type: {_COLPALI_RANKER}\n    init_parameters:\n"
            f"      multivector_store:\n        type: {_SQLITE}\n        init_parameters: [1]\n",
            "'r.multivector_store' has 'init_parameters' that are not a mapping",
        ),
        (
            f"components:\n  r:\n    type: {_COLPALI_RANKER}\n    init_parameters:\n"
            f"      multivector_store:\n        type: {_SQLITE}\n        init_parameters: {{path: 5}}\n",
            "'r.multivector_store' has path: 5 \\(int\\); expected a path string or null",
        ),
        (
            f"components:\n  r:\n    type: {_COLPALI_RANKER}\n    init_parameters: {{root_path: 5}}\n",
            "'r' has root_path: 5 \\(int\\); expected a path string or null",
        ),
        (
            f"components:\n  f:\n    type: a.Wrapper\n    init_parameters:\n      rankers:\n"
            f"        - type: {_COLPALI_RANKER}\n          init_parameters: [1]\n",
            "'f.rankers\\[0\\]' has 'init_parameters' that are not a mapping",
        ),
    ],
)
def test_yaml_that_is_not_a_pipeline_is_one_clear_error(text: str, message: str) -> None:
    from haystack_integrations.common.multimodal_rag.errors import PipelineLoadError

    with pytest.raises(PipelineLoadError, match=message):
        load_pipeline(text)


def test_a_directory_given_as_the_pipeline_is_a_clear_error(tmp_path: Path) -> None:
    from haystack_integrations.common.multimodal_rag.errors import PipelineLoadError

    with pytest.raises(PipelineLoadError, match="is a directory"):
        load_pipeline(tmp_path)


def test_a_mistyped_path_without_yaml_suffix_is_called_a_missing_file(tmp_path: Path) -> None:
    from haystack_integrations.common.multimodal_rag.errors import PipelineLoadError

    # Before: "a pipeline YAML is a mapping with 'components' and 'connections', got str".
    missing = tmp_path / "pipelines" / "rag"
    with pytest.raises(PipelineLoadError, match=r"is neither a file \(no such file: .*pipelines/rag\)") as info:
        load_pipeline(str(missing))
    assert "pass the path of a pipeline YAML file" in str(info.value)


def test_an_existing_file_that_holds_no_pipeline_is_not_called_missing(tmp_path: Path) -> None:
    from haystack_integrations.common.multimodal_rag.errors import PipelineLoadError

    notes = tmp_path / "notes.txt"
    notes.write_text("just a line of text\n", encoding="utf-8")
    with pytest.raises(PipelineLoadError, match="a pipeline YAML is a mapping") as info:
        load_pipeline(str(notes))
    assert "no such file" not in str(info.value)


def test_the_mistyped_path_message_names_the_path_it_looked_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from haystack_integrations.common.multimodal_rag.errors import PipelineLoadError

    # '~' is not expanded when reading, so the message must not call the expanded path (which exists) missing.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "rag").write_text("components: {}\n", encoding="utf-8")
    with pytest.raises(PipelineLoadError, match="'~' is not expanded here") as info:
        load_pipeline("~/pipelines/rag")
    assert f"no such file: {tmp_path / 'pipelines' / 'rag'})" not in str(info.value)
    # YAML text of several lines that is one string is not a path: no 'no such file' for it.
    with pytest.raises(PipelineLoadError, match="a pipeline YAML is a mapping") as info:
        load_pipeline("|\n  a block of text\n  on two lines\n")
    assert "no such file" not in str(info.value)


def test_a_binary_file_given_as_the_pipeline_is_a_clear_error(tmp_path: Path) -> None:
    binary = tmp_path / "pipeline.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xd0\xff")
    with pytest.raises(PipelineLoadError, match="is not a YAML file \\(not UTF-8 text"):
        load_pipeline(binary)
    with pytest.raises(TypeError, match="source must be a YAML file path or YAML text, got a int"):
        load_pipeline(5)  # type: ignore[arg-type]


def test_the_openai_switch_refuses_generation_kwargs_that_are_not_a_mapping() -> None:
    data = {"components": {"gen": {"type": _LOCAL_VLM, "init_parameters": {"generation_kwargs": [1]}}}}
    with pytest.raises(PipelineLoadError, match="'gen' has generation_kwargs that are not a mapping"):
        rewrite_pipeline_dict(data, generator="openai")


def test_components_nested_in_a_list_are_rewritten_like_dict_nested_ones(tmp_path: Path) -> None:
    tool = {"type": "haystack.tools.tool.Tool", "data": {"name": "t"}}
    data = {
        "components": {
            "wrapper": {
                "type": "some.package.Wrapper",
                "init_parameters": {
                    "rankers": [
                        {"type": _COLPALI_RANKER, "init_parameters": {"model": "old"}},
                        {"type": _COLPALI_RANKER},
                        [{"type": _COLPALI_RANKER, "init_parameters": {}}],
                    ],
                    "tools": [tool],
                },
            }
        }
    }
    out = rewrite_pipeline_dict(data, base_dir=tmp_path, models={"colpali": "new"})
    rankers = out["components"]["wrapper"]["init_parameters"]["rankers"]
    for ranker in (rankers[0], rankers[1], rankers[2][0]):
        assert ranker["init_parameters"] == {"model": "new", "root_path": str(tmp_path.resolve())}
    # A serialized object that is not a component of ours (a Tool: `type` + `data`) is left as it was.
    assert out["components"]["wrapper"]["init_parameters"]["tools"] == [tool]


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (["dense"], r"models must be a mapping like \{'dense': model_id\}, got a list"),
        ("dense", "models must be a mapping like .*got a str"),
        ({"colpali": None}, r"models\['colpali'\] is None; expected a model id or a local checkpoint path"),
        ({"colpali": ""}, r"models\['colpali'\] is ''"),
        ({"colpali": 5}, r"models\['colpali'\] is 5"),
    ],
)
def test_models_that_is_not_a_mapping_of_model_ids_is_refused(models: object, message: str) -> None:
    data = {"components": {"ranker": {"type": _COLPALI_RANKER, "init_parameters": {"model": "old"}}}}
    with pytest.raises(PipelineLoadError, match=message):
        rewrite_pipeline_dict(data, models=models)  # type: ignore[arg-type]


def test_a_model_given_as_a_path_object_is_written_as_a_string(tmp_path: Path) -> None:
    data = {"components": {"ranker": {"type": _COLPALI_RANKER, "init_parameters": {"model": "old"}}}}
    out = rewrite_pipeline_dict(data, models={"colpali": tmp_path})  # type: ignore[dict-item]
    assert out["components"]["ranker"]["init_parameters"]["model"] == str(tmp_path)
