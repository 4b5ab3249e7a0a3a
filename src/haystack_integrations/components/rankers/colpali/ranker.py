from __future__ import annotations

import inspect
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.utils import ComponentDevice, Secret

from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder, check_processor_kwargs
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec, serialize_loading_params
from haystack_integrations.common.multimodal_rag.errors import MediaError, MultiVectorStoreError
from haystack_integrations.common.multimodal_rag.inputs.failures import check_documents_input
from haystack_integrations.common.multimodal_rag.inputs.media import resolve_path
from haystack_integrations.common.multimodal_rag.inputs.planning import iter_image_batches, plan_documents
from haystack_integrations.common.multimodal_rag.numerics.maxsim import (
    StagedPages,
    cpu_kernel_threads,
    maxsim_by_id,
    maxsim_chunks,
    maxsim_staged,
    to_device,
)
from haystack_integrations.common.multimodal_rag.numerics.page_cache import (
    DevicePageCache,
    HostLookup,
    HostPageCache,
    stage_store_pages,
)
from haystack_integrations.common.multimodal_rag.numerics.ranking import (
    DENSE_SCORE_META_KEY,
    LATE_INTERACTION_SCORE_META_KEY,
    call_top_k_and_threshold,
    check_top_k_and_threshold,
    rescored,
    select_top_positions,
)
from haystack_integrations.common.multimodal_rag.validation import check_int, check_positive_int, check_query
from haystack_integrations.document_stores.multivector.in_memory import InMemoryMultiVectorStore
from haystack_integrations.document_stores.multivector.protocol import (
    MultiVectorStore,
    check_store_compatible,
    with_store_from_dict,
)
from haystack_integrations.document_stores.multivector.sqlite import SQLiteMultiVectorStore

logger = logging.getLogger(__name__)

#: Stores whose `score` is `get` plus the package's MaxSim kernel, so on a GPU the ranker may do those two steps
#: itself and overlap them with query encoding. Exact types: a subclass may score its own way.
_KERNEL_STORES = (InMemoryMultiVectorStore, SQLiteMultiVectorStore)
#: On a CPU, the stores whose fetch is worth caching (`host_cache_mb`): SQLite reads every blob (fetch + MaxSim of the
#: same 100 pages of 768 x 128: 16.8 ms per query without the cache, 8.5 ms with it; 1000 pages: 141 vs 52 ms; 2-vCPU
#: VM, `benchmarks/rerank_latency.py --sections 6`). The in-memory store's `get` returns its own arrays.
_HOST_CACHED_STORES = (SQLiteMultiVectorStore,)
_FETCH_CHUNK = 32  # pages read per store call while the kernel scores the previous ones (as SQLite's `score`)


def _score_fetched(
    query: np.ndarray | torch.Tensor, fetch: Future[tuple[list[str], list[StagedPages]]]
) -> dict[str, float] | None:
    """
    MaxSim of the pages the fetch thread staged, with one device->host copy (the scores and a finiteness flag).

    `None` where the caller must run `store.score` instead: the fetch failed, found nothing, or the query is
    malformed or not finite. `store.score` then raises exactly the error it raised before this path existed.
    """
    try:
        found, parts = fetch.result()
    except Exception:  # store.score raises it again, in its usual order after the query checks
        return None
    query_t = torch.as_tensor(query)
    if not found or query_t.ndim != 2 or query_t.shape[0] == 0:
        return None
    device = parts[0].packed.device
    query_t = to_device(query_t, device)
    scores = [maxsim_staged(query_t, part) for part in parts]
    finite = torch.isfinite(query_t).all().reshape(1).to(scores[0].dtype)
    host = torch.cat([*scores, finite]).cpu()  # the query's only device->host copy
    if host[-1] == 0:
        return None
    return dict(zip(found, host[:-1].tolist(), strict=True))


_Fetch = tuple[Callable[[Any, Any], "dict[str, float] | None"], Future[Any]]


