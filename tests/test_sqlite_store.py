from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from haystack import Document, Pipeline

from haystack_integrations.common.multimodal_rag.errors import MultiVectorStoreError
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore, SQLiteMultiVectorStore
from haystack_integrations.testing.multimodal_rag.tiny_colpali import build_tiny_colqwen
from tests.helpers import COLORS, make_image, make_pdf


def test_values_round_trip_exactly_in_float16(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = SQLiteMultiVectorStore(str(tmp_path / "mv.sqlite"))
    half = rng.standard_normal((37, 128)).astype(np.float16)
    full = rng.standard_normal((5, 128)).astype(np.float32)
    as_lists = rng.standard_normal((3, 128)).tolist()
    assert store.write({"half": half, "full": full, "lists": as_lists}) == 3
    got = store.get(["lists", "half", "missing", "full"])
    assert list(got) == ["lists", "half", "full"]
    np.testing.assert_array_equal(got["half"], half)
    np.testing.assert_array_equal(got["full"], full.astype(np.float16))
    np.testing.assert_array_equal(got["lists"], np.asarray(as_lists, dtype=np.float16))
    assert got["half"].dtype == np.float16
    assert not got["half"].flags.writeable  # a view of the fetched blob, not a copy


def test_float32_store_keeps_float32(tmp_path: Path) -> None:
    store = SQLiteMultiVectorStore(str(tmp_path / "mv.sqlite"), dim=4, dtype="float32")
    value = np.array([[0.1, 0.2, 0.3, 1e-8]], dtype=np.float32)
    store.write({"a": value})
    np.testing.assert_array_equal(store.get(["a"])["a"], value)


def test_persists_across_reopen_and_replaces_and_deletes(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "mv.sqlite")
    store = SQLiteMultiVectorStore(path)
    store.write({f"d{i}": np.full((i + 1, 128), i, dtype=np.float16) for i in range(10)})
    store.write({"d3": np.ones((2, 128))})
    store.delete(["d9", "never"])
    store.close()
    reopened = SQLiteMultiVectorStore(path)
    assert reopened.count() == 9
    assert reopened.get(["d3"])["d3"].shape == (2, 128)
    assert float(reopened.get(["d5"])["d5"][0, 0]) == 5.0
    info = reopened.info()
    assert info["dim"] == "128"
    assert info["dtype"] == "float16"
    assert info["count"] == 9


def test_dim_dtype_and_model_mismatches_are_clear_errors(tmp_path: Path) -> None:
    path = str(tmp_path / "mv.sqlite")
    store = SQLiteMultiVectorStore(path, model="org/model-a")
    with pytest.raises(MultiVectorStoreError, match="width 64, but the store holds dim 128"):
        store.write({"x": np.ones((3, 64))})
    store.write({"ok": np.ones((1, 128))})
    store.close()
    with pytest.raises(MultiVectorStoreError, match="created with dim 128, but was opened with dim=64"):
        SQLiteMultiVectorStore(path, dim=64).warm_up()
    with pytest.raises(MultiVectorStoreError, match="created with dtype float16"):
        SQLiteMultiVectorStore(path, dtype="float32").warm_up()
    with pytest.raises(MultiVectorStoreError, match=r"'org/model-a'.*'org/model-b'"):
        SQLiteMultiVectorStore(path, model="org/model-b").warm_up()
    unbound = SQLiteMultiVectorStore(path)
    assert unbound.stored_model == "org/model-a"
    with pytest.raises(MultiVectorStoreError, match=r"'org/model-a'.*'org/model-c'"):
        unbound.bind_model("org/model-c")
    unbound.bind_model("org/model-a")


def test_model_is_recorded_on_first_bind(tmp_path: Path) -> None:
    path = str(tmp_path / "mv.sqlite")
    SQLiteMultiVectorStore(path).bind_model("org/first")
    assert SQLiteMultiVectorStore(path).stored_model == "org/first"


def test_no_file_is_created_until_the_store_is_used(tmp_path: Path) -> None:
    path = tmp_path / "later" / "mv.sqlite"
    store = SQLiteMultiVectorStore(str(path))
    assert not path.exists()
    assert store.count() == 0
    assert path.exists()


def test_a_file_that_is_not_a_store_names_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(os.urandom(8192))
    with pytest.raises(MultiVectorStoreError, match=r"garbage\.sqlite.*not a multi-vector store"):
        SQLiteMultiVectorStore(str(garbage)).warm_up()
    import sqlite3

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
    with pytest.raises(MultiVectorStoreError, match=r"other\.sqlite.*not a multi-vector store"):
        SQLiteMultiVectorStore(str(other)).warm_up()


def test_read_only_store(tmp_path: Path) -> None:
    path = str(tmp_path / "mv.sqlite")
    with pytest.raises(MultiVectorStoreError, match="does not exist"):
        SQLiteMultiVectorStore(path, read_only=True).warm_up()
    SQLiteMultiVectorStore(path).write({"a": np.ones((2, 128))})
    reader = SQLiteMultiVectorStore(path, read_only=True)
    assert reader.count() == 1
    with pytest.raises(MultiVectorStoreError, match="read_only"):
        reader.write({"b": np.ones((2, 128))})


def test_a_write_is_all_or_nothing(tmp_path: Path) -> None:
    store = SQLiteMultiVectorStore(str(tmp_path / "mv.sqlite"), dim=8)
    store.write({"keep": np.ones((2, 8))})
    with pytest.raises(MultiVectorStoreError, match="'bad'"):
        store.write({"new": np.ones((2, 8)), "bad": np.full((2, 8), np.nan)})
    assert store.count() == 1


_KILL_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from haystack_integrations.document_stores.multivector import SQLiteMultiVectorStore

    store = SQLiteMultiVectorStore(sys.argv[1])
    store.write({f"early-{i}": np.full((64, 128), i, dtype=np.float16) for i in range(20)})
    big = {f"late-{i}": np.full((1030, 128), 1.0, dtype=np.float16) for i in range(3000)}
    print("WRITING", flush=True)
    store.write(big)
    print("DONE", flush=True)
    """
)


def test_a_process_killed_during_a_write_leaves_earlier_writes_intact(tmp_path: Path) -> None:
    path = tmp_path / "mv.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(path)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "WRITING"
    wal = Path(str(path) + "-wal")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not wal.exists() or wal.stat().st_size < 20_000_000):
        time.sleep(0.01)
    assert child.poll() is None, "the big write finished before it could be interrupted"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    store = SQLiteMultiVectorStore(str(path))
    assert store.count() == 20
    got = store.get([f"early-{i}" for i in range(20)])
    assert all(float(got[f"early-{i}"][0, 0]) == i for i in range(20))
    assert store.get(["late-0"]) == {}
    store.write({"after": np.ones((1, 128))})
    assert store.count() == 21


def test_readers_in_eight_threads_see_only_complete_vectors_while_one_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "mv.sqlite")
    store = SQLiteMultiVectorStore(path, dim=16)
    ids = [f"p{i}" for i in range(20)]
    store.write({doc_id: np.zeros((10, 16)) for doc_id in ids})
    stop = threading.Event()
    errors: list[str] = []
    reads = [0] * 8

    def writer() -> None:
        for version in range(1, 60):
            n = 10 + version % 7
            store.write({doc_id: np.full((n, 16), version, dtype=np.float16) for doc_id in ids})
        stop.set()

    def reader(slot: int) -> None:
        while not stop.is_set():
            for doc_id, array in store.get(ids).items():
                values = np.unique(array)
                if array.shape[1] != 16 or len(values) != 1:
                    errors.append(f"{doc_id}: shape {array.shape}, values {values[:5]}")
            reads[slot] += 1

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    writer()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert all(r > 0 for r in reads)
    assert {float(a[0, 0]) for a in store.get(ids).values()} == {59.0}


# --- with the ColPali components ---------------------------------------------------------------------


@pytest.fixture
def page_docs(tmp_path: Path) -> list[Document]:
    docs = []
    for i, color in enumerate(COLORS[:4]):
        make_image(tmp_path / f"p{i}.png", size=(56 + 14 * i, 56), color=color)
        docs.append(Document(meta={"file_path": str(tmp_path / f"p{i}.png")}, score=0.1 * i))
    make_pdf(tmp_path / "deck.pdf", pages=2, size=(80, 60))
    docs += [Document(meta={"file_path": str(tmp_path / "deck.pdf"), "page_number": p}, score=0.2) for p in (1, 2)]
    return docs


def test_ranker_over_sqlite_ranks_like_in_memory(tiny_colqwen2: str, page_docs: list[Document], tmp_path: Path) -> None:
    sqlite_store = SQLiteMultiVectorStore(str(tmp_path / "mv.sqlite"))
    memory_store = InMemoryMultiVectorStore()
    for store in (sqlite_store, memory_store):
        ColPaliDocumentEmbedder(tiny_colqwen2, multivector_store=store, progress_bar=False).run(page_docs)
    assert sqlite_store.stored_model == tiny_colqwen2
    a = ColPaliRanker(tiny_colqwen2, multivector_store=sqlite_store, top_k=10).run(query="revenue", documents=page_docs)
    b = ColPaliRanker(tiny_colqwen2, multivector_store=memory_store, top_k=10).run(query="revenue", documents=page_docs)
    assert [d.id for d in a["documents"]] == [d.id for d in b["documents"]]
    assert [d.score for d in a["documents"]] == [d.score for d in b["documents"]]


def test_components_refuse_a_store_of_another_model_naming_both(
    tiny_colqwen2: str, tiny_colqwen2_5: str, page_docs: list[Document], tmp_path: Path
) -> None:
    path = str(tmp_path / "mv.sqlite")
    ColPaliDocumentEmbedder(tiny_colqwen2, multivector_store=SQLiteMultiVectorStore(path), progress_bar=False).run(
        page_docs[:1]
    )
    for component in (
        ColPaliDocumentEmbedder(tiny_colqwen2_5, multivector_store=SQLiteMultiVectorStore(path)),
        ColPaliRanker(tiny_colqwen2_5, multivector_store=SQLiteMultiVectorStore(path)),
    ):
        with pytest.raises(MultiVectorStoreError) as info:
            component.warm_up()
        assert tiny_colqwen2 in str(info.value)
        assert tiny_colqwen2_5 in str(info.value)


def test_yaml_round_trip_of_a_pipeline_holding_the_sqlite_store(
    tiny_colqwen2: str, page_docs: list[Document], tmp_path: Path
) -> None:
    path = str(tmp_path / "index" / "multivectors.sqlite")
    store = SQLiteMultiVectorStore(path)
    ColPaliDocumentEmbedder(tiny_colqwen2, multivector_store=store, progress_bar=False).run(page_docs)
    pipe = Pipeline()
    pipe.add_component("ranker", ColPaliRanker(tiny_colqwen2, multivector_store=store, top_k=3))
    before = pipe.run({"ranker": {"query": "a chart", "documents": page_docs}})
    yaml_text = pipe.dumps()
    assert "SQLiteMultiVectorStore" in yaml_text
    assert path in yaml_text
    restored = Pipeline.loads(yaml_text)
    restored_store = restored.get_component("ranker").multivector_store
    assert isinstance(restored_store, SQLiteMultiVectorStore)
    assert restored_store is not store
    assert restored_store.count() == len(page_docs)
    after = restored.run({"ranker": {"query": "a chart", "documents": page_docs}})
    assert [d.id for d in after["ranker"]["documents"]] == [d.id for d in before["ranker"]["documents"]]


# --- the model is identified by its content, not its path (issue 12 item 12) ---------------------------


@pytest.fixture
def own_colqwen(tmp_path: Path) -> str:
    """A tiny ColQwen2.5 checkpoint in this test's folder, so the test may move it."""
    return str(build_tiny_colqwen(tmp_path / "models" / "colqwen", version="2.5", seed=0))


def _rank(model: str, path: str, docs: list[Document]) -> list[tuple[str, float | None]]:
    ranker = ColPaliRanker(model, multivector_store=SQLiteMultiVectorStore(path), top_k=10)
    return [(d.id, d.score) for d in ranker.run(query="revenue", documents=docs)["documents"]]


def test_a_moved_or_copied_model_folder_still_fits_its_index(
    own_colqwen: str, page_docs: list[Document], tmp_path: Path
) -> None:
    path = str(tmp_path / "index" / "mv.sqlite")
    store = SQLiteMultiVectorStore(path)
    ColPaliDocumentEmbedder(own_colqwen, multivector_store=store, progress_bar=False).run(page_docs)
    assert store.stored_model == own_colqwen
    assert store.stored_model_fingerprint is not None
    assert store.stored_model_fingerprint.startswith("sha256:")
    before = _rank(own_colqwen, path, page_docs)
    assert all(score is not None for _, score in before)

    copied = shutil.copytree(own_colqwen, tmp_path / "copy" / "colqwen")
    moved = shutil.move(own_colqwen, tmp_path / "moved")
    for model in (str(moved), str(copied)):
        # The file, reopened by a fresh store (also with the model given to the store), ranks with the new path.
        SQLiteMultiVectorStore(path, model=model)
        assert _rank(model, path, page_docs) == before
        out = ColPaliDocumentEmbedder(model, multivector_store=SQLiteMultiVectorStore(path), progress_bar=False).run(
            page_docs[:1]
        )
        assert out["failed_documents"] == []
    assert SQLiteMultiVectorStore(path).stored_model == own_colqwen  # the first record is kept


def test_a_different_checkpoint_of_the_same_architecture_is_refused_naming_both(
    own_colqwen: str, page_docs: list[Document], tmp_path: Path
) -> None:
    other = str(build_tiny_colqwen(tmp_path / "models" / "other-seed", version="2.5", seed=1))
    path = str(tmp_path / "mv.sqlite")
    ColPaliDocumentEmbedder(own_colqwen, multivector_store=SQLiteMultiVectorStore(path), progress_bar=False).run(
        page_docs[:1]
    )
    for component in (
        ColPaliDocumentEmbedder(other, multivector_store=SQLiteMultiVectorStore(path)),
        ColPaliRanker(other, multivector_store=SQLiteMultiVectorStore(path)),
    ):
        with pytest.raises(MultiVectorStoreError, match="different checkpoint") as info:
            component.warm_up()
        assert f"'{own_colqwen}'" in str(info.value)
        assert f"'{other}'" in str(info.value)
    with pytest.raises(MultiVectorStoreError, match="different checkpoint") as info:
        SQLiteMultiVectorStore(path, model=other).warm_up()
    assert f"'{own_colqwen}'" in str(info.value)
    assert f"'{other}'" in str(info.value)


def test_a_file_that_recorded_only_the_model_id_still_opens_and_is_upgraded(
    own_colqwen: str, page_docs: list[Document], tmp_path: Path
) -> None:
    path = str(tmp_path / "mv.sqlite")
    ColPaliDocumentEmbedder(own_colqwen, multivector_store=SQLiteMultiVectorStore(path), progress_bar=False).run(
        page_docs
    )
    before = _rank(own_colqwen, path, page_docs)
    # What files written before fingerprints were recorded hold: the model id only.
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM mv_meta WHERE key='model_fingerprint'")
    old = SQLiteMultiVectorStore(path)
    assert old.stored_model == own_colqwen
    assert old.stored_model_fingerprint is None
    old.close()
    moved = str(shutil.move(own_colqwen, tmp_path / "moved"))
    # Not upgraded yet: only ids can be compared, and the message says why.
    with pytest.raises(MultiVectorStoreError, match="no content fingerprint"):
        ColPaliRanker(moved, multivector_store=SQLiteMultiVectorStore(path)).warm_up()
    shutil.move(moved, own_colqwen)
    assert _rank(own_colqwen, path, page_docs) == before  # the first bind with the recorded id upgrades the file
    upgraded = SQLiteMultiVectorStore(path)
    assert upgraded.stored_model_fingerprint is not None
    assert upgraded.info()["model_fingerprint"] == upgraded.stored_model_fingerprint
    moved = str(shutil.move(own_colqwen, tmp_path / "moved"))
    assert _rank(moved, path, page_docs) == before


def test_an_adapter_checkpoint_is_identified_by_its_own_weights_and_its_base_by_content(
    own_colqwen: str, page_docs: list[Document], tmp_path: Path
) -> None:
    # vidore/colqwen2.5-v0.2 is a LoRA adapter (adapter_config.json + adapter weights) naming its base by id.
    from haystack_integrations.testing.multimodal_rag.tiny_colpali import build_tiny_colpali_adapter

    adapter = str(build_tiny_colpali_adapter(tmp_path / "models" / "adapter", own_colqwen, seed=1))
    other = str(build_tiny_colpali_adapter(tmp_path / "models" / "adapter-seed2", own_colqwen, seed=2))
    path = str(tmp_path / "mv.sqlite")
    ColPaliDocumentEmbedder(adapter, multivector_store=SQLiteMultiVectorStore(path), progress_bar=False).run(page_docs)
    before = _rank(adapter, path, page_docs)

    with pytest.raises(MultiVectorStoreError, match="different checkpoint") as info:
        ColPaliRanker(other, multivector_store=SQLiteMultiVectorStore(path)).warm_up()
    assert f"'{adapter}'" in str(info.value)
    assert f"'{other}'" in str(info.value)

    # Move the base and the adapter, and point the adapter at the base's new place: still the same model.
    base = shutil.move(own_colqwen, tmp_path / "moved" / "base")
    moved = tmp_path / "moved" / "adapter"
    shutil.move(adapter, moved)
    config_file = moved / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(config, indent=2))
    assert _rank(str(moved), path, page_docs) == before


def test_constructing_a_store_touches_no_file_and_checks_it_at_warm_up(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not sqlite" * 100)
    before = garbage.stat().st_mtime_ns
    store = SQLiteMultiVectorStore(str(garbage))  # e.g. Pipeline.loads of a YAML naming it: nothing is read
    assert garbage.stat().st_mtime_ns == before
    with pytest.raises(MultiVectorStoreError, match="not a multi-vector store"):
        store.warm_up()
    missing = tmp_path / "sub" / "new.sqlite"
    SQLiteMultiVectorStore(str(missing))
    assert not missing.parent.exists()


@pytest.mark.parametrize("path", [":memory:", "file::memory:?cache=shared"])
def test_an_in_memory_sqlite_path_is_refused_naming_the_in_memory_store(path: str) -> None:
    with pytest.raises(MultiVectorStoreError, match="InMemoryMultiVectorStore"):
        SQLiteMultiVectorStore(path)


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_sqlite_path_is_refused_as_an_empty_path(path: str) -> None:
    with pytest.raises(MultiVectorStoreError, match="needs a file path, got an empty path"):
        SQLiteMultiVectorStore(path)
