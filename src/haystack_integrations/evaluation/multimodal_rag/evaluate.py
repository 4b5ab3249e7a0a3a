"""Index an evaluation dataset with an indexing pipeline, run the retrieval part of a query pipeline, score it."""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import yaml
from haystack import Document, Pipeline, logging
from haystack.core.serialization import import_class_by_name
from tqdm import tqdm

from haystack_integrations.evaluation.multimodal_rag.dataset import QueryEntry, RetrievalDataset
from haystack_integrations.evaluation.multimodal_rag.metrics import per_query_metrics, retrieval_metrics
from haystack_integrations.evaluation.multimodal_rag.stage_timer import StageTimer, latency_summary
from haystack_integrations.pipelines.multimodal_rag import load_pipeline, shipped_pipeline

logger = logging.getLogger(__name__)

#: A source checkout's pipelines (wheels carry the same files inside the package: see `shipped_pipeline`).
EXAMPLES_DIR = Path(__file__).resolve().parents[4] / "examples" / "pipelines"


def _default_pipeline(name: str) -> Path:
    try:
        return shipped_pipeline(name)
    except FileNotFoundError:
        return EXAMPLES_DIR / name  # reported as missing when used


DEFAULT_INDEXING = _default_pipeline("indexing.yaml")
DEFAULT_QUERY = _default_pipeline("rag.yaml")

# Input sockets that receive the query: text to `text`/`query`, a query image (its path) to `image`.
_TEXT_SOCKETS = ("text", "query")
_IMAGE_SOCKETS = ("image",)


@dataclass
class EvaluationResult:
    """
    What `evaluate` returns.

    :param report: The JSON-serialisable report (see `evaluate`).
    :param run: `{query_id: {doc_id: score}}`, the final stage's ranking of every query.
    :param per_query: `{query_id: {metric: value}}` for the queries with a relevant document.
    """

    report: dict[str, Any]
    run: dict[str, dict[str, float]]
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)


def _read_yaml(source: str | Path) -> tuple[dict[str, Any], str]:
    """A pipeline YAML given as a file path or as YAML text: `(its dict, a label for the report)`."""
    if isinstance(source, Path) or "\n" not in source:
        path = Path(source)
        if not path.is_file():
            msg = f"pipeline YAML '{path}' does not exist"
            raise ValueError(msg)
        data, label = yaml.safe_load(path.read_text(encoding="utf-8")), str(path)
    else:
        data, label = yaml.safe_load(source), "<yaml text>"
    if not isinstance(data, dict) or not isinstance(data.get("components"), dict):
        msg = f"{label} is not a serialized Haystack pipeline (no 'components' mapping)"
        raise ValueError(msg)
    return data, label


def _topological_order(data: Mapping[str, Any]) -> tuple[list[str], nx.DiGraph]:
    graph = nx.DiGraph()
    graph.add_nodes_from(data.get("components", {}))
    for connection in data.get("connections", []):
        graph.add_edge(connection["sender"].split(".")[0], connection["receiver"].split(".")[0])
    position = {name: i for i, name in enumerate(graph.nodes)}
    try:
        order = list(nx.lexicographical_topological_sort(graph, key=lambda name: position[name]))
    except nx.NetworkXUnfeasible:  # a loop: fall back to declaration order
        order = list(graph.nodes)
    return order, graph


def retrieval_part(data: Mapping[str, Any], stop_after: str | None = None) -> tuple[dict[str, Any], str]:
    """
    Cut a serialized query pipeline down to its retrieval part: the final ranking stage and everything it
    depends on. Prompt builders, generators and pass-through monitors after it are dropped before any component
    is built, so no generator model is ever constructed.

    The final ranking stage is `stop_after` when given; otherwise the last component (in topological order)
    whose class lives in a `rankers` package (Haystack's naming convention: `...components.rankers...`), else
    the last one in a `retrievers` package. In the shipped `rag.yaml` that is the `calibrator`
    (`ModalityScoreCalibrator`): text embedder -> retriever -> ColPali ranker -> calibrator.

    :param data: The pipeline as a dict (e.g. `yaml.safe_load` of a YAML file).
    :param stop_after: Name of the component whose `documents` are the ranking.
    :returns: `(the cut dict, the final stage's name)`.
    :raises ValueError: When `stop_after` is not a component, or no ranker/retriever can be found.
    """
    components = data.get("components", {})
    order, graph = _topological_order(data)
    if stop_after is None:
        for package in (".rankers.", ".retrievers."):
            candidates = [name for name in order if package in str(components[name].get("type", ""))]
            if candidates:
                stop_after = candidates[-1]
                break
        else:
            msg = "the query pipeline has no ranker or retriever component: name the final stage with stop_after"
            raise ValueError(msg)
    elif stop_after not in components:
        msg = f"stop_after={stop_after!r} is not a component of the query pipeline (it has {list(components)})"
        raise ValueError(msg)
    keep = nx.ancestors(graph, stop_after) | {stop_after}
    cut = dict(data)
    cut["components"] = {name: spec for name, spec in components.items() if name in keep}
    cut["connections"] = [
        c
        for c in data.get("connections", [])
        if c["sender"].split(".")[0] in keep and c["receiver"].split(".")[0] in keep
    ]
    return cut, stop_after


