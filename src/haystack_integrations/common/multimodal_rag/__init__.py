"""Shared internals of multimodal-rag-haystack, sorted by kind.

Public: `errors` (re-exported here). Private (no stability promise): `backends/` (model loading, one module
per model family), `inputs/` (the one pixel/PDF loader, document planning, failure bookkeeping),
`numerics/` (MaxSim, statistics, ranking rules) and `validation` (parameter checks). Importing this package
has no side effects.
"""

from haystack_integrations.common.multimodal_rag.errors import (
    ComponentOutputError,
    ConversionError,
    DocumentProcessingError,
    DriftStateError,
    EmbeddingModelMismatchError,
    InvalidFiltersError,
    MediaError,
    ModelLoadError,
    MultimodalRAGError,
    MultiVectorStoreError,
    PipelineLoadError,
)

__all__ = [
    "ComponentOutputError",
    "ConversionError",
    "DocumentProcessingError",
    "DriftStateError",
    "EmbeddingModelMismatchError",
    "InvalidFiltersError",
    "MediaError",
    "ModelLoadError",
    "MultiVectorStoreError",
    "MultimodalRAGError",
    "PipelineLoadError",
]
