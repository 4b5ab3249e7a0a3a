"""Filter-aware oversampling around any Haystack embedding retriever.

Approximate indexes that apply metadata filters after the graph search (HNSW post-filtering, object-storage
vector stores) return fewer and worse candidates the more selective a filter is: with `top_k=10` and a filter
that keeps 1% of the corpus, the graph search finds ~10 neighbours of which ~0.1 pass the filter. The fix
used by the reference designs is to scale the candidate count with how much the filter shrinks the pool:
ask the retriever for `top_k / selectivity` candidates (times a safety margin, bounded), then keep `top_k`.
"""

from __future__ import annotations

import json
import math
import numbers
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, TypedDict

from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.core.serialization import component_from_dict, component_to_dict, import_class_by_name
from haystack.document_stores.types import FilterPolicy
from haystack.document_stores.types.filter_policy import apply_filter_policy
from haystack.errors import FilterError

from haystack_integrations.common.multimodal_rag.errors import ComponentOutputError, InvalidFiltersError
from haystack_integrations.common.multimodal_rag.validation import check_number, check_positive_int

logger = logging.getLogger(__name__)


class OversamplingReport(TypedDict):
    """What `FilterAwareRetriever.run` did for one query (its `oversampling` output)."""

    #: Filtered count / total count of the store (`None` when it could not be counted).
    selectivity: float | None
    #: `retriever_top_k / top_k` (0.0 when the filter matches nothing and the retriever was not called).
    boost: float
    #: The `top_k` the wrapped retriever was asked for.
    retriever_top_k: int
    #: `"estimated"` (from the store's counts), `"fallback"` (fixed factor: counting failed), `"no_filter"`
    #: or `"empty"` (the filter matches no document).
    mode: str


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _check_filters(filters: Any) -> None:
    """Refuse what no store accepts as a Haystack filter: a non-mapping, a non-string key, a filter inside itself."""
    if not isinstance(filters, Mapping):
        msg = (
            f"FilterAwareRetriever: filters must be a mapping (a Haystack filter such as "
            f"{{'field': 'meta.x', 'operator': '==', 'value': 1}}), got a {type(filters).__name__}: {_short(filters)}"
        )
        raise InvalidFiltersError(msg)
    # Iterative walk: `active` holds the containers on the path from the root, so a container met again while
    # it is still open is a cycle (one shared twice side by side is fine).
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(filters, False)]
    while stack:
        node, done = stack.pop()
        if done:
            active.discard(id(node))
            continue
        if not isinstance(node, (Mapping, list, tuple)):
            continue
        if id(node) in active:
            msg = f"FilterAwareRetriever: the filters contain themselves (a circular reference): {_short(filters)}"
            raise InvalidFiltersError(msg)
        active.add(id(node))
        stack.append((node, True))
        if isinstance(node, Mapping):
            bad = [key for key in node if not isinstance(key, str)]
            if bad:
                msg = (
                    f"FilterAwareRetriever: filter keys must be strings ('field', 'operator', 'value', "
                    f"'conditions'), got {bad[0]!r} in {_short(filters)}"
                )
                raise InvalidFiltersError(msg)
            stack.extend((value, False) for value in node.values())
        else:
            stack.extend((value, False) for value in node)


def _filter_key(filters: Mapping[str, Any]) -> str:
    # Values that print alike but compare differently (a datetime and its string) must not share an entry.
    try:
        return json.dumps(filters, sort_keys=True, default=lambda value: f"<{type(value).__qualname__}>{value!r}")
    except RecursionError as e:
        msg = f"FilterAwareRetriever: the filters are nested too deeply to be used: {_short(filters)}"
        raise InvalidFiltersError(msg) from e


