"""The `mmrag-eval` console script: measure the retrieval quality of the package's pipelines on a dataset."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from haystack.core.errors import PipelineError, PipelineRuntimeError

from haystack_integrations.common.multimodal_rag.errors import MultimodalRAGError
from haystack_integrations.evaluation.multimodal_rag.datasets import load_dataset
from haystack_integrations.evaluation.multimodal_rag.evaluate import DEFAULT_INDEXING, DEFAULT_QUERY, evaluate
from haystack_integrations.evaluation.multimodal_rag.trec import write_trec_run
from haystack_integrations.pipelines.multimodal_rag.loader import MODEL_KEYS

_DESCRIPTION = """\
Evaluate the retrieval of a multimodal RAG pipeline on a dataset.

Indexes the dataset's corpus with the indexing pipeline (into --base-dir), runs the retrieval part of the query
pipeline (up to its final ranking stage: no prompt builder, no generator) for every query, and writes to --output:
  report.json  nDCG@k, Recall@k, MRR@10 overall and per modality of the relevant documents (text/image/page),
               query counts, per-stage latency p50/p95 (ms)
  run.trec     the rankings in the six-column TREC run format (qid Q0 docid rank score tag)
and prints a table.

Dataset folders (--dataset), detected automatically:
  BEIR-style   corpus.jsonl (_id + text, or path of an image/PDF + page_number), queries.jsonl (_id + text, or
               image for query-by-image), qrels/test.tsv (query-id, corpus-id, score)
  ViDoRe       vidore.jsonl + images, exported locally from a Hugging Face ViDoRe v1 dataset
  synthetic    corpus.jsonl only: images/pages with a caption (or alt_text) in their fields become caption queries
See the README section "Evaluating retrieval quality".
"""

_EPILOG = """\
example (ColQwen2.5 default pipelines on ViDoRe DocVQA exported to data/docvqa_test_subsampled):
  mmrag-eval --dataset data/docvqa_test_subsampled --output runs/docvqa
