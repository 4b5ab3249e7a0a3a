"""The indexing loop shared by the two document embedders (`inputs.indexing.IndexingRun`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from haystack import Document
from PIL import Image

from haystack_integrations.common.multimodal_rag.errors import DocumentProcessingError
from haystack_integrations.common.multimodal_rag.inputs.indexing import IndexingRun
from tests.helpers import image_bytes, make_corrupt_image, make_image


def _late_failing_jpeg(path: Path) -> Path:
    # A JPEG cut near its end passes Pillow's header and integrity check and fails only when decoded.
    data = image_bytes(size=(64, 64), color="green", fmt="JPEG")
    path.write_bytes(data[: int(len(data) * 0.9)])
    return path


@dataclass
class Probe:
    """The settings `IndexingRun.start` reads from an embedder."""

    on_error: str = "skip"
    file_path_meta_field: str = "file_path"
    root_path: str | None = None


def _start(documents: list[Document], on_error: str = "skip") -> IndexingRun:
    run = IndexingRun.start(Probe(on_error=on_error), documents)
    assert run is not None
    return run


def test_start_refuses_a_non_list_and_returns_none_for_no_documents() -> None:
    with pytest.raises(TypeError, match="Probe expects a list of Documents"):
        IndexingRun.start(Probe(on_error="raise"), "text")
    assert IndexingRun.start(Probe(on_error="raise"), []) is None


def test_start_names_repeated_ids_and_header_failures_but_decodes_nothing(tmp_path: Path) -> None:
    good = Document(id="a", meta={"file_path": str(make_image(tmp_path / "a.png"))})
    twin = Document(id="a", content="same id")
    broken = Document(id="b", meta={"file_path": str(make_corrupt_image(tmp_path / "b.png"))})
    late = Document(id="c", meta={"file_path": str(_late_failing_jpeg(tmp_path / "c.jpg"))})
    run = _start([good, twin, broken, late])
    assert sorted(run.failures) == [1, 2]
    assert "duplicate document id" in run.failures[1]
    assert run.plan.visual_indices() == [0, 3]
    assert run.plan.indices("text") == []  # the repeated id is not embedded either


def test_raise_if_failed_names_every_failure_only_with_on_error_raise(tmp_path: Path) -> None:
    docs = [Document(id="x", content="one"), Document(id="x", content="two")]
    _start(docs, on_error="skip").raise_if_failed()
    with pytest.raises(DocumentProcessingError, match="duplicate document id") as info:
        _start(docs, on_error="raise").raise_if_failed()
    assert [doc_id for doc_id, _ in info.value.failures] == ["x"]


def test_embed_image_batches_collects_decode_and_embed_failures_and_closes_every_image(tmp_path: Path) -> None:
    docs = [Document(id=f"d{i}", meta={"file_path": str(make_image(tmp_path / f"{i}.png"))}) for i in range(3)]
    docs.append(Document(id="late", meta={"file_path": str(_late_failing_jpeg(tmp_path / "late.jpg"))}))
    run = _start(docs)
    seen: list[tuple[list[int], dict[int, str]]] = []
    images_seen: list[Image.Image] = []

    def embed(
        positions: list[int], images: list[Image.Image], failed: dict[int, str], prepared: None
    ) -> dict[int, str]:
        assert prepared is None  # no `prepare` given
        assert all(i in run.failures for i in failed)  # decode failures are known before embed runs
        seen.append((positions, dict(failed)))
        images_seen.extend(images)
        return {positions[0]: "refused by the model"} if positions and positions[0] == 2 else {}

    run.embed_image_batches(run.plan.visual_indices(), 2, embed)
    assert [positions for positions, _ in seen] == [[0, 1], [2]]
    assert list(seen[1][1]) == [3]
    assert sorted(run.failures) == [2, 3]
    assert run.failures[2] == "refused by the model"
    assert len(images_seen) == 3
    for image in images_seen:
        with pytest.raises(ValueError, match="closed"):
            image.load()

    out = run.outputs(lambda i, doc: doc)
    assert [d.id for d in out["documents"]] == ["d0", "d1"]
    assert [d.id for d in out["failed_documents"]] == ["d2", "late"]
    assert out["failed_documents"][0].meta["embedding_error"] == "refused by the model"


def test_embed_image_batches_closes_the_batch_when_embed_raises(tmp_path: Path) -> None:
    docs = [Document(id=f"d{i}", meta={"file_path": str(make_image(tmp_path / f"{i}.png"))}) for i in range(2)]
    run = _start(docs)
    held: list[Image.Image] = []

    def embed(
        positions: list[int], images: list[Image.Image], failed: dict[int, str], prepared: None
    ) -> dict[int, str]:
        held.extend(images)
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        run.embed_image_batches(run.plan.visual_indices(), 2, embed)
    assert len(held) == 2
    for image in held:
        with pytest.raises(ValueError, match="closed"):
            image.load()


def test_prepare_runs_in_the_background_and_its_result_reaches_embed(tmp_path: Path) -> None:
    import threading

    docs = [Document(id=f"d{i}", meta={"file_path": str(make_image(tmp_path / f"{i}.png"))}) for i in range(5)]
    run = _start(docs)
    prepared_in: list[str] = []
    received: list[tuple[list[int], object]] = []

    def prepare(positions: list[int], images: list[Image.Image]) -> tuple[list[int], list[tuple[int, int]]]:
        prepared_in.append(threading.current_thread().name)
        return list(positions), [image.size for image in images]  # reads the pixels' metadata while they are open

    def embed(
        positions: list[int], images: list[Image.Image], failed: dict[int, str], prepared: object
    ) -> dict[int, str]:
        received.append((positions, prepared))
        return {}

    run.embed_image_batches(run.plan.visual_indices(), 2, embed, prepare=prepare)
    assert [positions for positions, _ in received] == [[0, 1], [2, 3], [4]]
    for positions, prepared in received:
        assert prepared == (positions, [(48, 40)] * len(positions))
    assert prepared_in
    assert all(name != threading.current_thread().name for name in prepared_in)


def test_a_failing_prepare_surfaces_in_the_caller_and_closes_its_batch(tmp_path: Path) -> None:
    docs = [Document(id=f"d{i}", meta={"file_path": str(make_image(tmp_path / f"{i}.png"))}) for i in range(2)]
    run = _start(docs)
    held: list[Image.Image] = []

    def prepare(positions: list[int], images: list[Image.Image]) -> None:
        held.extend(images)
        raise RuntimeError("processor crashed")

    with pytest.raises(RuntimeError, match="processor crashed"):
        run.embed_image_batches(run.plan.visual_indices(), 2, lambda *a: {}, prepare=prepare)
    assert len(held) == 2
    for image in held:
        with pytest.raises(ValueError, match="closed"):
            image.load()
