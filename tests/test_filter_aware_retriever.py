from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from haystack import Document, Pipeline, component
from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
from haystack.document_stores.in_memory import InMemoryDocumentStore

from haystack_integrations.components.retrievers.oversampling import FilterAwareRetriever

DIM = 8


def _store(n: int = 1000, seed: int = 0) -> InMemoryDocumentStore:
    rng = np.random.default_rng(seed)
    store = InMemoryDocumentStore()
    store.write_documents(
        [Document(id=f"d{i}", embedding=rng.normal(size=DIM).tolist(), meta={"bucket": i % 100}) for i in range(n)]
    )
    return store


def _bucket_below(limit: int) -> dict[str, Any]:
    return {"field": "meta.bucket", "operator": "<", "value": limit}


@component
class SpyRetriever:
    """Post-filters like an HNSW index would and records the top_k it was asked for."""

    def __init__(self, document_store: Any) -> None:
        self.document_store = document_store
        self.calls: list[int] = []
        self._inner = InMemoryEmbeddingRetriever(document_store)

    @component.output_types(documents=list[Document])
    def run(self, query_embedding: list[float], filters: dict | None = None, top_k: int = 10) -> dict:
        self.calls.append(top_k)
        found = self._inner.run(query_embedding=query_embedding, top_k=top_k)["documents"]
        limit = filters["value"] if filters else None
        return {"documents": [d for d in found if limit is None or d.meta["bucket"] < limit]}


def test_a_selective_filter_raises_the_retrievers_top_k_by_the_inverse_selectivity() -> None:
    spy = SpyRetriever(_store())
    retriever = FilterAwareRetriever(spy, top_k=5, safety_factor=1.5)
    out = retriever.run(query_embedding=[0.1] * DIM, filters=_bucket_below(2))
    report = out["oversampling"]
    assert report["selectivity"] == pytest.approx(0.02)
    assert report["mode"] == "estimated"
    assert spy.calls == [375]  # ceil(5 * 1.5 / 0.02)
    assert report["retriever_top_k"] == 375
    assert report["boost"] == pytest.approx(75.0)
    assert 0 < len(out["documents"]) <= 5
    assert all(d.meta["bucket"] < 2 for d in out["documents"])


def test_post_filtering_without_the_boost_loses_candidates_and_with_it_keeps_top_k() -> None:
    spy = SpyRetriever(_store())
    plain = spy.run(query_embedding=[0.3] * DIM, filters=_bucket_below(5), top_k=10)["documents"]
    boosted = FilterAwareRetriever(spy, top_k=10).run(query_embedding=[0.3] * DIM, filters=_bucket_below(5))
    assert len(plain) < 10
    assert len(boosted["documents"]) == 10


def test_the_boost_is_bounded_by_max_top_k() -> None:
    spy = SpyRetriever(_store())
    out = FilterAwareRetriever(spy, top_k=10, max_top_k=50).run(query_embedding=[0.1] * DIM, filters=_bucket_below(1))
    assert spy.calls == [50]
    assert out["oversampling"]["boost"] == pytest.approx(5.0)


def test_a_filter_that_matches_nothing_returns_nothing_without_searching() -> None:
    spy = SpyRetriever(_store())
    out = FilterAwareRetriever(spy).run(query_embedding=[0.1] * DIM, filters=_bucket_below(-1))
    assert out["documents"] == []
    assert out["oversampling"] == {"selectivity": 0.0, "boost": 0.0, "retriever_top_k": 0, "mode": "empty"}
    assert spy.calls == []


def test_an_empty_store_returns_nothing_without_a_division_error() -> None:
    spy = SpyRetriever(InMemoryDocumentStore())
    out = FilterAwareRetriever(spy).run(query_embedding=[0.1] * DIM, filters=_bucket_below(3))
    assert out["documents"] == []
    assert out["oversampling"]["mode"] == "empty"


def test_without_filters_the_retriever_runs_unchanged() -> None:
    spy = SpyRetriever(_store())
    out = FilterAwareRetriever(spy, top_k=7).run(query_embedding=[0.1] * DIM)
    assert spy.calls == [7]
    assert out["oversampling"]["mode"] == "no_filter"
    assert len(out["documents"]) == 7


