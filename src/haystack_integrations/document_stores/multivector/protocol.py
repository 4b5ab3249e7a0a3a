"""What every multi-vector store shares: the API (a Protocol), input validation and dtype handling.

A page's multi-vector is a 2-D array `(n_vectors, dim)`; the stores keep it under the document id.
Shapes and names match Haystack 3.5's `Document.multivector_embedding` (one `list[list[float]]` per
page or query), so `as_multivector` accepts that list form as well as numpy arrays and torch tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from haystack_integrations.common.multimodal_rag.errors import MultiVectorStoreError

SUPPORTED_DTYPES: tuple[str, ...] = ("float16", "float32")


@runtime_checkable
class MultiVectorStore(Protocol):
    """
    The contract of `InMemoryMultiVectorStore`, `SQLiteMultiVectorStore` and `QdrantMultiVectorStore`.

    Every store keeps one multi-vector per document id, scores a query against stored pages (`score`,
    raw MaxSim), and says how its vectors look (`dim`, `dtype`, `pool_factor`).

    Optional, outside the protocol: `revision() -> Hashable`, a value that changes whenever the stored vectors
    may have changed (by any instance, connection or process); caches of fetched pages compare it
    (`ColPaliRanker`'s device cache). A store without it is never cached.
    """

    @property
    def dim(self) -> int | None:
        """Width of the stored vectors (`None` while an in-memory store is empty)."""
        ...

    @property
    def dtype(self) -> str:
        """How vectors are stored: `"float16"` or `"float32"`."""
        ...

    @property
    def pool_factor(self) -> int | None:
        """The token-pooling factor the stored pages were made with (1: none), `None` until recorded."""
        ...

    def write(self, vectors_by_id: Mapping[str, Any]) -> int:
        """Upsert one multi-vector per document id; returns how many were written. Refuses NaN/inf."""
        ...

    def get(self, ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Multi-vectors of the given ids; ids without vectors are absent from the result."""
        ...

    def score(self, query_vectors: Any, ids: Iterable[str], *, device: str | None = None) -> dict[str, float]:
        """Raw MaxSim of the query against the stored pages of `ids`; ids without vectors are absent."""
        ...

    def delete(self, ids: Iterable[str]) -> None:
        """Remove the multi-vectors of the given ids (unknown ids are ignored)."""
        ...

    def count(self) -> int:
        """Number of stored multi-vectors."""
        ...

    def bind_model(self, model: str, *, fingerprint: str | None = None) -> None:
        """Record the embedding model (id and content fingerprint), or refuse a different one."""
        ...

    def bind_pool_factor(self, pool_factor: int) -> None:
        """Record the pooling factor of the stored pages, or refuse a different one."""
        ...

    def close(self) -> None:
        """Release connections and files (the store reopens them on the next use)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """Serialize the store's settings."""
        ...


def check_dtype(dtype: str) -> np.dtype:
    """
    Validate a store dtype name.

    :param dtype: `"float16"` or `"float32"`.
    :returns: The numpy dtype.
    :raises ValueError: For anything else.
    """
    if dtype not in SUPPORTED_DTYPES:
        msg = f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}"
        raise ValueError(msg)
    return np.dtype(dtype)


def as_multivector(value: Any, *, dtype: np.dtype, dim: int | None, doc_id: str) -> np.ndarray:
    """
    Validate one multi-vector and convert it to a C-contiguous array of `dtype`.

    :param value: A 2-D numpy array, torch tensor or list of lists.
    :param dtype: Target dtype.
    :param dim: Required vector width, or `None` to accept any.
    :param doc_id: Document id, for messages.
    :returns: The converted array (a copy when conversion was needed).
    :raises MultiVectorStoreError: When it is not 2-D, empty, of the wrong width, or not finite.
    """
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().to("cpu")
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        msg = (
            f"multi-vector of document '{doc_id}' must be a non-empty 2-D array (vectors, dim), got shape {array.shape}"
        )
        raise MultiVectorStoreError(msg)
    if not np.issubdtype(array.dtype, np.number):
        msg = f"multi-vector of document '{doc_id}' must be numeric, got dtype {array.dtype}"
        raise MultiVectorStoreError(msg)
    if dim is not None and array.shape[1] != dim:
        msg = (
            f"multi-vector of document '{doc_id}' has vectors of width {array.shape[1]}, but the store holds dim {dim}"
        )
        raise MultiVectorStoreError(msg)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below, by document id
        converted = np.ascontiguousarray(array, dtype=dtype)
    if not np.isfinite(converted).all():
        msg = f"multi-vector of document '{doc_id}' contains NaN or infinite values (after conversion to {dtype})"
        raise MultiVectorStoreError(msg)
    return converted