"""


def _models(value: str) -> dict[str, str]:
    models: dict[str, str] = {}
    for item in value.split(","):
        key, sep, model = item.partition("=")
        key, model = key.strip(), model.strip()
        if not sep or key not in MODEL_KEYS or not model:
            msg = f"expected {','.join(f'{k}=ID' for k in MODEL_KEYS)} (any subset), got {item!r}"
            raise argparse.ArgumentTypeError(msg)
        models[key] = model
    return models


def _k_values(value: str) -> list[int]:
    try:
        ks = [int(k) for k in value.split(",") if k.strip()]
    except ValueError as e:
        msg = f"expected comma-separated positive integers, got {value!r}"
        raise argparse.ArgumentTypeError(msg) from e
    if not ks or any(k < 1 for k in ks):
        msg = f"expected comma-separated positive integers, got {value!r}"
        raise argparse.ArgumentTypeError(msg)
    return ks


def _param(value: str) -> tuple[str, str, Any]:
    target, sep, raw = value.partition("=")
    component, dot, name = target.partition(".")
    if not sep or not dot or not component or not name:
        msg = f"expected COMPONENT.INPUT=VALUE (e.g. retriever.top_k=500), got {value!r}"
        raise argparse.ArgumentTypeError(msg)
    try:
        parsed: Any = json.loads(raw)
    except json.JSONDecodeError:
        parsed = raw
    return component, name, parsed


def build_parser() -> argparse.ArgumentParser:
    """
    The argument parser of `mmrag-eval`.

    :returns: The parser.
    """
    parser = argparse.ArgumentParser(
        prog="mmrag-eval",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, type=Path, metavar="DIR", help="the dataset folder")
    parser.add_argument(
        "--format",
        choices=("auto", "beir", "vidore", "synthetic"),
        default="auto",
        help="dataset layout (default: detected from the folder's files)",
    )
    parser.add_argument("--split", default="test", help="qrels split of a BEIR-style folder (default: test)")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR", help="where report.json and run.trec go")
    parser.add_argument(
        "--indexing",
        type=Path,
        default=DEFAULT_INDEXING,
        metavar="YAML",
        help="indexing pipeline (default: the shipped indexing.yaml)",
    )
    parser.add_argument(
        "--no-indexing",
        action="store_true",
        help="skip indexing and reuse the index already in --base-dir (built by an earlier run on this dataset)",
    )
    parser.add_argument(
        "--query",
        type=Path,
        default=DEFAULT_QUERY,
        metavar="YAML",
        help="query pipeline for text queries (default: the shipped rag.yaml, cut before the prompt builder)",
    )
    parser.add_argument(
        "--image-query",
        type=Path,
        default=None,
        metavar="YAML",
        help="query pipeline for image queries (query-by-image)",
    )
    parser.add_argument(
        "--base-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder the pipelines' relative store paths (index/...) resolve in; the index is built there "
        "(default: --output)",
    )
    parser.add_argument(
        "--models",
        type=_models,
        default=None,
        metavar="dense=ID,colpali=ID,vlm=ID",
        help="replace the pipelines' model ids (Hub ids or local folders), as load_pipeline(models=...)",
    )
    parser.add_argument(
        "--embedding-dim", type=int, default=None, metavar="N", help="dense vector size of the document store"
    )
    parser.add_argument("--qdrant-url", default=None, metavar="URL", help="Qdrant server (default: $QDRANT_URL)")
    parser.add_argument(
        "--stop-after",
        default=None,
        metavar="COMPONENT",
        help="final ranking stage (default: the query pipeline's last ranker, e.g. 'calibrator' in rag.yaml)",
    )
    parser.add_argument(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="COMPONENT.INPUT=VALUE",
        help="run-time input of a component, JSON-parsed, repeatable (e.g. --param retriever.top_k=500)",
    )
    parser.add_argument(
        "--k", type=_k_values, default=[1, 5, 10, 100], metavar="K,K,...", help="cut-offs (default: 1,5,10,100)"
    )
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="corpus entries per indexing run")
    parser.add_argument("--tag", default="mmrag", help="run tag in run.trec (default: mmrag)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def format_table(report: dict[str, Any]) -> str:
    """
    Render a report as a plain-text table.

    :param report: The report of `evaluate`.
    :returns: The table.
    """
    keys = list(report["overall"])
    counts = report["queries"]
    lines = [
        f"dataset {report['dataset']}: {report['corpus']['documents']} documents, "
        f"{counts['evaluated']} of {counts['total']} queries evaluated",
        "",
        f"{'':<10}" + "".join(f"{k:>11}" for k in keys) + f"{'queries':>9}",
    ]
    rows = [("overall", report["overall"], counts["evaluated"])]
    rows += [(m, v, counts["by_modality"].get(m, 0)) for m, v in report["by_modality"].items()]
    for name, metrics, n in rows:
        lines.append(f"{name:<10}" + "".join(f"{metrics[k]:>11.4f}" for k in keys) + f"{n:>9}")
    width = max([len("latency (ms)"), *(len(s) for s in report["latency_ms"])])
    lines += ["", f"{'latency (ms)':<{width}}{'p50':>10}{'p95':>10}"]
    for stage, summary in report["latency_ms"].items():
        lines.append(f"{stage:<{width}}{summary['p50']:>10.2f}{summary['p95']:>10.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run `mmrag-eval`.

    :param argv: Arguments (default: `sys.argv[1:]`).
    :returns: The exit status: 0 on success; argparse exits with 2 on a usage, dataset, pipeline or model error
        (one `error:` line on stderr).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    run_params: dict[str, dict[str, Any]] = {}
    for component, name, value in args.param:
        run_params.setdefault(component, {})[name] = value
    try:
        dataset = load_dataset(args.dataset, format=args.format, split=args.split)
        for label, path in (("--indexing", None if args.no_indexing else args.indexing), ("--query", args.query)):
            if path is not None and not Path(path).is_file():
                msg = (
                    f"{label} {path} does not exist (the defaults ship with the package; "
                    "reinstall it, or pass --indexing/--query)"
                )
                raise FileNotFoundError(msg)
        output: Path = args.output
        output.mkdir(parents=True, exist_ok=True)
        result = evaluate(
            dataset,
            base_dir=args.base_dir if args.base_dir is not None else output,
            indexing_pipeline=None if args.no_indexing else args.indexing,
            query_pipeline=args.query,
            image_query_pipeline=args.image_query,
            models=args.models,
            embedding_dim=args.embedding_dim,
            qdrant_url=args.qdrant_url,
            stop_after=args.stop_after,
            run_params=run_params,
            k_values=args.k,
            batch_size=args.batch_size,
            progress_bar=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, MultimodalRAGError, PipelineError, PipelineRuntimeError) as e:
        # Configuration and data errors (a bad YAML, a corrupt corpus image named with its document id, a model
        # that cannot load): one line, no traceback.
        message = " ".join(str(e).split())
        parser.exit(2, f"error: {message}\n")
    (output / "report.json").write_text(json.dumps(result.report, indent=2) + "\n", encoding="utf-8")
    write_trec_run(result.run, output / "run.trec", tag=args.tag)
    print(format_table(result.report))
    print(f"\nwrote {output / 'report.json'} and {output / 'run.trec'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