class _UncountableStore:
    def count_documents(self) -> int:
        return 1000

    def count_documents_by_filter(self, filters: dict) -> int:
        raise NotImplementedError("this store cannot count filters")


def test_a_store_that_cannot_count_falls_back_to_a_fixed_factor_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spy = SpyRetriever(_store())
    spy.document_store = _UncountableStore()
    retriever = FilterAwareRetriever(spy, top_k=10, fallback_factor=4)
    with caplog.at_level(logging.WARNING):
        first = retriever.run(query_embedding=[0.1] * DIM, filters=_bucket_below(50))
        retriever.clear_cache()
        retriever.run(query_embedding=[0.1] * DIM, filters=_bucket_below(50))
    assert spy.calls == [40, 40]
    assert first["oversampling"]["mode"] == "fallback"
    assert first["oversampling"]["selectivity"] is None
    warnings = [r for r in caplog.records if "cannot count the filter" in r.getMessage()]
    assert len(warnings) == 1
    assert "NotImplementedError" in warnings[0].getMessage()


def test_selectivity_is_counted_once_per_filter_while_cached() -> None:
    store = _store()
    counted: list[dict] = []
    original = store.count_documents_by_filter

    def counting(filters: dict) -> int:
        counted.append(filters)
        return original(filters)

    store.count_documents_by_filter = counting  # type: ignore[method-assign]
    retriever = FilterAwareRetriever(SpyRetriever(store), cache_ttl_s=3600)
    for _ in range(3):
        retriever.run(query_embedding=[0.1] * DIM, filters=_bucket_below(10))
    retriever.run(query_embedding=[0.1] * DIM, filters=_bucket_below(20))
    assert len(counted) == 2


def test_the_retrievers_own_filters_count_when_none_are_given_at_run_time() -> None:
    store = _store()
    inner = InMemoryEmbeddingRetriever(store, filters=_bucket_below(4))
    out = FilterAwareRetriever(inner, top_k=3).run(query_embedding=[0.1] * DIM)
    assert out["oversampling"]["selectivity"] == pytest.approx(0.04)
    assert all(d.meta["bucket"] < 4 for d in out["documents"])


def test_embedded_qdrant_counts_the_filter(tmp_path: Path) -> None:
    from haystack_integrations.components.retrievers.qdrant import QdrantEmbeddingRetriever
    from haystack_integrations.document_stores.qdrant import QdrantDocumentStore

    store = QdrantDocumentStore(path=str(tmp_path / "q"), embedding_dim=DIM, index="docs")
    try:
        rng = np.random.default_rng(1)
        store.write_documents(
            [
                Document(id=f"{i:032x}", embedding=rng.normal(size=DIM).tolist(), meta={"bucket": i % 10})
                for i in range(200)
            ]
        )
        retriever = FilterAwareRetriever(QdrantEmbeddingRetriever(document_store=store), top_k=4)
        out = retriever.run(query_embedding=[0.2] * DIM, filters={"field": "meta.bucket", "operator": "==", "value": 3})
        assert out["oversampling"]["selectivity"] == pytest.approx(0.1)
        assert out["oversampling"]["retriever_top_k"] == 60
        assert len(out["documents"]) == 4
        assert {d.meta["bucket"] for d in out["documents"]} == {3}
    finally:
        store.close()


def test_pipeline_yaml_round_trip_keeps_the_wrapped_retriever_and_settings() -> None:
    pipe = Pipeline()
    pipe.add_component("retriever", FilterAwareRetriever(InMemoryEmbeddingRetriever(_store(10)), top_k=3, max_top_k=77))
    restored = Pipeline.loads(pipe.dumps()).get_component("retriever")
    assert isinstance(restored, FilterAwareRetriever)
    assert isinstance(restored.retriever, InMemoryEmbeddingRetriever)
    assert (restored.top_k, restored.max_top_k) == (3, 77)
    assert restored.to_dict() == pipe.get_component("retriever").to_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k"),
        ({"max_top_k": -1}, "max_top_k"),
        ({"safety_factor": 0.5}, "safety_factor"),
        ({"fallback_factor": float("nan")}, "fallback_factor"),
        ({"cache_ttl_s": -1}, "cache_ttl_s"),
    ],
)
def test_invalid_parameters_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FilterAwareRetriever(InMemoryEmbeddingRetriever(InMemoryDocumentStore()), **kwargs)