def _rescore_and_select(
    documents: list[Document],
    late: dict[str, float],
    *,
    n_query_tokens: int,
    normalize: bool,
    top_k: int | None,
    score_threshold: float | None,
) -> list[Document]:
    """
    The candidates with their late-interaction scores, selected by `select_top`'s rule; `documents` not modified.

    A candidate with a finite raw MaxSim in `late` gets it as its score (divided by `n_query_tokens` when
    `normalize`) and the raw value in its meta; a non-finite one gets no score; one missing from `late` keeps its
    score. Every returned candidate's meta keeps its incoming score as `dense_score` (unless set). The scores are
    selected first and new Documents built only for the kept ones (`top_k` often keeps few of ~1000
    candidates), with `rescored` rather than `dataclasses.replace` (ten times cheaper, the same Document).
    """
    raws: list[float | None] = []
    scores: list[float | None] = []
    for doc in documents:
        raw = float(late[doc.id]) if doc.id in late else None
        raws.append(raw)
        if raw is None:
            scores.append(doc.score)
        elif math.isfinite(raw):
            scores.append(raw / n_query_tokens if normalize else raw)
        else:
            scores.append(None)
    ranked: list[Document] = []
    for i in select_top_positions(scores, top_k=top_k, score_threshold=score_threshold):
        doc, raw = documents[i], raws[i]
        meta = dict(doc.meta)
        meta.setdefault(DENSE_SCORE_META_KEY, doc.score)
        if raw is not None and math.isfinite(raw):
            meta[LATE_INTERACTION_SCORE_META_KEY] = raw
        ranked.append(rescored(doc, scores[i], meta))
    return ranked


def _describe_store(store: Any) -> str:
    path = getattr(store, "path", None)
    return f"{type(store).__name__} at {path}" if path else type(store).__name__


class _LRUCache:
    """Thread-safe LRU cache of page multi-vectors computed on the fly."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def _encoder_takes_query_prefix() -> bool:
    """Whether this installation's `LateInteractionEncoder.embed_queries` accepts `query_prefix=`."""
    return "query_prefix" in inspect.signature(LateInteractionEncoder.embed_queries).parameters