def _for_evaluation(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """Resolve file paths in the dataset folder and silence the components' own progress bars."""
    out = dict(data)
    out["components"] = {}
    for name, spec in data.get("components", {}).items():
        spec = {**spec, "init_parameters": dict(spec.get("init_parameters") or {})}
        accepted: Mapping[str, Any]
        try:
            accepted = inspect.signature(import_class_by_name(spec["type"]).__init__).parameters
        except Exception:  # unknown class: Pipeline.from_dict reports it with its own message
            accepted = {}
        if "root_path" in accepted:
            # Corpus and query-image paths are relative to the dataset folder, and stay confined to it.
            spec["init_parameters"]["root_path"] = str(root)
        if "progress_bar" in accepted:
            spec["init_parameters"]["progress_bar"] = False
        out["components"][name] = spec
    return out


def _load(
    data: dict[str, Any],
    *,
    base_dir: Path,
    models: dict[str, str] | None,
    embedding_dim: int | None,
    qdrant_url: str | None,
) -> Pipeline:
    return load_pipeline(
        yaml.safe_dump(data, sort_keys=False),
        base_dir=base_dir,
        models=models,
        embedding_dim=embedding_dim,
        qdrant_url=qdrant_url,
    )


def _close(pipeline: Pipeline) -> None:
    seen: set[int] = set()
    for _, instance in pipeline.walk():
        store = getattr(instance, "document_store", None)
        if store is not None and id(store) not in seen and hasattr(store, "close"):
            seen.add(id(store))
            store.close()
    pipeline.close()


def _index(
    dataset: RetrievalDataset,
    pipeline: Pipeline,
    *,
    batch_size: int,
    progress_bar: bool,
) -> dict[str, Any]:
    converters = [name for name, sockets in pipeline.inputs().items() if "sources" in sockets]
    for name in converters:
        # Corpus entries become Documents directly (with the dataset's ids); the converter is not needed.
        pipeline.remove_component(name)
    entries = [
        name
        for name, sockets in pipeline.inputs().items()
        if "documents" in sockets and sockets["documents"]["is_mandatory"]
    ]
    if not entries:
        msg = "the indexing pipeline has no component that takes 'documents' after its converter"
        raise ValueError(msg)
    written = 0
    start = time.perf_counter()
    with tqdm(total=len(dataset.corpus), desc="indexing", unit="doc", disable=not progress_bar) as bar:
        for i in range(0, len(dataset.corpus), batch_size):
            batch = dataset.corpus[i : i + batch_size]
            documents = [entry.to_document() for entry in batch]
            result = pipeline.run({name: {"documents": documents} for name in entries})
            written += sum(int(out.get("documents_written", 0)) for out in result.values() if isinstance(out, dict))
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    return {
        "documents": len(dataset.corpus),
        "documents_written": written,
        "seconds": seconds,
        "index_documents": _index_size(pipeline),
    }


def _query_inputs(
    pipeline_inputs: Mapping[str, Mapping[str, Any]], query: QueryEntry, run_params: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    inputs: dict[str, dict[str, Any]] = {name: dict(params) for name, params in run_params.items()}
    missing = []
    for name, sockets in pipeline_inputs.items():
        for socket, info in sockets.items():
            if socket in inputs.get(name, {}):
                continue
            if query.text is not None and socket in _TEXT_SOCKETS:
                inputs.setdefault(name, {})[socket] = query.text
            elif query.image is not None and socket in _IMAGE_SOCKETS:
                inputs.setdefault(name, {})[socket] = query.image
            elif info["is_mandatory"]:
                missing.append(f"{name}.{socket}")
    if missing:
        kind = "text" if query.text is not None else "image"
        msg = f"query '{query.id}' ({kind}): the query pipeline needs {missing}, which a {kind} query cannot fill" + (
            " (pass an image query pipeline for query-by-image)" if kind == "image" else ""
        )
        raise ValueError(msg)
    return inputs


def _corpus_id(document: Document) -> str:
    # A chunk made by Haystack's DocumentSplitter (the shipped indexing.yaml splits text for the dense encoder)
    # has a new id and records its corpus document in meta["source_id"].
    source_id = document.meta.get("source_id")
    return source_id if isinstance(source_id, str) and source_id else document.id


def _ranking(documents: list[Document]) -> dict[str, float]:
    """
    `{corpus_doc_id: score}` of one query; rank-derived scores when the stage returns none.

    Chunks of one corpus document are scored by their best chunk (max-passage, as BEIR-style evaluations of
    passage retrievers do).
    """
    scores: dict[str, float] = {}
    use_rank = any(d.score is None for d in documents)
    for i, d in enumerate(documents):
        value = float(len(documents) - i) if use_rank else float(d.score)  # type: ignore[arg-type]
        key = _corpus_id(d)
        scores[key] = max(value, scores.get(key, float("-inf")))
    return scores


def modality_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    modalities: Mapping[str, str],
    k_values: Iterable[int],
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """
    Metrics per modality of the relevant documents.

    For modality m, each query is judged only on its relevant documents of modality m; its relevant documents of
    other modalities are removed from its ranking (they neither help nor hurt). A query with relevant documents
    of two modalities counts in both.

    :param run: `{query_id: {doc_id: score}}`.
    :param qrels: `{query_id: {doc_id: relevance}}`.
    :param modalities: `{doc_id: modality}` of the corpus.
    :param k_values: Cut-offs.
    :returns: `({modality: metrics}, {modality: number of queries})`.
    """
    ks = list(k_values)
    grouped: dict[str, tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]] = {}
    for query_id, relevance in qrels.items():
        relevant = {d: r for d, r in relevance.items() if r > 0 and d in modalities}
        for modality in sorted({modalities[d] for d in relevant}):
            others = {d for d in relevant if modalities[d] != modality}
            sub_qrels, sub_run = grouped.setdefault(modality, ({}, {}))
            sub_qrels[query_id] = {d: r for d, r in relevant.items() if modalities[d] == modality}
            sub_run[query_id] = {d: s for d, s in run.get(query_id, {}).items() if d not in others}
    metrics = {m: retrieval_metrics(sub_run, sub_qrels, ks) for m, (sub_qrels, sub_run) in sorted(grouped.items())}
    counts = {m: len(sub_qrels) for m, (sub_qrels, _) in sorted(grouped.items())}
    return metrics, counts


def _index_size(pipeline: Pipeline) -> int | None:
    """Documents in the store a writer (`DocumentWriter.document_store`) of the indexing pipeline writes to."""
    for _, instance in pipeline.walk():
        store = getattr(instance, "document_store", None)
        if store is not None and hasattr(store, "count_documents"):
            return int(store.count_documents())
    return None


def evaluate(
    dataset: RetrievalDataset,
    *,
    base_dir: str | Path,
    indexing_pipeline: str | Path | None = DEFAULT_INDEXING,
    query_pipeline: str | Path = DEFAULT_QUERY,
    image_query_pipeline: str | Path | None = None,
    models: dict[str, str] | None = None,
    embedding_dim: int | None = None,
    qdrant_url: str | None = None,
    stop_after: str | None = None,
    run_params: Mapping[str, Mapping[str, Any]] | None = None,
    k_values: Iterable[int] = (1, 5, 10, 100),
    batch_size: int = 32,
    warmup_queries: int = 1,
    progress_bar: bool = True,
) -> EvaluationResult:
    """
    Index a dataset, run the retrieval part of a query pipeline for every query, and measure it.

    1. **Indexing** (skipped when `indexing_pipeline` is `None`: the index in `base_dir` is reused): the YAML is
       loaded with `load_pipeline` (same `base_dir`, `models`, `embedding_dim`, `qdrant_url`); its converter (a
       component with a `sources` input) is removed and the corpus entries are fed as Documents, with the
       dataset's ids, to what followed it, `batch_size` entries per run.
    2. **Querying**: the query YAML is cut to its retrieval part (`retrieval_part`: up to the final ranking stage,
       without prompt builder, generator or monitor) and loaded likewise. Text queries go to every input socket
       named `text` or `query`, image queries (their path) to sockets named `image`, in `image_query_pipeline`
       when given. `run_params` adds run-time inputs, e.g. `{"retriever": {"top_k": 500}}`.
       Every component that takes `root_path` gets the dataset folder, so relative paths resolve there.
    3. **Timing**: each component run is timed through Haystack's tracing spans (`StageTimer`); the first
       `warmup_queries` queries are run once untimed first (model and kernel warm-up).

    The report (JSON-serialisable):

    - `overall`: `retrieval_metrics` of the final stage's rankings (`ndcg@k`, `recall@k`, `mrr@10`);
    - `by_modality`: the same per modality of the relevant documents (`modality_metrics`);
    - `queries`: `{"total", "evaluated" (with a relevant document), "text", "image", "by_modality"}` counts;
    - `latency_ms`: per stage (the component's name; `image/<name>` in the image query pipeline) and `total`
      (one pipeline run): `p50`, `p95`, `mean` in milliseconds, and `n` runs;
    - `corpus`, `indexing`, `pipeline`, `k_values`: what was measured.

    :param dataset: The dataset (see `datasets.load_dataset`).
    :param base_dir: Folder the pipelines' relative store paths (`index/...`) resolve in: the index is built there.
    :param indexing_pipeline: Indexing YAML (path or text), or `None` to reuse the index in `base_dir`.
    :param query_pipeline: Query YAML (path or text) for text queries.
    :param image_query_pipeline: Query YAML for image queries (one with an `image` input, e.g. a
        `MultimodalImageEmbedder` feeding the retriever); required when the dataset has image queries.
    :param models: `{"dense": id, "colpali": id, "vlm": id, "reranker": id}` as for `load_pipeline`.
    :param embedding_dim: Dense vector size of the document store, as for `load_pipeline`.
    :param qdrant_url: Qdrant server URL, as for `load_pipeline` (default: `QDRANT_URL`).
    :param stop_after: The final ranking stage's component name (default: see `retrieval_part`).
    :param run_params: Extra run-time inputs per component.
    :param k_values: Cut-offs of `ndcg@k` and `recall@k`.
    :param batch_size: Corpus entries per indexing pipeline run.
    :param warmup_queries: Queries run once, untimed, before the measured pass.
    :param progress_bar: Show tqdm progress bars while indexing and querying.
    :returns: The report, the run and per-query metrics.
    :raises ValueError: On an empty dataset, image queries without an image query pipeline, a query pipeline
        input that queries cannot fill, or an unknown `stop_after`.
    """
    ks = list(k_values)
    if not dataset.queries or not dataset.corpus:
        msg = f"dataset '{dataset.name}' has {len(dataset.corpus)} documents and {len(dataset.queries)} queries"
        raise ValueError(msg)
    if not any(r > 0 for rels in dataset.qrels.values() for r in rels.values()):
        msg = f"dataset '{dataset.name}': no query has a relevant document (relevance > 0) in its qrels"
        raise ValueError(msg)
    image_queries = [q for q in dataset.queries if q.image is not None]
    if image_queries and image_query_pipeline is None:
        msg = (
            f"dataset '{dataset.name}' has {len(image_queries)} image queries (e.g. '{image_queries[0].id}'): "
            "pass image_query_pipeline, a query YAML with an 'image' input"
        )
        raise ValueError(msg)
    base = Path(base_dir).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    settings = {"base_dir": base, "models": models, "embedding_dim": embedding_dim, "qdrant_url": qdrant_url}
    params = {name: dict(p) for name, p in (run_params or {}).items()}

    # Build the query pipelines first: a wrong stop_after or YAML fails before minutes of indexing.
    by_kind = {
        "text": [q for q in dataset.queries if q.image is None],
        "image": image_queries,
    }
    sources = {"text": query_pipeline, "image": image_query_pipeline}
    plans: dict[str, tuple[dict[str, Any], str, str]] = {}
    for kind, source in sources.items():
        if source is None or not by_kind[kind]:
            continue
        data, label = _read_yaml(source)
        cut, final = retrieval_part(data, stop_after)
        plans[kind] = (_for_evaluation(cut, dataset.root), final, label)
    known = {name for plan in plans.values() for name in plan[0]["components"]}
    unknown = sorted(set(params) - known)
    if unknown:
        msg = f"run_params name components {unknown} that are not in the retrieval part ({sorted(known)})"
        raise ValueError(msg)

    indexing: dict[str, Any] = {"skipped": True, "index_documents": None}
    indexing_label = None
    if indexing_pipeline is not None:
        data, indexing_label = _read_yaml(indexing_pipeline)
        pipe = _load(_for_evaluation(data, dataset.root), **settings)  # type: ignore[arg-type]
        try:
            indexing = _index(dataset, pipe, batch_size=batch_size, progress_bar=progress_bar)
        finally:
            _close(pipe)

    index_size = indexing.get("index_documents")
    if index_size is not None and index_size != len(dataset.corpus):
        logger.warning(
            "The index in {base} holds {n} documents but the dataset has {m}: rankings include the difference",
            base=str(base),
            n=index_size,
            m=len(dataset.corpus),
        )

    pipelines = {kind: _load(plan[0], **settings) for kind, plan in plans.items()}  # type: ignore[arg-type]
    run: dict[str, dict[str, float]] = {}
    totals: list[float] = []
    timers = {kind: StageTimer() for kind in pipelines}
    try:
        for kind, pipe in pipelines.items():
            queries = by_kind[kind]
            sockets = pipe.inputs()
            own = {name: p for name, p in params.items() if name in plans[kind][0]["components"]}
            inputs = [_query_inputs(sockets, q, own) for q in queries]  # fail fast on unfillable inputs
            pipe.warm_up()
            final = plans[kind][1]
            timer = timers[kind]
            with timer:
                timer.recording = False
                for query_inputs in inputs[: max(0, warmup_queries)]:
                    pipe.run(query_inputs, include_outputs_from={final})
                timer.recording = True
                for query, query_inputs in tqdm(
                    list(zip(queries, inputs, strict=True)),
                    desc=f"querying ({kind})",
                    unit="query",
                    disable=not progress_bar,
                ):
                    start = time.perf_counter()
                    result = pipe.run(query_inputs, include_outputs_from={final})
                    totals.append(time.perf_counter() - start)
                    run[query.id] = _ranking(result[final]["documents"])
    finally:
        for pipe in pipelines.values():
            _close(pipe)
    modalities = dataset.modalities()
    per_query = per_query_metrics(run, dataset.qrels, ks)
    overall = retrieval_metrics(run, dataset.qrels, ks)
    by_modality, modality_counts = modality_metrics(run, dataset.qrels, modalities, ks)
    # Stages of the image query pipeline are prefixed (`image/retriever`): both pipelines may name a `retriever`.
    latency: dict[str, dict[str, float]] = {}
    stages: list[str] = []
    for kind, plan in plans.items():
        for name in plan[0]["components"]:
            label = name if kind == "text" else f"image/{name}"
            stages.append(label)
            latency[label] = latency_summary(timers[kind].durations.get(name, []))
    latency["total"] = latency_summary(totals)
    report = {
        "dataset": dataset.name,
        "k_values": sorted(set(ks)),
        "overall": overall,
        "by_modality": by_modality,
        "queries": {
            "total": len(dataset.queries),
            "evaluated": len(per_query),
            "text": len(dataset.queries) - len(image_queries),
            "image": len(image_queries),
            "by_modality": modality_counts,
        },
        "corpus": {"documents": len(dataset.corpus), "by_modality": dict(Counter(modalities.values()))},
        "latency_ms": latency,
        "indexing": indexing,
        "pipeline": {
            "indexing": indexing_label,
            "query": plans["text"][2] if "text" in plans else None,
            "image_query": plans["image"][2] if "image" in plans else None,
            "stages": stages,
            "final_stage": {kind: plan[1] for kind, plan in plans.items()},
            "run_params": params,
        },
    }
    return EvaluationResult(report=report, run=run, per_query=per_query)