def _count(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"a count of {value!r} ({type(value).__name__}), not a number"
        raise TypeError(msg)
    return float(value)


def _filter_policy_of(retriever: Any) -> FilterPolicy:
    policy = getattr(retriever, "filter_policy", getattr(retriever, "_filter_policy", FilterPolicy.REPLACE))
    return policy if isinstance(policy, FilterPolicy) else FilterPolicy.from_str(str(policy))


@component
class FilterAwareRetriever:
    """
    Wraps a Haystack embedding retriever and raises its `top_k` for selective filters, so that about `top_k`
    candidates survive a post-filtering index.

    For each distinct filter the store's `count_documents_by_filter(filters) / count_documents()` estimates the
    filter's selectivity `s` (cached for `cache_ttl_s` seconds, per filter). The wrapped retriever is then asked
    for `ceil(top_k * safety_factor / s)` candidates, at most `max_top_k` but never fewer than `top_k` (a `top_k`
    above `max_top_k` wins: the retriever is asked for exactly `top_k`), and the best `top_k` are returned.
    A filter that matches nothing returns no documents without calling the retriever. When the store cannot
    count a filter (it raises, or returns a count that is not a finite non-negative number), a fixed
    `fallback_factor` is used and a warning says so (once per filter); a filter the store refuses as invalid
    (Haystack's `FilterError`) is raised at once, as the retriever would raise it.
    Without filters the retriever runs with `top_k` unchanged.

    ```python
    from haystack_integrations.components.retrievers.oversampling import FilterAwareRetriever
    from haystack_integrations.components.retrievers.qdrant import QdrantEmbeddingRetriever

    retriever = FilterAwareRetriever(QdrantEmbeddingRetriever(document_store=store), top_k=100)
    result = retriever.run(query_embedding=emb, filters={"field": "meta.modality", "operator": "==", "value": "image"})
    result["oversampling"]  # {"selectivity": 0.04, "boost": 37.5, "retriever_top_k": 3750, "mode": "estimated"}
    ```
    """

    def __init__(
        self,
        retriever: Any,
        *,
        top_k: int = 10,
        max_top_k: int = 1000,
        safety_factor: float = 1.5,
        fallback_factor: float = 4.0,
        cache_ttl_s: float = 60.0,
        cache_size: int = 256,
    ) -> None:
        """
        Create the wrapper.

        :param retriever: A Haystack embedding retriever: a component whose `run` takes `query_embedding`,
            `filters` and `top_k`, with its document store in `document_store` (or `_document_store`) exposing
            `count_documents()` and `count_documents_by_filter(filters)`.
        :param top_k: Documents to return per query (overridable in `run`).
        :param max_top_k: Upper bound of the boosted `top_k` the wrapped retriever is asked for; a `top_k`
            (here or in `run`) above it wins, and the retriever is asked for that `top_k`.
        :param safety_factor: Margin over `top_k / selectivity` (>= 1): post-filtered graph searches lose
            matches beyond the plain count, so asking for exactly `top_k / s` returns fewer than `top_k`.
        :param fallback_factor: Boost used when the filter cannot be counted (>= 1).
        :param cache_ttl_s: Seconds a filter's selectivity estimate is reused (0 disables the cache).
        :param cache_size: Number of distinct filters kept in the cache.
        :raises TypeError: When `retriever` is a class rather than an instance, or has no `run` method.
        :raises ValueError: On invalid numbers.
        """
        if isinstance(retriever, type):
            msg = (
                f"retriever must be a retriever instance, got the class {retriever.__qualname__}: "
                f"pass {retriever.__qualname__}(document_store=...)"
            )
            raise TypeError(msg)
        if not callable(getattr(retriever, "run", None)):
            msg = f"retriever must be a Haystack retriever component with a run() method, got {type(retriever)}"
            raise TypeError(msg)
        check_positive_int("top_k", top_k)
        check_positive_int("max_top_k", max_top_k)
        check_positive_int("cache_size", cache_size)
        check_number("safety_factor", safety_factor, minimum=1.0)
        check_number("fallback_factor", fallback_factor, minimum=1.0)
        check_number("cache_ttl_s", cache_ttl_s, minimum=0.0)
        self.retriever = retriever
        self.top_k = top_k
        self.max_top_k = max_top_k
        self.safety_factor = float(safety_factor)
        self.fallback_factor = float(fallback_factor)
        self.cache_ttl_s = float(cache_ttl_s)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, float | None]] = OrderedDict()
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Warm up the wrapped retriever, if it has a `warm_up`."""
        warm_up = getattr(self.retriever, "warm_up", None)
        if callable(warm_up):
            warm_up()

    @property
    def document_store(self) -> Any:
        """The wrapped retriever's document store (`None` when it does not expose one)."""
        store = getattr(self.retriever, "document_store", None)
        return store if store is not None else getattr(self.retriever, "_document_store", None)

    def _effective_filters(self, filters: dict[str, Any] | None) -> dict[str, Any] | None:
        init_filters = getattr(self.retriever, "filters", getattr(self.retriever, "_filters", None))
        return apply_filter_policy(_filter_policy_of(self.retriever), init_filters, filters)

    def selectivity(self, filters: dict[str, Any]) -> float | None:
        """
        Estimate the fraction of the store's documents that `filters` keeps (cached per filter).

        :param filters: Haystack filters.
        :returns: A value in [0, 1], or `None` when the store cannot count them.
        :raises InvalidFiltersError: When `filters` is not a Haystack filter (see `run`).
        :raises FilterError: When the store refuses the filter as invalid (the retriever would refuse it too).
        """
        _check_filters(filters)
        key = _filter_key(filters)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] <= self.cache_ttl_s:
                self._cache.move_to_end(key)
                return hit[1]
        value: float | None
        try:
            store = self.document_store
            total = _count(store.count_documents())
            matched = _count(store.count_documents_by_filter(filters))
            if not (math.isfinite(total) and math.isfinite(matched)) or total < 0 or matched < 0:
                msg = f"the store counted {matched!r} of {total!r} documents"
                raise ValueError(msg)
            value = 0.0 if total == 0 else min(1.0, matched / total)
        except FilterError:
            # An invalid filter (an unknown operator, ...): the retriever raises the same error, so a fallback
            # warning would only be noise.
            raise
        except Exception as e:
            value = None
            if key not in self._warned:
                self._warned.add(key)
                logger.warning(
                    "FilterAwareRetriever: the document store cannot count the filter {filters} ({error}); "
                    "using the fixed boost fallback_factor={factor}",
                    filters=key,
                    error=f"{type(e).__name__}: {e}",
                    factor=self.fallback_factor,
                )
        # An empty result is not cached: documents written a moment later must be found at once.
        if self.cache_ttl_s > 0 and value != 0.0:
            with self._lock:
                self._cache[key] = (now, value)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return value

    def clear_cache(self) -> None:
        """Forget every cached selectivity (e.g. after a large write)."""
        with self._lock:
            self._cache.clear()

    @component.output_types(documents=list[Document], oversampling=dict)
    def run(
        self, query_embedding: list[float], filters: dict[str, Any] | None = None, top_k: int | None = None
    ) -> dict[str, Any]:
        """
        Retrieve `top_k` documents, oversampling the wrapped retriever for selective filters.

        :param query_embedding: The query's embedding.
        :param filters: Haystack filters (combined with the retriever's own according to its filter policy).
        :param top_k: Documents to return; `None` uses the init value. It may exceed `max_top_k`: the retriever
            is then asked for `top_k` candidates.
        :returns: `documents` (at most `top_k`, best first, as the retriever ranked them) and `oversampling`
            (an `OversamplingReport`: selectivity, boost, the retriever's `top_k` and the mode).
        :raises ValueError: On an invalid `top_k`.
        :raises InvalidFiltersError: When the filters are not a mapping, have a non-string key or contain
            themselves (they cannot be cached or sent to any store).
        :raises FilterError: When the store refuses the filters as invalid.
        :raises ComponentOutputError: When the wrapped retriever returns no `documents` list of Documents.
        """
        k = self.top_k if top_k is None else top_k
        check_positive_int("top_k", k)
        if filters is not None:
            _check_filters(filters)
        effective = self._effective_filters(filters)
        if not effective:
            report = OversamplingReport(selectivity=None, boost=1.0, retriever_top_k=k, mode="no_filter")
            docs = self._retrieve(query_embedding, filters, k)
            return {"documents": docs[:k], "oversampling": report}
        s = self.selectivity(effective)
        if s == 0.0:
            report = OversamplingReport(selectivity=0.0, boost=0.0, retriever_top_k=0, mode="empty")
            return {"documents": [], "oversampling": report}
        wanted = k * self.fallback_factor if s is None else k * self.safety_factor / s
        retriever_k = max(k, min(self.max_top_k, math.ceil(wanted)))
        docs = self._retrieve(query_embedding, filters, retriever_k)
        report = OversamplingReport(
            selectivity=s,
            boost=retriever_k / k,
            retriever_top_k=retriever_k,
            mode="fallback" if s is None else "estimated",
        )
        return {"documents": docs[:k], "oversampling": report}

    def _retrieve(self, query_embedding: list[float], filters: dict[str, Any] | None, top_k: int) -> list[Document]:
        result = self.retriever.run(query_embedding=query_embedding, filters=filters, top_k=top_k)
        docs = result.get("documents") if isinstance(result, Mapping) else None
        if not isinstance(docs, list) or not all(isinstance(doc, Document) for doc in docs):
            got = (
                f"'documents' = {_short(docs)}"
                if isinstance(result, Mapping) and "documents" in result
                else f"{_short(result)} (no 'documents')"
            )
            msg = (
                f"FilterAwareRetriever: the wrapped retriever {type(self.retriever).__qualname__} returned {got}; "
                "a retriever must return {'documents': [Document, ...]}"
            )
            raise ComponentOutputError(msg)
        return docs

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize the component, the wrapped retriever included.

        :returns: The serialized component.
        """
        return default_to_dict(
            self,
            retriever=component_to_dict(self.retriever, "retriever"),
            top_k=self.top_k,
            max_top_k=self.max_top_k,
            safety_factor=self.safety_factor,
            fallback_factor=self.fallback_factor,
            cache_ttl_s=self.cache_ttl_s,
            cache_size=self.cache_size,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FilterAwareRetriever:
        """
        Deserialize the component (the wrapped retriever's class is imported through Haystack's allowlist).

        :param data: The serialized component.
        :returns: The component.
        """
        params = dict(data.get("init_parameters", {}))
        inner = params["retriever"]
        inner_cls = import_class_by_name(inner["type"])
        params["retriever"] = component_from_dict(inner_cls, inner, "retriever")
        return default_from_dict(cls, {**data, "init_parameters": params})