def test_something_that_is_not_a_retriever_is_refused() -> None:
    with pytest.raises(TypeError, match="retriever"):
        FilterAwareRetriever(object())


def test_an_empty_filter_result_is_not_cached_so_new_documents_are_found_at_once() -> None:
    store = _store(100)
    retriever = FilterAwareRetriever(InMemoryEmbeddingRetriever(store), top_k=3, cache_ttl_s=3600)
    flt = {"field": "meta.bucket", "operator": "==", "value": 500}
    assert retriever.run(query_embedding=[0.1] * DIM, filters=flt)["oversampling"]["mode"] == "empty"
    store.write_documents([Document(id="new", embedding=[0.1] * DIM, meta={"bucket": 500})])
    out = retriever.run(query_embedding=[0.1] * DIM, filters=flt)
    assert [d.id for d in out["documents"]] == ["new"]


def test_filters_whose_values_print_alike_do_not_share_a_cache_entry() -> None:
    import datetime

    assert _filter_key_of({"value": "2020-01-01 00:00:00"}) != _filter_key_of({"value": datetime.datetime(2020, 1, 1)})


def _filter_key_of(filters: dict) -> str:
    from haystack_integrations.components.retrievers.oversampling.retriever import _filter_key

    return _filter_key(filters)


class _BrokenCountStore:
    def __init__(self, matched: float) -> None:
        self.matched = matched

    def count_documents(self) -> int:
        return 100

    def count_documents_by_filter(self, filters: dict) -> float:
        return self.matched


@pytest.mark.parametrize("matched", [float("nan"), -5])
def test_a_store_count_that_makes_no_sense_falls_back_to_the_fixed_factor(matched: float) -> None:
    spy = SpyRetriever(_store())
    spy.document_store = _BrokenCountStore(matched)
    retriever = FilterAwareRetriever(spy, top_k=10, fallback_factor=4)
    out = retriever.run(query_embedding=[0.1] * DIM, filters=_bucket_below(5))
    assert out["oversampling"]["mode"] == "fallback"
    assert spy.calls == [40]


@pytest.mark.parametrize("count", ["5", True, None, [5]])
def test_a_store_count_that_is_not_a_number_falls_back_to_the_fixed_factor(count: Any) -> None:
    spy = SpyRetriever(_store())
    spy.document_store = _BrokenCountStore(count)
    retriever = FilterAwareRetriever(spy, top_k=10, fallback_factor=4)
    out = retriever.run(query_embedding=[0.1] * DIM, filters=_bucket_below(5))
    assert out["oversampling"]["mode"] == "fallback"
    assert spy.calls == [40]


class _BrokenTotalStore(_BrokenCountStore):
    def count_documents(self) -> float:
        return float("nan")


def test_a_nan_total_falls_back_to_the_fixed_factor() -> None:
    spy = SpyRetriever(_store())
    spy.document_store = _BrokenTotalStore(5)
    retriever = FilterAwareRetriever(spy, top_k=10, fallback_factor=4)
    out = retriever.run(query_embedding=[0.1] * DIM, filters=_bucket_below(5))
    assert out["oversampling"]["mode"] == "fallback"