@component
class ColPaliRanker:
    """
    Re-ranks retrieved candidates with late interaction (MaxSim) between query tokens and page patches.

    Stage 2 of two-stage multimodal retrieval: a dense retriever returns ~100 candidates fast, this
    ranker scores them precisely. It is thin: encode the query (or take it as `query_multivector_embedding`
    from a `ColPaliTextEmbedder`, so one encoding serves several consumers) -> `multivector_store.score`
    (MaxSim where the vectors live: our CPU kernel for the in-memory and SQLite stores, on the model's GPU
    when the model runs on one, inside Qdrant for the Qdrant store) -> normalise -> select.

    On a GPU the stored vectors of ranked pages stay on the device within `device_cache_mb` (in-memory and SQLite
    stores; least recently used out), so pages ranked again skip the fetch and upload; on a CPU, `host_cache_mb`
    (off by default) keeps SQLite pages in host memory, so they skip the blob reads. Both start over whenever the
    store's `revision()` says something was written or deleted.

    Pages without stored vectors go through a read-through path: they are planned and loaded by the
    package's shared document planning and pixel loader, encoded (pooled like the stored pages when the
    store records a `pool_factor`), and kept in an LRU cache of `cache_size` pages, so a pipeline without a
    store still works, just slower.

    Every output document keeps the incoming (retriever) score in `meta["dense_score"]` and gets
    `meta["late_interaction_score"]` (raw MaxSim) and a new `score`: MaxSim divided by the number of query
    tokens with `normalize_scores=True` (comparable across queries), raw MaxSim otherwise. Text-only
    documents keep their incoming score and get no late-interaction score (`ModalityScoreCalibrator`
    fuses them later); candidates with neither stored vectors nor a readable image keep their score too,
    with a warning naming them. A page whose stored vectors are not finite (a corrupt store) gets
    `score=None`, ranks last and is named in a warning.

    `top_k` is `None` by default: every candidate is passed on. Text candidates keep a dense (cosine)
    score while pages get MaxSim, two scales that cannot be compared, so one `top_k` here would cut text
    against pages arbitrarily; `ModalityScoreCalibrator` puts them on one scale and makes the final cut.
    Set `top_k` only when every candidate is a page.

    ### Usage example
    ```python
    from haystack_integrations.components.rankers.colpali import ColPaliRanker
    from haystack_integrations.document_stores.multivector import SQLiteMultiVectorStore

    ranker = ColPaliRanker(model="vidore/colqwen2.5-v0.2", multivector_store=SQLiteMultiVectorStore("index/mv.sqlite"))
    result = ranker.run(query="Which quarter had the highest revenue?", documents=candidates)
    ```
    """

    def __init__(
        self,
        model: str = "vidore/colqwen2.5-v0.2",
        *,
        multivector_store: MultiVectorStore | None = None,
        top_k: int | None = None,
        score_threshold: float | None = None,
        normalize_scores: bool = True,
        query_prefix: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        device: ComponentDevice | None = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        batch_size: int = 4,
        cache_size: int = 512,
        device_cache_mb: int = 1024,
        host_cache_mb: int = 0,
        cuda_graphs: bool = True,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        file_path_meta_field: str = "file_path",
        root_path: str | None = None,
    ) -> None:
        """
        Create the ranker. Nothing is loaded until `warm_up()`.

        :param model: Hugging Face id or local path of a ColPali-family checkpoint (the one used at indexing).
        :param multivector_store: Store holding page multi-vectors; `None` encodes every page on the fly.
        :param top_k: How many documents to return; `None` (default) returns every candidate, for a later
            calibrator to cut (text and page scores are not comparable here).
        :param score_threshold: Drop documents whose final `score` is below this value.
        :param normalize_scores: Divide MaxSim by the number of query tokens.
        :param query_prefix: Text put before each query when this ranker encodes it; `None` keeps the model
            family's own query processing. Needs an encoder that supports it (checked here).
        :param processor_kwargs: Extra keyword arguments for the processor's `from_pretrained`, as given to the
            `ColPaliDocumentEmbedder` that built the index (e.g. a visual-token budget), so pages this ranker
            encodes on the fly match the stored ones; `None` uses the family's training recipe, like the embedder.
        :param device: Device to run on; `None` picks the best available. On a GPU, MaxSim runs there too.
        :param token: Hugging Face token, for gated or private models.
        :param batch_size: Pages per forward pass when encoding on the fly.
        :param cache_size: Pages kept in the on-the-fly LRU cache (0 disables it).
        :param device_cache_mb: On a GPU, MiB of its memory kept for the stored vectors of recently ranked pages
            (in-memory and SQLite stores), so a page ranked again is not fetched and uploaded again (1024 MiB hold
            ~5,400 pages of 768 x 128 float16). The cache checks the store's revision before each query and starts
            over when anything was written or deleted. 0 disables it; unused on a CPU.
        :param host_cache_mb: On a CPU with the SQLite store, MiB of host memory kept for the stored vectors of
            recently ranked pages, so a page ranked again is not read from the file again (invalidated like the
            GPU cache). Off (0) by default: it pays off when queries keep meeting the same pages (fetch + MaxSim of
            100 pages 2x faster, of 1000 pages 2.7x), but while it fills, each query's freshly read pages are kept
            rather than reused, which made queries over 1000 new pages 2.6x slower on the 2-vCPU VM (README).
        :param cuda_graphs: On a GPU, encode the query by replaying a CUDA graph of the model's forward, captured
            once per padded query length (ColQwen2.5-3B-shaped on an H100: ~4x faster). Results equal the plain
            forward's up to bf16 rounding; a model whose forward cannot be captured is encoded without one.
        :param local_files_only: Only use a local path or the local Hugging Face cache.
        :param model_kwargs: Extra keyword arguments for the model's `from_pretrained`.
        :param file_path_meta_field: Meta key holding the path of a candidate's image or PDF (on-the-fly path).
        :param root_path: Directory that relative file paths are resolved in; paths escaping it are refused.
        :raises ValueError: On invalid parameters, or a `query_prefix` this installation's encoder cannot apply.
        """
        check_top_k_and_threshold(top_k, score_threshold)
        check_positive_int("batch_size", batch_size)
        check_int("cache_size", cache_size, minimum=0)
        check_int("device_cache_mb", device_cache_mb, minimum=0)
        check_int("host_cache_mb", host_cache_mb, minimum=0)
        check_processor_kwargs(processor_kwargs)
        if query_prefix is not None and not _encoder_takes_query_prefix():
            msg = (
                "ColPaliRanker: query_prefix needs LateInteractionEncoder.embed_queries(..., query_prefix=...), "
                "which this installation does not have"
            )
            raise ValueError(msg)
        self.model = model
        self.multivector_store = multivector_store
        self.top_k = top_k
        self.score_threshold = score_threshold
        self.normalize_scores = normalize_scores
        self.query_prefix = query_prefix
        self.processor_kwargs = processor_kwargs
        self.device = device
        self.token = token
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.device_cache_mb = device_cache_mb
        self.host_cache_mb = host_cache_mb
        self.cuda_graphs = cuda_graphs
        self.local_files_only = local_files_only
        self.model_kwargs = model_kwargs
        self.file_path_meta_field = file_path_meta_field
        self.root_path = root_path
        self._encoder: LateInteractionEncoder | None = None
        self._cache = _LRUCache(cache_size)
        self._warm_lock = threading.Lock()
        self._fetch_pool: ThreadPoolExecutor | None = None  # one thread: fetches stored pages while a query encodes
        # Looked up only by the fetch thread (a SQLite store's revision is read on that thread's connection): the
        # GPU cache when the model is on CUDA, the host cache (SQLite only) when it is on the CPU.
        self._device_cache = DevicePageCache(device_cache_mb * 2**20) if device_cache_mb > 0 else None
        self._host_cache = HostPageCache(host_cache_mb * 2**20) if host_cache_mb > 0 else None
        # The on-the-fly path stores vectors like the store does, so both paths score identical values.
        self._cache_dtype = np.dtype(multivector_store.dtype if multivector_store is not None else "float16")
        self._warned_unstored = False  # the "pages encoded at query time although a store is set" warning, once

    def warm_up(self) -> None:
        """
        Load the model and check that the store fits it (idempotent).

        :raises ModelLoadError: When the model cannot be loaded.
        :raises MultiVectorStoreError: When the store holds another width or another model's vectors.
        """
        with self._warm_lock:
            if self._encoder is None:
                encoder = LateInteractionEncoder.get(LoadSpec.of(self))
                if self.multivector_store is not None:
                    check_store_compatible(
                        self.multivector_store,
                        dim=encoder.dim,
                        model=self.model,
                        fingerprint=encoder.fingerprint,
                        component=type(self).__name__,
                    )
                self._encoder = encoder
                cpu_kernel_threads()  # starts the MaxSim worker pool now rather than in the first query

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component (and its store's settings) to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            **serialize_loading_params(self),
            multivector_store=self.multivector_store.to_dict() if self.multivector_store is not None else None,
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            normalize_scores=self.normalize_scores,
            query_prefix=self.query_prefix,
            processor_kwargs=self.processor_kwargs,
            batch_size=self.batch_size,
            cache_size=self.cache_size,
            device_cache_mb=self.device_cache_mb,
            host_cache_mb=self.host_cache_mb,
            cuda_graphs=self.cuda_graphs,
            file_path_meta_field=self.file_path_meta_field,
            root_path=self.root_path,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ColPaliRanker:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, with_store_from_dict(data))

    # --- steps ---------------------------------------------------------------------------------------------

    def _score_device(self) -> str | None:
        """Where MaxSim runs for the in-memory and SQLite stores and read-through pages: the model's GPU, if any."""
        device = self._encoder.device if self._encoder is not None else None
        return None if device is None or str(device).startswith("cpu") else str(device)

    def _overlap_device(self) -> torch.device | None:
        """The CUDA device to stage stored pages on while the query is encoded; `None` keeps `store.score`."""
        device = self._score_device()
        if device is None or type(self.multivector_store) not in _KERNEL_STORES:
            return None
        target = torch.device(device)
        return target if target.type == "cuda" else None

    def _start_fetch(self, documents: list[Document]) -> _Fetch | None:
        """
        Start getting the candidates' stored pages in the fetch thread, while the query is encoded.

        On a GPU the pages are staged there (device cache, else fetched and uploaded); on a CPU with the SQLite
        store the host cache is looked up (the missing pages are fetched later, in the calling thread). `None`:
        `store.score` scores.

        :returns: The function that scores the fetched pages, and the fetch's future.
        """
        store = self.multivector_store
        if store is None or type(store) not in _KERNEL_STORES:
            return None
        device = self._overlap_device()
        host = device is None and self._score_device() is None
        if host and (self._host_cache is None or type(store) not in _HOST_CACHED_STORES):
            return None
        if device is None and not host:
            return None
        with self._warm_lock:
            if self._fetch_pool is None:
                self._fetch_pool = ThreadPoolExecutor(1, thread_name_prefix="colpali-ranker-fetch")
        ids = list(dict.fromkeys(d.id for d in documents))
        if host:
            assert self._host_cache is not None
            return self._score_host_lookup, self._fetch_pool.submit(self._host_cache.lookup, store, ids)
        assert device is not None
        return _score_fetched, self._fetch_pool.submit(stage_store_pages, store, ids, device, self._device_cache)

    def _score_host_lookup(
        self, query: np.ndarray | torch.Tensor, lookup: Future[HostLookup]
    ) -> dict[str, float] | None:
        """
        CPU MaxSim of the candidates' stored pages: the ones the host cache holds, and the others fetched here, in
        the calling thread (its own SQLite connection: concurrent queries read blobs in parallel), then cached.

        `None` where the caller must run `store.score` instead (the lookup or the fetch failed, nothing was found,
        or the query is malformed or not finite): `store.score` then raises exactly the error it raises without
        the cache.
        """
        try:
            cached = lookup.result()
        except Exception:  # store.score raises it again, in its usual order after the query checks
            return None
        query_t = torch.as_tensor(query)
        if query_t.ndim != 2 or query_t.shape[0] == 0 or not bool(torch.isfinite(query_t).all()):
            return None
        store, cache = self.multivector_store, self._host_cache
        assert store is not None
        assert cache is not None
        found = list(cached.found)
        fetched: dict[str, np.ndarray] = {}

        def chunks() -> Iterator[list[np.ndarray]]:
            # As the SQLite store's own `score` does: the kernel's workers score chunk i while this thread reads
            # the blobs of chunk i + 1.
            if cached.pages:
                yield list(cached.pages)
            for start in range(0, len(cached.missing), _FETCH_CHUNK):
                part = store.get(cached.missing[start : start + _FETCH_CHUNK])
                found.extend(part)
                fetched.update(part)
                yield list(part.values())

        try:
            scores = maxsim_chunks(query_t, chunks())
        except Exception:
            return None
        cache.insert(fetched, cached.owner)
        if not found:
            return None
        return dict(zip(found, scores.tolist(), strict=True))

    def _encode_query(self, query: str, *, on_device: bool = False) -> np.ndarray | torch.Tensor:
        assert self._encoder is not None
        if on_device:  # GPU scoring: the query stays where the model put it
            return self._encoder.embed_query_tensor(query, query_prefix=self.query_prefix, cuda_graphs=self.cuda_graphs)
        if self.query_prefix is None:
            return self._encoder.embed_queries([query], cuda_graphs=self.cuda_graphs)[0]
        embed: Any = self._encoder.embed_queries
        return embed([query], query_prefix=self.query_prefix, cuda_graphs=self.cuda_graphs)[0]

    def _check_query_embedding(self, embedding: Any) -> np.ndarray:
        name = type(self).__name__
        try:
            array = np.asarray(embedding, dtype=np.float32)
        except (TypeError, ValueError) as e:
            msg = f"{name}: query_multivector_embedding must be a list of equal-length float lists: {e}"
            raise ValueError(msg) from e
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
            msg = f"{name}: query_multivector_embedding must be a non-empty (tokens, dim) list, got shape {array.shape}"
            raise ValueError(msg)
        if not np.isfinite(array).all():
            msg = f"{name}: query_multivector_embedding contains NaN or infinite values"
            raise ValueError(msg)
        self._check_query_width(array)
        return array

    def _check_query_width(self, array: np.ndarray) -> None:
        """The query embedding's width against the model's (once loaded), else the store's (if it records one)."""
        name = type(self).__name__
        store = self.multivector_store
        expected = self._encoder.dim if self._encoder is not None else (store.dim if store is not None else None)
        if expected is not None and array.shape[1] != expected:
            msg = (
                f"{name}: query_multivector_embedding has vectors of dim {array.shape[1]}, but model "
                f"'{self.model}' and its store use dim {expected}: connect the `multivector_embedding` of a "
                "ColPaliTextEmbedder with the same model (a dense text embedder's `embedding` does not fit), or pass "
                "the query text as `query`"
            )
            raise ValueError(msg)

    def _stored_scores(
        self,
        query: np.ndarray | torch.Tensor,
        documents: list[Document],
        fetch: _Fetch | None = None,
    ) -> dict[str, float]:
        store = self.multivector_store
        if store is None:
            return {}
        store_dim = store.dim
        if store_dim is not None and store_dim != query.shape[1]:
            msg = (
                f"{type(self).__name__}: the multi-vector store holds vectors of dim {store_dim}, but the query "
                f"(model '{self.model}') has dim {query.shape[1]}"
            )
            raise MultiVectorStoreError(msg)
        if fetch is not None:
            score_fetched, future = fetch
            scores = score_fetched(query, future)
            if scores is not None:
                return scores
        ids = list(dict.fromkeys(d.id for d in documents))
        return dict(store.score(query, ids, device=self._score_device()))

    def _pool_factor(self) -> int | None:
        # Pages encoded here must look like the stored ones: pooled with the factor the indexing run recorded.
        factor = self.multivector_store.pool_factor if self.multivector_store is not None else None
        return factor if factor is not None and factor > 1 else None

    def _cache_key(self, doc: Document) -> tuple[Any, ...]:
        # Ids come from path and page, so an edited file keeps its id: the key also holds the file's size and
        # modification time (or the blob's length and hash), and a changed page is encoded again.
        if doc.blob is not None:
            return (doc.id, "blob", len(doc.blob.data), hash(doc.blob.data))
        value = doc.meta.get(self.file_path_meta_field)
        if not isinstance(value, (str, Path)):
            return (doc.id, None)  # planning reports the problem
        try:
            stat = resolve_path(value, self.root_path, meta_field=self.file_path_meta_field).stat()
        except (MediaError, OSError, TypeError):
            return (doc.id, None)  # planning reports the problem
        return (doc.id, str(value), stat.st_size, stat.st_mtime_ns)

    def _read_through(self, documents: list[Document]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Vectors for candidates without stored ones: from the cache, or planned, loaded and encoded now."""
        assert self._encoder is not None
        vectors: dict[str, np.ndarray] = {}
        todo: list[Document] = []
        keys: dict[str, tuple[Any, ...]] = {}
        for doc in {d.id: d for d in documents}.values():
            keys[doc.id] = self._cache_key(doc)
            cached = self._cache.get(keys[doc.id])
            if cached is not None:
                vectors[doc.id] = cached
            else:
                todo.append(doc)
        if not todo:
            return vectors, {}
        plan = plan_documents(
            todo, file_path_meta_field=self.file_path_meta_field, root_path=self.root_path, probe_pixels=False
        )
        problems = {todo[i].id: reason for i, reason in plan.failures.items()}
        pool_factor = self._pool_factor()
        for positions, images, failed in iter_image_batches(plan, plan.visual_indices(), self.batch_size):
            problems.update({todo[i].id: reason for i, reason in failed.items()})
            if not images:
                continue
            try:
                encoded = self._encoder.embed_images(images, pool_factor=pool_factor)
            finally:
                for image in images:
                    image.close()
            for i, array in zip(positions, encoded, strict=True):
                stored = np.ascontiguousarray(array, dtype=self._cache_dtype)
                vectors[todo[i].id] = stored
                self._cache.put(keys[todo[i].id], stored)
        return vectors, problems

    @component.output_types(documents=list[Document])
    def run(
        self,
        query: str | None = None,
        *,
        documents: list[Document],
        query_multivector_embedding: list[list[float]] | None = None,
        top_k: int | None = None,
        score_threshold: float | None = None,
    ) -> dict[str, list[Document]]:
        """
        Re-rank candidates for a query.

        :param query: The query text (encoded here unless `query_multivector_embedding` is given).
        :param documents: The candidates (typically ~100 from a dense retriever); not modified.
        :param query_multivector_embedding: The query already encoded by the same model, e.g. the
            `multivector_embedding` output of a `ColPaliTextEmbedder` (Haystack 3.5's name): the query is
            then not encoded again.
        :param top_k: Overrides the init `top_k` for this call (0 returns nothing).
        :param score_threshold: Overrides the init `score_threshold` for this call.
        :returns: `{"documents": [...]}`, best first (documents without a score last): every candidate unless
            `top_k` or `score_threshold` removes some.
        :raises ValueError: Without a query or its embedding, on an empty query, a malformed embedding or an
            invalid `top_k`.
        :raises MultiVectorStoreError: When stored vectors do not fit the model (width, model id).
        :raises TypeError: When `documents` is not a list (or tuple) of Documents.
        """
        component_name = type(self).__name__
        check_documents_input(component_name, documents, allow_tuple=True)
        if query_multivector_embedding is None:
            if query is None:
                msg = f"{component_name} needs `query` or `query_multivector_embedding`; got neither"
                raise ValueError(msg)
            check_query(component_name, query)
        top_k, score_threshold = call_top_k_and_threshold(self, top_k, score_threshold)
        if not documents or top_k == 0:
            return {"documents": []}

        # On a GPU the stored pages are fetched, packed and sent to the device while the query is encoded.
        query_vectors: np.ndarray | torch.Tensor
        if query_multivector_embedding is None:
            self.warm_up()
            fetch = self._start_fetch(documents)
            # GPU scoring: the query stays where the model put it.
            query_vectors = self._encode_query(str(query), on_device=fetch is not None and fetch[0] is _score_fetched)
        else:
            query_vectors = self._check_query_embedding(query_multivector_embedding)
            fetch = self._start_fetch(documents)
        n_query_tokens = query_vectors.shape[0]
        late = self._stored_scores(query_vectors, documents, fetch)
        missing = [d for d in documents if d.id not in late]
        if missing:
            self.warm_up()
            if query_multivector_embedding is not None:
                # The model's width is known only once it is loaded (an empty store records none).
                self._check_query_width(np.asarray(query_vectors))
            vectors, problems = self._read_through(missing)
            late.update(maxsim_by_id(query_vectors, vectors, device=self._score_device()))
            if vectors and self.multivector_store is not None and not self._warned_unstored:
                self._warned_unstored = True
                logger.warning(
                    "{component}: {count} image/page candidate(s) have no vectors in the multi-vector store "
                    "({store}), so their pages were encoded now, at query time (slow; logged once per ranker). "
                    "Index them with ColPaliDocumentEmbedder into the same store, or check that the ranker's store "
                    "is the one the indexing pipeline wrote. First ids: {ids}",
                    component=component_name,
                    count=len(vectors),
                    store=_describe_store(self.multivector_store),
                    ids=", ".join(f"'{doc_id}'" for doc_id in list(vectors)[:3]),
                )
            if problems:
                logger.warning(
                    "{component}: {count} candidate(s) have no stored multi-vector and no readable image; they keep "
                    "their incoming score: {details}",
                    component=component_name,
                    count=len(problems),
                    details="; ".join(f"'{doc_id}': {reason}" for doc_id, reason in problems.items()),
                )
        corrupt = sorted(doc_id for doc_id, value in late.items() if not math.isfinite(value))
        if corrupt:
            logger.warning(
                "{component}: the stored multi-vectors of {count} candidate(s) are not finite (a corrupt store); "
                "they rank last without a score: {ids}",
                component=component_name,
                count=len(corrupt),
                ids=", ".join(f"'{doc_id}'" for doc_id in corrupt),
            )

        ranked = _rescore_and_select(
            documents,
            late,
            n_query_tokens=n_query_tokens,
            normalize=self.normalize_scores,
            top_k=top_k,
            score_threshold=score_threshold,
        )
        return {"documents": ranked}
