from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from haystack import default_from_dict, default_to_dict

from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim_by_id
from haystack_integrations.document_stores.multivector.protocol import (
    as_multivector,
    as_query,
    check_dtype,
    check_ids,
    check_pool_factor_binding,
    model_binding_updates,
)


class _Storage:
    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self.dim: int | None = None
        self.model: str | None = None
        self.model_fingerprint: str | None = None
        self.pool_factor: int | None = None
        self.revision = 0  # bumped by every change of `vectors`
        self.lock = threading.Lock()


# Process-wide storage per index, so that instances with the same index (e.g. one deserialised from a
# YAML pipeline and one built in code) see the same vectors, as Haystack's InMemoryDocumentStore does.
_STORAGES: dict[str, _Storage] = {}
_STORAGES_LOCK = threading.Lock()


class InMemoryMultiVectorStore:
    """
    Keeps page multi-vectors in memory, keyed by document id. Fast; forgets everything on restart.

    Instances created with the same `index` share their vectors (like Haystack's `InMemoryDocumentStore`),
    so a pipeline saved to YAML and loaded again in the same process still finds them.

    ### Usage example
    ```python
    import numpy as np
    from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore

    store = InMemoryMultiVectorStore()
    store.write({"doc-1": np.random.rand(1030, 128)})
    print(store.get(["doc-1"])["doc-1"].shape)  # (1030, 128), float16
    ```
    """

    def __init__(self, dtype: str = "float16", *, index: str | None = None) -> None:
        """
        Create the store.

        :param dtype: How vectors are kept: `"float16"` (half the memory) or `"float32"`.
        :param index: Name of the shared storage; `None` creates a new, unique one.
        :raises ValueError: On an unsupported dtype.
        """
        self._np_dtype = check_dtype(dtype)
        self.dtype = dtype
        self.index = index if index is not None else str(uuid.uuid4())
        with _STORAGES_LOCK:
            self._storage = _STORAGES.setdefault(self.index, _Storage())

    @property
    def dim(self) -> int | None:
        """Width of the stored vectors (`None` until the first write)."""
        return self._storage.dim

    @property
    def pool_factor(self) -> int | None:
        """Pooling factor the stored pages were made with (1: none); `None` until a document embedder records it."""
        return self._storage.pool_factor

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize the store's settings (not its vectors).

        :returns: The dictionary.
        """
        return default_to_dict(self, dtype=self.dtype, index=self.index)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InMemoryMultiVectorStore:
        """
        Deserialize a store; it shares the vectors of live instances with the same index.

        :param data: The dictionary from `to_dict`.
        :returns: The store.
        """
        return default_from_dict(cls, data)

    def write(self, vectors_by_id: Mapping[str, Any]) -> int:
        """
        Upsert one multi-vector per document id (writing an id again replaces it).

        The whole call is validated before anything is stored: it lands entirely or not at all.

        :param vectors_by_id: `{document_id: (n_vectors, dim) array | tensor | list of lists}`.
        :returns: Number of multi-vectors written.
        :raises MultiVectorStoreError: On a bad shape, a width that differs from the stored vectors, or NaN/inf.
        """
        ids = check_ids(vectors_by_id.keys())
        storage = self._storage
        with storage.lock:
            dim = storage.dim
            converted: dict[str, np.ndarray] = {}
            for doc_id in ids:
                array = as_multivector(vectors_by_id[doc_id], dtype=self._np_dtype, dim=dim, doc_id=doc_id)
                dim = array.shape[1]
                converted[doc_id] = array
            storage.vectors.update(converted)
            if converted:
                storage.dim = dim
                storage.revision += 1
        return len(converted)

    def get(self, ids: Iterable[str]) -> dict[str, np.ndarray]:
        """
        Fetch multi-vectors; the arrays are the stored ones (no copy): do not modify them.

        :param ids: Document ids.
        :returns: `{document_id: array}` for the ids that have vectors.
        """
        vectors = self._storage.vectors
        out: dict[str, np.ndarray] = {}
        for doc_id in check_ids(ids):
            array = vectors.get(doc_id)
            if array is not None:
                out[doc_id] = array
        return out

    def score(self, query_vectors: Any, ids: Iterable[str], *, device: str | None = None) -> dict[str, float]:
        """
        Raw MaxSim of a query against the stored pages of `ids` (the package's MaxSim kernel).

        :param query_vectors: `(n_query_tokens, dim)` array, tensor or list of lists.
        :param ids: Document ids.
        :param device: `None` (the CPU kernel) or a torch device to score on, e.g. the ranker model's GPU.
        :returns: `{document_id: MaxSim}` for the ids that have vectors. A page holding NaN (which `write`
            refuses; only corruption gets it there) scores NaN.
        :raises MultiVectorStoreError: When the query is not 2-D, not finite, or of another width.
        """
        query = as_query(query_vectors, dim=self.dim, store_name=repr(self))
        return maxsim_by_id(query, self.get(ids), device=device)

    def delete(self, ids: Iterable[str]) -> None:
        """
        Remove multi-vectors (unknown ids are ignored).

        :param ids: Document ids.
        """
        storage = self._storage
        with storage.lock:
            for doc_id in check_ids(ids):
                storage.vectors.pop(doc_id, None)
            storage.revision += 1

    def count(self) -> int:
        """Number of stored multi-vectors."""
        return len(self._storage.vectors)

    def revision(self) -> int:
        """
        A number that changes whenever the stored vectors change (write, delete, clear), by any instance sharing
        this index; caches of fetched pages (`ColPaliRanker`'s device cache) compare it to know they are current.

        :returns: The revision.
        """
        return self._storage.revision

    def clear(self) -> None:
        """Remove every multi-vector of this index."""
        storage = self._storage
        with storage.lock:
            storage.vectors.clear()
            storage.revision += 1
            storage.dim = None
            storage.model = None
            storage.model_fingerprint = None
            storage.pool_factor = None

    def bind_model(self, model: str, *, fingerprint: str | None = None) -> None:
        """
        Record the embedding model of this index, or refuse a different one.

        :param model: Model id of the component writing or reading.
        :param fingerprint: `checkpoint_fingerprint` of that model: what is compared when the index recorded one
            too (so the same checkpoint under another path or id is accepted); `None`: the ids are compared.
        :raises MultiVectorStoreError: When the index already holds vectors of another model.
        """
        storage = self._storage
        with storage.lock:
            record_model, record_fingerprint = model_binding_updates(
                f"InMemoryMultiVectorStore(index='{self.index}')",
                storage.model,
                storage.model_fingerprint,
                model,
                fingerprint,
            )
            if record_model is not None:
                storage.model = record_model
            if record_fingerprint is not None:
                storage.model_fingerprint = record_fingerprint

    def bind_pool_factor(self, pool_factor: int) -> None:
        """
        Record the pooling factor of this index's pages, or refuse a different one.

        :param pool_factor: The factor of the component writing pages (1: no pooling).
        :raises MultiVectorStoreError: When the index holds pages pooled with another factor.
        """
        storage = self._storage
        with storage.lock:
            check_pool_factor_binding(
                f"InMemoryMultiVectorStore(index='{self.index}')", storage.pool_factor, pool_factor
            )
            storage.pool_factor = pool_factor

    def close(self) -> None:
        """Nothing to release (the vectors stay in memory for other instances of the same index)."""

    def __repr__(self) -> str:
        return f"InMemoryMultiVectorStore(dtype={self.dtype!r}, index={self.index!r}, count={self.count()})"
