"""The embedding-model guard of a dense index: one model per index, checked once per store.

Vectors of two models are not comparable, yet nothing in a vector store says which model made a vector: upgrading
the model without re-indexing silently returns wrong results. `MultimodalDocumentEmbedder` therefore records
its model on every document (the meta keys below), and a component given the index's `document_store`
(`MultimodalDocumentEmbedder`, `MultimodalTextEmbedder`, `MultimodalImageEmbedder`) checks, once per store and
before any model work, that the store holds no vectors of another model.

The identity is the checkpoint's content fingerprint (`backends.loading.checkpoint_fingerprint`, config and
weight samples), the same identity the multi-vector stores use, so moving or copying a model folder, or loading
it by Hub id instead of path, does not change it, while a different fine-tune does.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

from haystack import logging

from haystack_integrations.common.multimodal_rag.errors import EmbeddingModelMismatchError

logger = logging.getLogger(__name__)

#: The model id or path the vectors were made with, as configured.
EMBEDDING_MODEL_META_KEY = "embedding_model"
#: `checkpoint_fingerprint` of that model: what the guard compares.
EMBEDDING_MODEL_FINGERPRINT_META_KEY = "embedding_model_fingerprint"
#: Vector size.
EMBEDDING_DIMENSION_META_KEY = "embedding_dimension"
#: Whether the vectors are L2-normalised.
EMBEDDING_NORMALIZED_META_KEY = "embedding_normalized"

_SHOWN = 5


def model_record(identity: dict[str, Any], *, normalized: bool) -> dict[str, Any]:
    """
    The meta entries that record which model embedded a document.

    :param identity: `DenseEncoder.identity()`: `model`, `fingerprint`, `dimension`.
    :param normalized: Whether the embedding is L2-normalised.
    :returns: The four meta entries.
    """
    return {
        EMBEDDING_MODEL_META_KEY: identity["model"],
        EMBEDDING_MODEL_FINGERPRINT_META_KEY: identity["fingerprint"],
        EMBEDDING_DIMENSION_META_KEY: identity["dimension"],
        EMBEDDING_NORMALIZED_META_KEY: normalized,
    }


def _differs(fingerprint: str) -> dict[str, Any]:
    # In Haystack filters (InMemory and Qdrant alike) "!=" also matches documents without the field.
    return {"field": f"meta.{EMBEDDING_MODEL_FINGERPRINT_META_KEY}", "operator": "!=", "value": fingerprint}


def _count(store: Any, filters: dict[str, Any]) -> int:
    counter = getattr(store, "count_documents_by_filter", None)
    if callable(counter):
        return int(counter(filters))
    return len(store.filter_documents(filters=filters))


def _recorded_values(store: Any, key: str, filters: dict[str, Any]) -> list[Any]:
    """Up to a few distinct values of `meta[key]` among the documents matching `filters` (missing ones skipped)."""
    unique = getattr(store, "get_metadata_field_unique_values", None)
    if callable(unique):
        values, _ = unique(key, size=_SHOWN, filters=filters)
        return [v for v in values if v is not None]
    seen: list[Any] = []
    for doc in store.filter_documents(filters=filters):
        value = doc.meta.get(key)
        if value is not None and value not in seen:
            seen.append(value)
            if len(seen) >= _SHOWN:
                break
    return seen


class IndexModelGuard:
    """
    Checks that a document store holds vectors of one embedding model only; the result is cached per guard.

    A store found empty is checked again on the next call (its first documents may be written meanwhile); a
    store found consistent, or holding only documents without a model record, is not checked again.
    """

    def __init__(self, document_store: Any, *, component: str) -> None:
        """
        Create a guard for one store.

        :param document_store: Any Haystack document store (`count_documents`, `filter_documents`; the
            `count_documents_by_filter` / `get_metadata_field_unique_values` methods are used when present).
        :param component: Name of the component asking (for messages).
        """
        self.document_store = document_store
        self.component = component
        self._verified: str | None = None
        self._lock = threading.Lock()

    def check(self, identity: dict[str, Any], *, role: Literal["write", "query"]) -> None:
        """
        Refuse a store that holds documents embedded with another model.

        :param identity: `DenseEncoder.identity()` of the component's model.
        :param role: `"write"` (documents of this model are about to be indexed) or `"query"`.
        :raises EmbeddingModelMismatchError: Naming both models, when the store holds vectors of another model.
        """
        fingerprint = identity["fingerprint"]
        if self._verified == fingerprint:
            return
        with self._lock:
            if self._verified == fingerprint:
                return
            self._check(identity, role)

    def _check(self, identity: dict[str, Any], role: str) -> None:
        store = self.document_store
        total = int(store.count_documents())
        if total == 0:
            return
        fingerprint = identity["fingerprint"]
        differs = _differs(fingerprint)
        other = _count(store, differs)
        if other == 0:
            self._verified = fingerprint
            return
        fingerprints = _recorded_values(store, EMBEDDING_MODEL_FINGERPRINT_META_KEY, differs)
        if not fingerprints:
            logger.warning(
                "{component}: {other} of {total} documents in the index carry no embedding-model record "
                "(meta['{key}']; indexed before it was recorded, or by another embedder), so it cannot be verified "
                "that they were embedded with '{model}'. Re-index them to enable the check.",
                component=self.component,
                other=other,
                total=total,
                key=EMBEDDING_MODEL_FINGERPRINT_META_KEY,
                model=identity["model"],
            )
            self._verified = fingerprint
            return
        models = _recorded_values(store, EMBEDDING_MODEL_META_KEY, differs)
        theirs = ", ".join(f"'{m}'" for m in models) or "an unnamed model"
        action = (
            "refusing to write documents of another model into it"
            if role == "write"
            else "a query embedded with another model would be compared with vectors it cannot be compared with"
        )
        msg = (
            f"{self.component}: the index holds {other} of {total} documents embedded with {theirs} "
            f"(fingerprint {', '.join(str(f) for f in fingerprints)}), but this component uses '{identity['model']}' "
            f"(fingerprint {fingerprint}, dimension {identity['dimension']}); {action}. Vectors of different models "
            "are not comparable. To change the model, index the documents with the new model into a NEW collection "
            "(another `index` / path), then switch the query pipeline to it in one step."
        )
        raise EmbeddingModelMismatchError(msg)