def as_query(query_vectors: Any, *, dim: int | None, store_name: str) -> np.ndarray:
    """
    Validate a query multi-vector for `score` and convert it to a float32 array.

    :param query_vectors: `(n_query_tokens, dim)` array, tensor or list of lists.
    :param dim: The store's vector width (`None`: not known yet).
    :param store_name: Description of the store, for messages.
    :returns: The query as a C-contiguous float32 array.
    :raises MultiVectorStoreError: When it is not a non-empty 2-D array of the store's width, or not finite.
    """
    if hasattr(query_vectors, "detach"):  # torch tensor
        query_vectors = query_vectors.detach().to("cpu").float().numpy()
    query = np.ascontiguousarray(np.asarray(query_vectors, dtype=np.float32))
    if query.ndim != 2 or query.shape[0] == 0:
        msg = f"{store_name}: the query multi-vector must be a non-empty 2-D array, got shape {query.shape}"
        raise MultiVectorStoreError(msg)
    if dim is not None and query.shape[1] != dim:
        msg = (
            f"{store_name}: the query multi-vector has vectors of width {query.shape[1]}, "
            f"but the store holds vectors of dim {dim}"
        )
        raise MultiVectorStoreError(msg)
    if not np.isfinite(query).all():
        msg = f"{store_name}: the query multi-vector contains NaN or infinite values"
        raise MultiVectorStoreError(msg)
    return query


def check_pool_factor_binding(store_name: str, stored: int | None, pool_factor: int) -> None:
    """
    Refuse to mix pages pooled with different factors in one store.

    :param store_name: Description of the store, for the message.
    :param stored: The factor the store recorded (`None` when not recorded yet).
    :param pool_factor: The factor of the component using the store (1: no pooling).
    :raises MultiVectorStoreError: When both are known and differ.
    """
    if stored is not None and stored != pool_factor:
        msg = (
            f"{store_name} holds pages pooled with pool_factor {stored}, but this component uses pool_factor "
            f"{pool_factor}. Pages of one index must be pooled alike: use the same pool_factor, or a new store."
        )
        raise MultiVectorStoreError(msg)


def check_ids(ids: Iterable[str]) -> list[str]:
    """
    Materialise and validate document ids.

    :param ids: Document ids.
    :returns: The ids as a list.
    :raises TypeError: When an id is not a non-empty string.
    """
    out = list(ids)
    for doc_id in out:
        if not isinstance(doc_id, str) or not doc_id:
            msg = f"document ids must be non-empty strings, got {doc_id!r}"
            raise TypeError(msg)
    return out


def is_content_fingerprint(fingerprint: str | None) -> bool:
    """
    Whether a model fingerprint identifies a checkpoint by its content.

    `checkpoint_fingerprint` returns `"sha256:..."` when it could read the checkpoint's files and `"id:<model>"`
    when it could not; only the first says anything beyond the id.

    :param fingerprint: A fingerprint, or `None`.
    :returns: `True` for a content fingerprint.
    """
    return fingerprint is not None and fingerprint.startswith("sha256:")


def check_model_binding(
    store_name: str,
    stored_model: str | None,
    model: str | None,
    *,
    stored_fingerprint: str | None = None,
    fingerprint: str | None = None,
) -> None:
    """
    Refuse to mix embeddings of two models in one store.

    Models are identified by content (`checkpoint_fingerprint`: config and weights) when both sides know it, so
    a moved or copied model folder, or a local copy used instead of its Hub id, is the same model while another
    checkpoint is not. When either side has no content fingerprint (a store written before fingerprints were
    recorded, or a checkpoint whose files could not be read), the model ids are compared instead.

    :param store_name: Description of the store, for the message.
    :param stored_model: Model id the store was created with (`None` when unknown).
    :param model: Model id of the component using the store.
    :param stored_fingerprint: Content fingerprint the store recorded (`None` when unknown).
    :param fingerprint: Content fingerprint of the component's model (`None` when unknown).
    :raises MultiVectorStoreError: When the store holds vectors of another model; the message names both ids.
    """
    if is_content_fingerprint(stored_fingerprint) and is_content_fingerprint(fingerprint):
        if stored_fingerprint == fingerprint:
            return
        msg = (
            f"{store_name} holds multi-vectors of model '{stored_model}' ({stored_fingerprint}), but this component "
            f"uses model '{model}' ({fingerprint}), a different checkpoint (config or weights differ). "
            "One index must never mix embeddings of two models: use the same model, or a new store."
        )
        raise MultiVectorStoreError(msg)
    if stored_model is not None and model is not None and stored_model != model:
        how = (
            " (the store recorded no content fingerprint of its model, so the model ids are compared; a moved "
            "model folder is recognised once the store was bound by this version)"
            if not is_content_fingerprint(stored_fingerprint)
            else ""
        )
        msg = (
            f"{store_name} holds multi-vectors of model '{stored_model}', but this component uses model '{model}'"
            f"{how}. One index must never mix embeddings of two models: use the same model, or a new store."
        )
        raise MultiVectorStoreError(msg)


