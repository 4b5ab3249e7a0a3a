"""Retrieval evaluation of multimodal RAG pipelines: metrics, datasets, `evaluate` and the `mmrag-eval` command."""

from haystack_integrations.evaluation.multimodal_rag.dataset import CorpusEntry, QueryEntry, RetrievalDataset
from haystack_integrations.evaluation.multimodal_rag.datasets import (
    caption_queries,
    corpus_from_documents,
    load_beir_dataset,
    load_dataset,
    load_synthetic_dataset,
    load_vidore_dataset,
)
from haystack_integrations.evaluation.multimodal_rag.evaluate import EvaluationResult, evaluate, retrieval_part
from haystack_integrations.evaluation.multimodal_rag.metrics import retrieval_metrics
from haystack_integrations.evaluation.multimodal_rag.stage_timer import StageTimer
from haystack_integrations.evaluation.multimodal_rag.trec import write_trec_run

__all__ = [
    "CorpusEntry",
    "EvaluationResult",
    "QueryEntry",
    "RetrievalDataset",
    "StageTimer",
    "caption_queries",
    "corpus_from_documents",
    "evaluate",
    "load_beir_dataset",
    "load_dataset",
    "load_synthetic_dataset",
    "load_vidore_dataset",
    "retrieval_metrics",
    "retrieval_part",
    "write_trec_run",
]
