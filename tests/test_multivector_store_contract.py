"""The multi-vector store contract, run against every store: in-memory, SQLite and embedded (local) Qdrant."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from haystack_integrations.common.multimodal_rag.errors import MultiVectorStoreError
from haystack_integrations.document_stores.multivector import (
    InMemoryMultiVectorStore,
    MultiVectorStore,
    QdrantMultiVectorStore,
    SQLiteMultiVectorStore,
)
from haystack_integrations.testing.multimodal_rag.reference import maxsim_reference

DIM = 16
KINDS = ["in_memory", "sqlite", "qdrant_local"]


def _factory(kind: str, tmp_path: Path) -> Callable[..., Any]:
    """A function that opens (or reopens) the same store of `kind`."""
    if kind == "in_memory":
        index = f"contract-{tmp_path.name}"
        return lambda **kw: InMemoryMultiVectorStore(index=index, **kw)
    if kind == "sqlite":
        return lambda **kw: SQLiteMultiVectorStore(str(tmp_path / "mv.sqlite"), dim=DIM, **kw)
    return lambda **kw: QdrantMultiVectorStore(path=str(tmp_path / "qdrant"), dim=DIM, **kw)


@pytest.fixture(params=KINDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    opened: list[Any] = []
    make = _factory(request.param, tmp_path)

    def factory(**kwargs: Any) -> Any:
        store = make(**kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()
    if request.param == "in_memory":
        InMemoryMultiVectorStore(index=f"contract-{tmp_path.name}").clear()


def _pages(rng: np.random.Generator, lengths: list[int]) -> dict[str, np.ndarray]:
    return {f"doc-{i}": rng.standard_normal((n, DIM)).astype(np.float32) for i, n in enumerate(lengths)}


def test_every_store_implements_the_protocol(open_store: Callable[..., Any]) -> None:
    store = open_store()
    assert isinstance(store, MultiVectorStore)
    assert store.dtype == "float16"


def test_write_get_replace_delete_and_count(open_store: Callable[..., Any]) -> None:
    store = open_store()
    rng = np.random.default_rng(0)
    pages = _pages(rng, [3, 9, 1, 30])
    assert store.write(pages) == 4
    assert store.count() == 4
    assert store.dim == DIM
    got = store.get(["doc-3", "missing", "doc-0"])
    assert set(got) == {"doc-0", "doc-3"}
    np.testing.assert_allclose(got["doc-3"], pages["doc-3"].astype(np.float16).astype(np.float32), rtol=1e-3)
    store.write({"doc-0": np.ones((2, DIM))})
    assert store.count() == 4
    assert store.get(["doc-0"])["doc-0"].shape == (2, DIM)
    store.delete(["doc-1", "never-there"])
    assert store.count() == 3
    assert store.get(["doc-1"]) == {}


def test_score_is_raw_maxsim_of_the_stored_vectors_and_skips_ids_without_vectors(
    open_store: Callable[..., Any],
) -> None:
    store = open_store()
    rng = np.random.default_rng(1)
    store.write(_pages(rng, [4, 17, 1, 64, 5]))
    query = rng.standard_normal((6, DIM)).astype(np.float32)
    ids = ["doc-4", "unknown", "doc-0", "doc-3", "doc-1", "doc-2"]
    scores = store.score(query, ids)
    assert set(scores) == {"doc-0", "doc-1", "doc-2", "doc-3", "doc-4"}
    stored = store.get(list(scores))
    expected = maxsim_reference(query, [stored[doc_id] for doc_id in scores])
    np.testing.assert_allclose(list(scores.values()), expected, rtol=2e-3, atol=2e-3)
    # Negative scores exist (random vectors), so a zero padding row winning a max would show here.
    assert store.score(query, []) == {}
    assert store.score(query, ["unknown"]) == {}
    assert store.score(query.tolist(), ["doc-2"]) == pytest.approx({"doc-2": scores["doc-2"]}, rel=1e-5)


def test_score_refuses_a_query_of_another_width_or_not_finite(open_store: Callable[..., Any]) -> None:
    store = open_store()
    store.write({"p": np.ones((3, DIM))})
    with pytest.raises(MultiVectorStoreError, match=f"width {DIM + 1}.*dim {DIM}"):
        store.score(np.ones((2, DIM + 1)), ["p"])
    bad = np.ones((2, DIM))
    bad[1, 3] = np.nan
    with pytest.raises(MultiVectorStoreError, match="NaN or infinite"):
        store.score(bad, ["p"])
    with pytest.raises(MultiVectorStoreError, match="non-empty 2-D"):
        store.score(np.ones(DIM), ["p"])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf, 1e6])  # 1e6 overflows float16 to inf
def test_non_finite_vectors_are_refused_naming_the_document_and_nothing_is_written(
    open_store: Callable[..., Any], bad_value: float
) -> None:
    store = open_store()
    good = np.ones((2, DIM))
    bad = np.ones((4, DIM))
    bad[2, 5] = bad_value
    with pytest.raises(MultiVectorStoreError, match=r"document 'page-bad'.*NaN or infinite"):
        store.write({"page-ok": good, "page-bad": bad})
    assert store.count() == 0


def test_pool_factor_is_recorded_once_and_survives_reopening(open_store: Callable[..., Any]) -> None:
    store = open_store()
    assert store.pool_factor is None
    store.bind_pool_factor(3)
    store.bind_pool_factor(3)
    assert store.pool_factor == 3
    with pytest.raises(MultiVectorStoreError, match=r"pool_factor 3.*pool_factor 2"):
        store.bind_pool_factor(2)
    store.close()
    reopened = open_store()
    assert reopened.pool_factor == 3


def test_model_binding_refuses_another_model(open_store: Callable[..., Any]) -> None:
    store = open_store()
    store.bind_model("org/a")
    with pytest.raises(MultiVectorStoreError, match=r"'org/a'.*'org/b'"):
        store.bind_model("org/b")


FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64


def test_model_binding_compares_content_fingerprints_and_survives_reopening(
    open_store: Callable[..., Any],
) -> None:
    store = open_store()
    store.bind_model("/models/colqwen", fingerprint=FP_A)
    # The same checkpoint under another path, or by its Hub id: accepted.
    store.bind_model("/elsewhere/colqwen-copy", fingerprint=FP_A)
    store.bind_model("vidore/colqwen2.5-v0.2", fingerprint=FP_A)
    # Another checkpoint, even under the recorded id: refused, naming both ids.
    with pytest.raises(MultiVectorStoreError, match=r"'/models/colqwen'.*'/models/colqwen'.*different checkpoint"):
        store.bind_model("/models/colqwen", fingerprint=FP_B)
    with pytest.raises(MultiVectorStoreError, match=r"'/models/colqwen'.*'org/other'"):
        store.bind_model("org/other", fingerprint=FP_B)
    store.close()
    reopened = open_store()
    reopened.bind_model("/moved/colqwen", fingerprint=FP_A)
    with pytest.raises(MultiVectorStoreError, match=r"'/models/colqwen'.*'/moved/colqwen'"):
        reopened.bind_model("/moved/colqwen", fingerprint=FP_B)
    # A component that could not fingerprint its model (files unreadable) is compared by id.
    reopened.bind_model("/models/colqwen", fingerprint="id:/models/colqwen")
    with pytest.raises(MultiVectorStoreError, match=r"'/models/colqwen'.*'/moved/colqwen'"):
        reopened.bind_model("/moved/colqwen", fingerprint="id:/moved/colqwen")


def test_a_store_bound_by_id_only_compares_ids_and_is_upgraded_on_first_fingerprinted_bind(
    open_store: Callable[..., Any],
) -> None:
    store = open_store()
    store.bind_model("org/a")  # how stores were bound before fingerprints were recorded
    with pytest.raises(MultiVectorStoreError, match=r"'org/a'.*'/moved/a'.*no content fingerprint"):
        store.bind_model("/moved/a", fingerprint=FP_A)
    store.bind_model("org/a", fingerprint=FP_A)  # same id: accepted, and the fingerprint recorded
    store.close()
    reopened = open_store()
    reopened.bind_model("/moved/a", fingerprint=FP_A)
    with pytest.raises(MultiVectorStoreError, match=r"'org/a'.*'org/a'.*different checkpoint"):
        reopened.bind_model("org/a", fingerprint=FP_B)


def test_only_content_fingerprints_are_recorded(open_store: Callable[..., Any]) -> None:
    store = open_store()
    store.bind_model("org/a", fingerprint="id:org/a")
    store.bind_model("org/a", fingerprint=FP_A)
    store.close()
    reopened = open_store()
    reopened.bind_model("/copy/of/a", fingerprint=FP_A)


def test_close_releases_and_the_store_reopens_on_next_use(open_store: Callable[..., Any]) -> None:
    store = open_store()
    store.write({"p": np.ones((3, DIM))})
    store.close()
    assert store.count() == 1
    assert set(store.score(np.ones((1, DIM)), ["p"])) == {"p"}


def test_settings_round_trip_with_one_dtype_spelling(open_store: Callable[..., Any]) -> None:
    store = open_store(dtype="float32")
    data = store.to_dict()
    assert data["init_parameters"]["dtype"] == "float32"
    assert "datatype" not in data["init_parameters"]
    store.close()
    restored = type(store).from_dict(data)
    assert restored.to_dict() == data
    assert restored.dtype == "float32"
    value = np.full((2, DIM), 0.1, dtype=np.float32)
    restored.write({"x": value})
    got = restored.get(["x"])["x"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, value)
    restored.close()


def test_qdrant_accepts_the_old_datatype_name_for_one_release_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="datatype"):
        store = QdrantMultiVectorStore(location=":memory:", datatype="float32")
    assert store.dtype == "float32"
    legacy = {
        "type": "haystack_integrations.document_stores.multivector.qdrant.QdrantMultiVectorStore",
        "init_parameters": {"path": str(tmp_path / "q"), "dim": 128, "datatype": "float32"},
    }
    with pytest.warns(DeprecationWarning, match="datatype"):
        restored = QdrantMultiVectorStore.from_dict(legacy)
    assert restored.dtype == "float32"
    assert "datatype" not in restored.to_dict()["init_parameters"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match="give dtype"):
            QdrantMultiVectorStore(location=":memory:", dtype="float32", datatype="float16")


def test_every_store_accepts_a_scoring_device(open_store: Callable[..., Any]) -> None:
    store = open_store()
    rng = np.random.default_rng(7)
    store.write(_pages(rng, [5, 40, 2, 300]))
    query = rng.standard_normal((8, DIM)).astype(np.float32)
    ids = [f"doc-{i}" for i in range(4)]
    default = store.score(query, ids)
    on_cpu = store.score(query, ids, device="cpu")
    assert list(default) == list(on_cpu)
    np.testing.assert_allclose(list(on_cpu.values()), list(default.values()), rtol=1e-5, atol=1e-5)


def test_a_store_with_the_older_bind_model_signature_still_binds_by_id() -> None:
    from haystack_integrations.document_stores.multivector.protocol import check_model_binding, check_store_compatible

    class OlderStore:
        dim = DIM

        def __init__(self) -> None:
            self.model: str | None = None

        def bind_model(self, model: str) -> None:
            check_model_binding("older store", self.model, model)
            self.model = model

    store = OlderStore()
    check_store_compatible(store, dim=DIM, model="org/a", component="C", fingerprint=FP_A)
    assert store.model == "org/a"
    with pytest.raises(MultiVectorStoreError, match=r"C: older store.*'org/a'.*'org/b'"):
        check_store_compatible(store, dim=DIM, model="org/b", component="C", fingerprint=FP_A)


@pytest.mark.parametrize("kind", ["in_memory", "sqlite"])
def test_the_revision_changes_with_every_write_and_delete_and_only_then(kind: str, tmp_path: Path) -> None:
    # The GPU page cache trusts it: a page re-indexed by anyone (this instance, another instance on the same
    # index or file) must change the value seen before the next query.
    make = _factory(kind, tmp_path)
    store, other = make(), make()
    rng = np.random.default_rng(0)
    store.write(_pages(rng, [3, 4]))
    seen = store.revision()
    store.get(["doc-0"])
    store.score(rng.standard_normal((2, DIM)), ["doc-0", "doc-1"])
    store.count()
    assert store.revision() == seen  # reads change nothing
    changes: list[Callable[[], Any]] = [
        lambda: store.write({"doc-0": rng.standard_normal((3, DIM))}),  # this instance
        lambda: other.write({"doc-1": rng.standard_normal((5, DIM))}),  # another instance / connection
        lambda: other.delete(["doc-1"]),
        lambda: store.delete(["doc-0"]),
    ]
    for change in changes:
        change()
        now = store.revision()
        assert now != seen
        seen = now
    store.close()
    other.close()
    if kind == "in_memory":
        InMemoryMultiVectorStore(index=f"contract-{tmp_path.name}").clear()
