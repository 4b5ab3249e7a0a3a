from __future__ import annotations

import threading
import uuid
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from haystack import default_from_dict, default_to_dict, logging
from haystack.utils import Secret

from haystack_integrations.common.multimodal_rag.errors import MultiVectorStoreError
from haystack_integrations.common.multimodal_rag.validation import check_positive_int
from haystack_integrations.document_stores.multivector.protocol import (
    as_multivector,
    as_query,
    check_dtype,
    check_ids,
    check_pool_factor_binding,
    model_binding_updates,
)
from haystack_integrations.document_stores.multivector.qdrant_sharing import acquire_local_client, release_local_client

logger = logging.getLogger(__name__)

# Point ids are derived from document ids the same way qdrant-haystack does it, so one document has the
# same point id in the document collection and in the multi-vector collection.
_UUID_NAMESPACE = uuid.UUID("3896d314-1e95-4a3a-b45a-945f9f0b541d")
_DOC_ID_KEY = "document_id"
_MODEL_KEY = "multivector_model"
_MODEL_FINGERPRINT_KEY = "multivector_model_fingerprint"
_POOL_FACTOR_KEY = "multivector_pool_factor"
_WRITE_BATCH = 64


def point_id(document_id: str) -> str:
    """
    The Qdrant point id of a document id (deterministic, matches qdrant-haystack).

    :param document_id: The Haystack document id.
    :returns: A UUID hex string.
    """
    return uuid.uuid5(_UUID_NAMESPACE, document_id).hex