def model_binding_updates(
    store_name: str,
    stored_model: str | None,
    stored_fingerprint: str | None,
    model: str,
    fingerprint: str | None,
) -> tuple[str | None, str | None]:
    """
    Check a component's model against a store's record and say what the store should record.

    :param store_name: Description of the store, for the message.
    :param stored_model: Model id the store recorded (`None` when none).
    :param stored_fingerprint: Content fingerprint the store recorded (`None` when none).
    :param model: The component's model id.
    :param fingerprint: The component's model fingerprint (`None` when unknown).
    :returns: `(model id to record, fingerprint to record)`, each `None` when nothing to record: the id when
        the store has none, the fingerprint when the store has none and this one identifies content (so a store
        bound by id only, e.g. written by an older version, is upgraded on its first bind with a fingerprint).
    :raises MultiVectorStoreError: When the store holds vectors of another model.
    """
    check_model_binding(store_name, stored_model, model, stored_fingerprint=stored_fingerprint, fingerprint=fingerprint)
    record_model = model if stored_model is None else None
    record_fingerprint = fingerprint if stored_fingerprint is None and is_content_fingerprint(fingerprint) else None
    return record_model, record_fingerprint


def _accepts_fingerprint(bind: Any) -> bool:
    try:
        parameters = inspect.signature(bind).parameters
    except (TypeError, ValueError):
        return True
    return "fingerprint" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def check_store_compatible(
    store: Any,
    *,
    dim: int,
    model: str,
    component: str,
    pool_factor: int | None = None,
    fingerprint: str | None = None,
) -> None:
    """
    Refuse a multi-vector store whose width, recorded model or pooling differs from a component's.

    Stores that can record their model (`bind_model`) are bound to `model` (and its content `fingerprint`) on
    first use; with `pool_factor` given (a document embedder: its factor, 1 for none), stores that can record
    it (`bind_pool_factor`) are bound to it, so a ranker later pools pages it encodes on the fly the same way.

    :param store: The multi-vector store.
    :param dim: Width of the vectors the component's model produces.
    :param model: The component's model id.
    :param component: Component name, for messages.
    :param pool_factor: The pooling factor of the pages this component writes; `None` for readers.
    :param fingerprint: `checkpoint_fingerprint` of the component's model (what identifies it; `None`: unknown,
        the id is compared).
    :raises MultiVectorStoreError: On a mismatch.
    """
    store_dim = getattr(store, "dim", None)
    if store_dim is not None and store_dim != dim:
        msg = (
            f"{component}: the multi-vector store holds vectors of dim {store_dim}, "
            f"but model '{model}' produces dim {dim}"
        )
        raise MultiVectorStoreError(msg)
    bind = getattr(store, "bind_model", None)
    if callable(bind):
        try:
            if fingerprint is None or not _accepts_fingerprint(bind):
                bind(model)  # a store written against the older protocol: `bind_model(model)`
            else:
                bind(model, fingerprint=fingerprint)
        except MultiVectorStoreError as e:
            raise MultiVectorStoreError(f"{component}: {e}") from e
    bind_pool = getattr(store, "bind_pool_factor", None)
    if pool_factor is not None and callable(bind_pool):
        try:
            bind_pool(pool_factor)
        except MultiVectorStoreError as e:
            raise MultiVectorStoreError(f"{component}: {e}") from e


def store_from_dict(data: dict[str, Any] | None) -> Any:
    """
    Deserialize a multi-vector store from its `to_dict` form (any class with `from_dict`).

    The class is imported through Haystack's deserialization allowlist.

    :param data: The serialized store, or `None`.
    :returns: The store, or `None`.
    """
    if data is None:
        return None
    from haystack.core.serialization import import_class_by_name

    cls: Any = import_class_by_name(data["type"])
    return cls.from_dict(data)


def with_store_from_dict(data: dict[str, Any]) -> dict[str, Any]:
    """
    A copy of a component's serialized form with its `multivector_store` deserialized (input not modified).

    :param data: The component's `to_dict` output.
    :returns: The data, ready for `default_from_dict`.
    """
    params = dict(data.get("init_parameters", {}))
    params["multivector_store"] = store_from_dict(params.get("multivector_store"))
    return {**data, "init_parameters": params}