def test_a_top_k_above_max_top_k_wins_and_the_retriever_is_asked_for_exactly_top_k() -> None:
    spy = SpyRetriever(_store())
    retriever = FilterAwareRetriever(spy, top_k=10, max_top_k=50)
    out = retriever.run(query_embedding=[0.1] * DIM, filters=_bucket_below(1), top_k=80)
    assert spy.calls == [80]
    assert out["oversampling"]["retriever_top_k"] == 80
    assert out["oversampling"]["boost"] == pytest.approx(1.0)
    # Below max_top_k the boost is still capped by it.
    retriever.run(query_embedding=[0.1] * DIM, filters=_bucket_below(1), top_k=20)
    assert spy.calls[-1] == 50


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({1: "a", "b": 2}, "filter keys must be strings .* got 1 in"),
        ({"operator": "AND", "conditions": [{"field": "meta.bucket", "operator": "<", 5: 1}]}, "got 5 in"),
        ("meta.bucket < 5", "filters must be a mapping .* got a str: 'meta.bucket < 5'"),
        ([_bucket_below(5)], "filters must be a mapping .* got a list"),
    ],
)
def test_filters_that_cannot_be_keyed_are_refused_naming_the_filter(filters: Any, message: str) -> None:
    from haystack.errors import FilterError

    from haystack_integrations.common.multimodal_rag.errors import InvalidFiltersError

    spy = SpyRetriever(_store(10))
    with pytest.raises(InvalidFiltersError, match=message) as info:
        FilterAwareRetriever(spy).run(query_embedding=[0.1] * DIM, filters=filters)
    assert isinstance(info.value, FilterError)
    assert isinstance(info.value, ValueError)
    assert spy.calls == []


def test_a_filter_that_contains_itself_is_refused_and_a_shared_sub_filter_is_not() -> None:
    from haystack_integrations.common.multimodal_rag.errors import InvalidFiltersError

    circular: dict[str, Any] = {"operator": "AND", "conditions": []}
    circular["conditions"].append(circular)
    with pytest.raises(InvalidFiltersError, match="contain themselves"):
        FilterAwareRetriever(SpyRetriever(_store(10))).run(query_embedding=[0.1] * DIM, filters=circular)
    shared = _bucket_below(5)
    twice = {"operator": "OR", "conditions": [shared, shared]}
    out = FilterAwareRetriever(InMemoryEmbeddingRetriever(_store(100))).run(query_embedding=[0.1] * DIM, filters=twice)
    assert out["oversampling"]["selectivity"] == pytest.approx(0.05)


def test_an_invalid_operator_raises_the_stores_filter_error_without_a_fallback_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from haystack.errors import FilterError

    retriever = FilterAwareRetriever(InMemoryEmbeddingRetriever(_store(10)))
    with caplog.at_level(logging.WARNING), pytest.raises(FilterError):
        retriever.run(query_embedding=[0.1] * DIM, filters={"field": "meta.bucket", "operator": "~=", "value": 1})
    assert not [r for r in caplog.records if "cannot count the filter" in r.getMessage()]


def test_a_retriever_class_instead_of_an_instance_is_refused() -> None:
    with pytest.raises(TypeError, match="got the class InMemoryEmbeddingRetriever: pass InMemoryEmbeddingRetriever"):
        FilterAwareRetriever(InMemoryEmbeddingRetriever)


@component
class _BadOutputRetriever:
    def __init__(self, document_store: Any, output: Any) -> None:
        self.document_store = document_store
        self.output = output

    @component.output_types(documents=list[Document])
    def run(self, query_embedding: list[float], filters: dict | None = None, top_k: int = 10) -> Any:
        return self.output


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({}, r"returned \{\} \(no 'documents'\)"),
        ({"documents": None}, "returned 'documents' = None"),
        ({"documents": ["d1"]}, r"returned 'documents' = \['d1'\]"),
        (None, r"returned None \(no 'documents'\)"),
    ],
)
@pytest.mark.parametrize("filters", [None, _bucket_below(5)])
def test_a_retriever_that_returns_no_documents_list_is_a_clear_error_naming_it(
    output: Any, message: str, filters: dict | None
) -> None:
    from haystack_integrations.common.multimodal_rag.errors import ComponentOutputError

    retriever = FilterAwareRetriever(_BadOutputRetriever(_store(10), output))
    with pytest.raises(ComponentOutputError, match=f"wrapped retriever _BadOutputRetriever {message}"):
        retriever.run(query_embedding=[0.1] * DIM, filters=filters)
