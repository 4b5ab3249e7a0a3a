from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.utils import ComponentDevice, Secret

from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec, serialize_loading_params
from haystack_integrations.common.multimodal_rag.errors import MediaError, MultiVectorStoreError
from haystack_integrations.common.multimodal_rag.inputs.media import VISUAL_MODALITIES, classify, load_images, locate
from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim
from haystack_integrations.common.multimodal_rag.numerics.ranking import (
    DENSE_SCORE_META_KEY,
    LATE_INTERACTION_SCORE_META_KEY,
    check_top_k_and_threshold,
    select_top,
)
from haystack_integrations.common.multimodal_rag.validation import (
    batched,
    check_positive_int,
    check_query,
)
from haystack_integrations.document_stores.multivector.protocol import (
    MultiVectorStore,
    check_store_compatible,
    with_store_from_dict,
)

logger = logging.getLogger(__name__)


class _LRUCache:
    """Thread-safe LRU cache of page multi-vectors computed on the fly."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


@component
class ColPaliRanker:
    """
    Re-ranks retrieved candidates with late interaction (MaxSim) between query tokens and page patches.

    Stage 2 of two-stage multimodal retrieval: a dense retriever returns ~100 candidates fast, this
    ranker scores them precisely. Page multi-vectors come from `multivector_store` (computed once at
    indexing time by `ColPaliDocumentEmbedder`), so a query costs one query encoding plus ~10 ms of
    MaxSim for 100 pages on a CPU. Pages that have no stored vectors are encoded on the fly and kept in
    an LRU cache of `cache_size` pages, so a pipeline without a store still works, just slower.
    A store that can score server-side (`QdrantMultiVectorStore`) computes MaxSim where the vectors live.

    Every output document keeps the incoming (retriever) score in `meta["dense_score"]` and gets
    `meta["late_interaction_score"]` (raw MaxSim) and a new `score`: MaxSim divided by the number of query
    tokens with `normalize_scores=True` (comparable across queries), raw MaxSim otherwise. Text-only
    documents keep their incoming score and get no late-interaction score (`ModalityScoreCalibrator`
    fuses them later); candidates with neither stored vectors nor a readable image keep their score too,
    with a warning naming them. Nothing is dropped except by `top_k` and `score_threshold`.

    ### Usage example
    ```python
    from haystack_integrations.components.rankers.colpali import ColPaliRanker
    from haystack_integrations.document_stores.multivector import SQLiteMultiVectorStore

    ranker = ColPaliRanker(model="vidore/colqwen2.5-v0.2", multivector_store=SQLiteMultiVectorStore("index/mv.sqlite"))
    result = ranker.run(query="Which quarter had the highest revenue?", documents=candidates, top_k=5)
    ```
    """

    def __init__(
        self,
        model: str = "vidore/colqwen2.5-v0.2",
        *,
        multivector_store: MultiVectorStore | None = None,
        top_k: int = 10,
        score_threshold: float | None = None,
        normalize_scores: bool = True,
        device: ComponentDevice | None = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        batch_size: int = 4,
        cache_size: int = 512,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        file_path_meta_field: str = "file_path",
        root_path: str | None = None,
    ) -> None:
        """
        Create the ranker. Nothing is loaded until `warm_up()`.

        :param model: Hugging Face id or local path of a ColPali-family checkpoint (the one used at indexing).
        :param multivector_store: Store holding page multi-vectors; `None` encodes every page on the fly.
        :param top_k: How many documents to return.
        :param score_threshold: Drop documents whose final `score` is below this value.
        :param normalize_scores: Divide MaxSim by the number of query tokens.
        :param device: Device to run on; `None` picks the best available.
        :param token: Hugging Face token, for gated or private models.
        :param batch_size: Pages per forward pass when encoding on the fly.
        :param cache_size: Pages kept in the on-the-fly LRU cache (0 disables it).
        :param local_files_only: Only use a local path or the local Hugging Face cache.
        :param model_kwargs: Extra keyword arguments for the model's `from_pretrained`.
        :param file_path_meta_field: Meta key holding the path of a candidate's image or PDF (on-the-fly path).
        :param root_path: Directory that relative file paths are resolved in; paths escaping it are refused.
        :raises ValueError: On invalid parameters.
        """
        check_top_k_and_threshold(top_k, score_threshold)
        check_positive_int("batch_size", batch_size)
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            msg = f"cache_size must be a non-negative integer, got {cache_size!r}"
            raise ValueError(msg)
        self.model = model
        self.multivector_store = multivector_store
        self.top_k = top_k
        self.score_threshold = score_threshold
        self.normalize_scores = normalize_scores
        self.device = device
        self.token = token
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.local_files_only = local_files_only
        self.model_kwargs = model_kwargs
        self.file_path_meta_field = file_path_meta_field
        self.root_path = root_path
        self._encoder: LateInteractionEncoder | None = None
        self._cache = _LRUCache(cache_size)
        self._warm_lock = threading.Lock()
        # The on-the-fly path stores vectors like the store does, so both paths score identical values.
        self._cache_dtype = np.dtype(getattr(multivector_store, "dtype", None) or "float16")

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
                        self.multivector_store, dim=encoder.dim, model=self.model, component=type(self).__name__
                    )
                self._encoder = encoder

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
            batch_size=self.batch_size,
            cache_size=self.cache_size,
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

    def _stored_scores(self, query: np.ndarray, documents: list[Document]) -> dict[str, float]:
        store = self.multivector_store
        if store is None:
            return {}
        ids = list(dict.fromkeys(d.id for d in documents))
        server_side = getattr(store, "score", None)
        if callable(server_side):
            return dict(server_side(query, ids))
        vectors = store.get(ids)
        for doc_id, array in vectors.items():
            if array.ndim != 2 or array.shape[1] != query.shape[1]:
                msg = (
                    f"{type(self).__name__}: the stored multi-vector of document '{doc_id}' has shape {array.shape}, "
                    f"but model '{self.model}' produces vectors of dim {query.shape[1]}"
                )
                raise MultiVectorStoreError(msg)
        if not vectors:
            return {}
        scores = maxsim(query, list(vectors.values()))
        return dict(zip(vectors.keys(), scores.tolist(), strict=True))

    def _on_the_fly_vectors(self, documents: list[Document]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Vectors for candidates without stored ones: from the cache or encoded now. Returns (vectors, problems)."""
        assert self._encoder is not None
        vectors: dict[str, np.ndarray] = {}
        problems: dict[str, str] = {}
        to_encode: list[tuple[Document, Any]] = []
        for doc in documents:
            if doc.id in vectors:
                continue
            cached = self._cache.get(doc.id)
            if cached is not None:
                vectors[doc.id] = cached
                continue
            try:
                modality = classify(doc, file_path_meta_field=self.file_path_meta_field)
            except MediaError as e:
                problems[doc.id] = str(e)
                continue
            if modality not in VISUAL_MODALITIES:
                continue  # text: keeps its score, no warning
            try:
                source = locate(doc, modality, file_path_meta_field=self.file_path_meta_field, root_path=self.root_path)
            except MediaError as e:
                problems[doc.id] = str(e)
                continue
            to_encode.append((doc, source))
        for chunk in batched(to_encode, self.batch_size):
            loaded = load_images([source for _, source in chunk])
            ok = [(doc, img) for (doc, _), img in zip(chunk, loaded, strict=True) if not isinstance(img, MediaError)]
            for (doc, _), img in zip(chunk, loaded, strict=True):
                if isinstance(img, MediaError):
                    problems[doc.id] = str(img)
            if not ok:
                continue
            encoded = self._encoder.embed_images([img for _, img in ok])
            for (doc, img), array in zip(ok, encoded, strict=True):
                img.close()
                stored = np.ascontiguousarray(array, dtype=self._cache_dtype)
                vectors[doc.id] = stored
                self._cache.put(doc.id, stored)
        return vectors, problems

    @component.output_types(documents=list[Document])
    def run(
        self,
        query: str,
        documents: list[Document],
        top_k: int | None = None,
        score_threshold: float | None = None,
    ) -> dict[str, list[Document]]:
        """
        Re-rank candidates for a query.

        :param query: The query text.
        :param documents: The candidates (typically ~100 from a dense retriever); not modified.
        :param top_k: Overrides the init `top_k` for this call (0 returns nothing).
        :param score_threshold: Overrides the init `score_threshold` for this call.
        :returns: `{"documents": [...]}`, best first: `min(top_k, len(documents))` documents unless
            `score_threshold` removes some.
        :raises ValueError: On an empty query or an invalid `top_k`.
        :raises MultiVectorStoreError: When stored vectors do not fit the model (width, model id).
        """
        component_name = type(self).__name__
        check_query(component_name, query)
        top_k = self.top_k if top_k is None else top_k
        score_threshold = self.score_threshold if score_threshold is None else score_threshold
        check_top_k_and_threshold(top_k, score_threshold)
        if not documents or top_k == 0:
            return {"documents": []}
        self.warm_up()
        assert self._encoder is not None

        query_vectors = self._encoder.embed_queries([query])[0]
        n_query_tokens = query_vectors.shape[0]
        late = self._stored_scores(query_vectors, documents)
        missing = [d for d in documents if d.id not in late]
        if missing:
            vectors, problems = self._on_the_fly_vectors(missing)
            if vectors:
                scores = maxsim(query_vectors, list(vectors.values()))
                late.update(zip(vectors.keys(), scores.tolist(), strict=True))
            if problems:
                logger.warning(
                    "{component}: {count} candidate(s) have no stored multi-vector and no readable image; they keep "
                    "their incoming score: {details}",
                    component=component_name,
                    count=len(problems),
                    details="; ".join(f"'{doc_id}': {reason}" for doc_id, reason in problems.items()),
                )

        ranked: list[Document] = []
        for doc in documents:
            meta = dict(doc.meta)
            meta.setdefault(DENSE_SCORE_META_KEY, doc.score)
            score = doc.score
            if doc.id in late:
                raw = float(late[doc.id])
                meta[LATE_INTERACTION_SCORE_META_KEY] = raw
                score = raw / n_query_tokens if self.normalize_scores else raw
            ranked.append(replace(doc, score=score, meta=meta))
        return {"documents": select_top(ranked, top_k=top_k, score_threshold=score_threshold)}
