"""Every error this package raises derives from `MultimodalRAGError`.

This module is public: `from haystack_integrations.common.multimodal_rag.errors import ModelLoadError`
(also importable from `haystack_integrations.common.multimodal_rag`). Catch `MultimodalRAGError` to handle
any of them; each also derives from the builtin it used to be (`ValueError` or `RuntimeError`), so existing
`except ValueError` code keeps working.
"""

from __future__ import annotations

from haystack.errors import FilterError


class MultimodalRAGError(Exception):
    """Base class of every error raised by multimodal-rag-haystack."""


class DocumentProcessingError(MultimodalRAGError, ValueError):
    """
    Raised when one or more documents cannot be processed and `on_error="raise"`.

    The message names every failing document id with its reason; `failures` holds the same pairs.
    """

    def __init__(self, component: str, failures: list[tuple[str, str]]) -> None:
        """
        Create the error.

        :param component: Name of the component that failed (used in the message).
        :param failures: `(document_id, reason)` pairs, in input order.
        """
        self.component = component
        self.failures = list(failures)
        lines = "\n".join(f"  - document '{doc_id}': {reason}" for doc_id, reason in self.failures)
        noun = "document" if len(self.failures) == 1 else "documents"
        super().__init__(
            f"{component}: {len(self.failures)} {noun} could not be processed "
            f"(nothing was returned; pass on_error='skip' to get them back in 'failed_documents'):\n{lines}"
        )


class MediaError(MultimodalRAGError, ValueError):
    """A document's text, image or PDF page is unusable; the message is the reason (and names the file)."""


class ConversionError(MultimodalRAGError, ValueError):
    """Raised by the converter with `on_error="raise"` when files cannot be converted; names every file."""


class ModelLoadError(MultimodalRAGError, RuntimeError):
    """A model or processor could not be loaded; the message says which and how to fix it."""


class MultiVectorStoreError(MultimodalRAGError, ValueError):
    """A multi-vector store was used with vectors or settings it cannot accept."""


class DriftStateError(MultimodalRAGError, RuntimeError):
    """The drift monitor's state file cannot be read or written; the message names the file."""


class EmbeddingModelMismatchError(MultimodalRAGError, ValueError):
    """
    A document store holds vectors of another embedding model than the component's.

    Vectors of different models live in different spaces: mixing them in one index, or querying an index with
    another model, silently returns wrong results. The message names both models and how to migrate.
    """


class PipelineLoadError(MultimodalRAGError, ValueError):
    """A pipeline YAML cannot be loaded safely (for example an alias bomb); the message says why."""


class InvalidFiltersError(MultimodalRAGError, FilterError, ValueError):
    """
    Filters that are not a Haystack filter: not a mapping, a non-string key, or a filter that contains itself.

    Also a Haystack `FilterError`, so code that catches a store's filter errors catches it; the message shows the
    filters.
    """


class ComponentOutputError(MultimodalRAGError, TypeError):
    """A wrapped component returned output that breaks its contract (a retriever without a `documents` list)."""


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