class QdrantMultiVectorStore:
    """
    Stores page multi-vectors in a Qdrant collection with Qdrant's native multivector support (MaxSim).

    The collection is created with `multivector_config` (MaxSim comparator), dot-product distance and no
    HNSW graph (`m=0`): it is used to fetch and to score known candidates, never to search the whole
    corpus. Works in embedded mode (`path=...` or `location=":memory:"`) and against a Qdrant server or
    cluster (`url=...`). At scale, `score()` runs MaxSim inside Qdrant, so the candidates' vectors never
    cross the network; `ColPaliRanker` uses it automatically.

    Embedded folders: stores and `QdrantDocumentStore`s pointing at the same `path` in one process share
    one client (Qdrant's local mode allows only one per folder).

    ### Usage example
    ```python
    from haystack_integrations.document_stores.multivector import QdrantMultiVectorStore

    store = QdrantMultiVectorStore(path="index/qdrant")            # embedded, persisted in a folder
    # store = QdrantMultiVectorStore(url="http://localhost:6333")   # a Qdrant server or cluster
    ```
    """

    def __init__(
        self,
        *,
        location: str | None = None,
        url: str | None = None,
        path: str | None = None,
        api_key: Secret | None = Secret.from_env_var("QDRANT_API_KEY", strict=False),  # noqa: B008
        collection: str = "multivectors",
        dim: int = 128,
        dtype: str = "float16",
        on_disk: bool = True,
        datatype: str | None = None,
    ) -> None:
        """
        Configure the store; the connection is opened on first use.

        :param location: `":memory:"` for a throw-away in-process instance (or a URL).
        :param url: URL of a Qdrant server or cluster.
        :param path: Folder of an embedded, persistent Qdrant.
        :param api_key: API key for a Qdrant server (read from `QDRANT_API_KEY` by default).
        :param collection: Collection name.
        :param dim: Width of the vectors (128 for the ColPali family).
        :param dtype: Storage type of the vectors: `"float16"` or `"float32"` (the same name as the other stores).
        :param on_disk: Keep vectors on disk (memory-mapped) in a Qdrant server.
        :param datatype: Deprecated spelling of `dtype` (accepted, with a `DeprecationWarning`, for one release).
        :raises ValueError: When not exactly one of `location`, `url`, `path` is given, on a bad dim/dtype, or
            when `datatype` and `dtype` disagree.
        """
        given = [name for name, value in (("location", location), ("url", url), ("path", path)) if value]
        if len(given) != 1:
            msg = f"QdrantMultiVectorStore needs exactly one of location, url or path; got {given or 'none'}"
            raise ValueError(msg)
        check_positive_int("dim", dim)
        if datatype is not None:
            warnings.warn(
                "QdrantMultiVectorStore(datatype=...) is deprecated and will be removed in the next release: "
                "use dtype=... (the name every multi-vector store uses)",
                DeprecationWarning,
                stacklevel=2,
            )
            if dtype not in ("float16", datatype):
                msg = f"QdrantMultiVectorStore got dtype={dtype!r} and the deprecated datatype={datatype!r}; give dtype"
                raise ValueError(msg)
            dtype = datatype
        self._np_dtype = check_dtype(dtype)
        self.location = location
        self.url = url
        self.path = path
        self.api_key = api_key
        self.collection = collection
        self.dim = dim
        self.dtype = dtype
        self.on_disk = on_disk
        self._client: Any = None
        self._stored_model: str | None = None
        self._stored_fingerprint: str | None = None
        self._stored_pool_factor: int | None = None
        self._lock = threading.Lock()

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize the store's settings.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            location=self.location,
            url=self.url,
            path=self.path,
            api_key=self.api_key.to_dict() if self.api_key else None,
            collection=self.collection,
            dim=self.dim,
            dtype=self.dtype,
            on_disk=self.on_disk,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QdrantMultiVectorStore:
        """
        Deserialize a store.

        :param data: The dictionary from `to_dict`.
        :returns: The store.
        """
        return default_from_dict(cls, data)

    @property
    def client(self) -> Any:
        """The `qdrant_client.QdrantClient`, connected and with the collection set up."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
                try:
                    self._set_up_collection()
                except BaseException:
                    self._disconnect()
                    raise
            return self._client

    def _connect(self) -> Any:
        import qdrant_client

        if self.path:
            return acquire_local_client(self.path)
        if self.url:
            api_key = self.api_key.resolve_value() if self.api_key else None
            return qdrant_client.QdrantClient(url=self.url, api_key=api_key)
        return qdrant_client.QdrantClient(location=self.location)

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if self.path:
            release_local_client(self.path)
        else:
            client.close()

    def _set_up_collection(self) -> None:
        from qdrant_client.http import models

        client = self._client
        if client.collection_exists(self.collection):
            info = client.get_collection(self.collection)
            vectors = info.config.params.vectors
            params = vectors.get("") if isinstance(vectors, dict) else vectors
            if params is None or params.multivector_config is None:
                msg = (
                    f"Qdrant collection '{self.collection}' exists but is not a multivector collection; "
                    "use another `collection` name"
                )
                raise MultiVectorStoreError(msg)
            if params.size != self.dim:
                msg = (
                    f"Qdrant collection '{self.collection}' was created with dim {params.size}, but this store "
                    f"was opened with dim={self.dim}; open it with dim={params.size} or use another collection"
                )
                raise MultiVectorStoreError(msg)
            metadata = getattr(info.config, "metadata", None) or {}
            self._stored_model = metadata.get(_MODEL_KEY)
            self._stored_fingerprint = metadata.get(_MODEL_FINGERPRINT_KEY)
            stored_pool = metadata.get(_POOL_FACTOR_KEY)
            self._stored_pool_factor = int(stored_pool) if stored_pool is not None else None
            return
        datatype = models.Datatype.FLOAT16 if self.dtype == "float16" else models.Datatype.FLOAT32
        client.create_collection(
            collection_name=self.collection,
            vectors_config=models.VectorParams(
                size=self.dim,
                distance=models.Distance.DOT,
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
                hnsw_config=models.HnswConfigDiff(m=0),
                datatype=datatype,
                on_disk=self.on_disk,
            ),
        )

    def close(self) -> None:
        """Release the connection (an embedded folder stays open while other users of it remain)."""
        with self._lock:
            self._disconnect()

    def write(self, vectors_by_id: Mapping[str, Any]) -> int:
        """
        Upsert one multi-vector per document id (writing an id again replaces it).

        Everything is validated before the first upsert; upserts go in batches of 64 pages.

        :param vectors_by_id: `{document_id: (n_vectors, dim) array | tensor | list of lists}`.
        :returns: Number of multi-vectors written.
        :raises MultiVectorStoreError: On a bad shape, the wrong width, or NaN/inf.
        """
        from qdrant_client.http import models

        ids = check_ids(vectors_by_id.keys())
        arrays = {
            doc_id: as_multivector(vectors_by_id[doc_id], dtype=self._np_dtype, dim=self.dim, doc_id=doc_id)
            for doc_id in ids
        }
        client = self.client
        items = list(arrays.items())
        for start in range(0, len(items), _WRITE_BATCH):
            points = [
                models.PointStruct(
                    id=point_id(doc_id), vector=array.astype(np.float32).tolist(), payload={_DOC_ID_KEY: doc_id}
                )
                for doc_id, array in items[start : start + _WRITE_BATCH]
            ]
            client.upsert(collection_name=self.collection, points=points, wait=True)
        return len(items)

    def get(self, ids: Iterable[str]) -> dict[str, np.ndarray]:
        """
        Fetch multi-vectors.

        :param ids: Document ids.
        :returns: `{document_id: (n_vectors, dim) array}` for the ids that have vectors.
        """
        ids = check_ids(ids)
        if not ids:
            return {}
        by_point = {point_id(doc_id): doc_id for doc_id in ids}
        records = self.client.retrieve(
            collection_name=self.collection, ids=list(by_point), with_vectors=True, with_payload=False
        )
        out: dict[str, np.ndarray] = {}
        for record in records:
            vector = record.vector.get("") if isinstance(record.vector, dict) else record.vector
            doc_id = by_point.get(_normalise_point_id(record.id))
            if doc_id is not None and vector is not None:
                out[doc_id] = np.asarray(vector, dtype=self._np_dtype)
        return {doc_id: out[doc_id] for doc_id in ids if doc_id in out}

    def delete(self, ids: Iterable[str]) -> None:
        """
        Remove multi-vectors (unknown ids are ignored).

        :param ids: Document ids.
        """
        from qdrant_client.http import models

        ids = check_ids(ids)
        if ids:
            self.client.delete(
                collection_name=self.collection,
                points_selector=models.PointIdsList(points=[point_id(d) for d in ids]),
                wait=True,
            )

    def count(self) -> int:
        """Number of stored multi-vectors."""
        return int(self.client.count(collection_name=self.collection, exact=True).count)

    def score(
        self,
        query_vectors: Any,
        ids: Iterable[str],
        *,
        device: str | None = None,  # noqa: ARG002 (part of the store contract; Qdrant scores server-side)
    ) -> dict[str, float]:
        """
        Raw MaxSim of a query against the stored pages of `ids`, computed inside Qdrant (server-side), so the
        candidates' vectors never leave it.

        :param query_vectors: `(n_query_tokens, dim)` array, tensor or list of lists.
        :param ids: Document ids.
        :param device: Ignored: Qdrant scores where the vectors live.
        :returns: `{document_id: raw MaxSim}` for the ids that have vectors.
        :raises MultiVectorStoreError: When the query is not 2-D, not finite, or of another width.
        """
        from qdrant_client.http import models

        ids = check_ids(ids)
        query = as_query(query_vectors, dim=self.dim, store_name=f"Qdrant collection '{self.collection}'")
        if not ids:
            return {}
        by_point = {point_id(doc_id): doc_id for doc_id in ids}
        response = self.client.query_points(
            collection_name=self.collection,
            query=query.tolist(),
            query_filter=models.Filter(must=[models.HasIdCondition(has_id=list(by_point))]),
            limit=len(by_point),
            with_payload=False,
            with_vectors=False,
        )
        scores: dict[str, float] = {}
        for point in response.points:
            doc_id = by_point.get(_normalise_point_id(point.id))
            if doc_id is not None:
                scores[doc_id] = float(point.score)
        return scores

    @property
    def pool_factor(self) -> int | None:
        """Pooling factor recorded in the collection (1: none), `None` until a document embedder records it."""
        _ = self.client  # reads the collection's metadata
        return self._stored_pool_factor

    def bind_pool_factor(self, pool_factor: int) -> None:
        """
        Record the pooling factor of the pages in the collection's metadata, or refuse a different one.

        :param pool_factor: The factor of the component writing pages (1: no pooling).
        :raises MultiVectorStoreError: When the collection holds pages pooled with another factor.
        """
        client = self.client
        with self._lock:
            check_pool_factor_binding(f"Qdrant collection '{self.collection}'", self._stored_pool_factor, pool_factor)
            if self._stored_pool_factor is not None:
                return
            self._update_metadata(client, {_POOL_FACTOR_KEY: pool_factor})
            self._stored_pool_factor = pool_factor

    def bind_model(self, model: str, *, fingerprint: str | None = None) -> None:
        """
        Record the embedding model in the collection's metadata, or refuse a different one.

        A collection that recorded only a model id (created before fingerprints were recorded) is upgraded:
        the fingerprint is added on the first bind whose model id matches.

        :param model: Model id of the component writing or reading.
        :param fingerprint: `checkpoint_fingerprint` of that model: what is compared when the collection recorded
            one too (so the same checkpoint under another path or id is accepted); `None`: the ids are compared.
        :raises MultiVectorStoreError: When the collection holds vectors of another model.
        """
        client = self.client
        with self._lock:
            record_model, record_fingerprint = model_binding_updates(
                f"Qdrant collection '{self.collection}'",
                self._stored_model,
                self._stored_fingerprint,
                model,
                fingerprint,
            )
            updates: dict[str, Any] = {}
            if record_model is not None:
                updates[_MODEL_KEY] = record_model
            if record_fingerprint is not None:
                updates[_MODEL_FINGERPRINT_KEY] = record_fingerprint
            if not updates:
                return
            self._update_metadata(client, updates)
            if record_model is not None:
                self._stored_model = record_model
            if record_fingerprint is not None:
                self._stored_fingerprint = record_fingerprint

    def _update_metadata(self, client: Any, updates: dict[str, Any]) -> None:
        try:
            client.update_collection(collection_name=self.collection, metadata=updates)
        except Exception as e:
            logger.warning(
                "Could not record {keys} in Qdrant collection {collection}: {error}",
                keys=", ".join(updates),
                collection=self.collection,
                error=e,
            )

    def __repr__(self) -> str:
        where = self.path or self.url or self.location
        return f"QdrantMultiVectorStore({where!r}, collection={self.collection!r}, dim={self.dim})"


def _normalise_point_id(value: Any) -> str:
    return uuid.UUID(str(value)).hex
