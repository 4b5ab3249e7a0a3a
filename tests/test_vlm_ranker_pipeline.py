"""VisionLanguageRanker's input pipeline: concurrent image decoding, the processor one batch ahead of the model,
and the device-dependent default batch size. No timing assertions: overlap is shown by ordering (a forward pass
that waits until the next batch has been preprocessed) and concurrency by a barrier two decodes must meet at."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from haystack import Document, Pipeline
from haystack.utils import ComponentDevice
from PIL import Image

from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from haystack_integrations.components.rankers.vlm import ranker as ranker_module
from tests.helpers import COLORS, make_image, make_pdf

WARNING = "could not be shown to the model"


def _sequential(items: Iterable[Any], *, depth: int = 1) -> Iterator[Any]:
    """A stand-in for `prefetch` that produces each batch only when the model asks for it (no background thread)."""
    del depth
    yield from items


@pytest.fixture
def many(tmp_path: Path) -> list[Document]:
    """14 images, 2 pages of one PDF, 2 texts, and 2 unreadable candidates in the middle of the score order."""
    docs = []
    for i in range(14):
        path = make_image(tmp_path / f"img{i}.png", size=(56 + 7 * (i % 5), 56), color=COLORS[i % len(COLORS)])
        docs.append(Document(id=f"img{i}", meta={"file_path": str(path)}, score=0.99 - i / 100))
    pdf = make_pdf(tmp_path / "deck.pdf", pages=3, size=(70, 90))
    for page in (1, 3):
        docs.append(
            Document(id=f"page{page}", meta={"file_path": str(pdf), "page_number": page}, score=0.9 - page / 100)
        )
    docs.append(Document(id="text-a", content="Quarterly revenue grew in Q3.", score=0.5))
    docs.append(Document(id="text-b", content="The cat sat on a red sofa.", score=0.4))
    (tmp_path / "broken.png").write_bytes(b"garbage")
    docs.append(Document(id="broken", meta={"file_path": str(tmp_path / "broken.png")}, score=0.955))
    docs.append(Document(id="missing", meta={"file_path": str(tmp_path / "missing.png")}, score=0.915))
    return docs


def _warning(caplog: pytest.LogCaptureFixture) -> str:
    return next(r.getMessage() for r in caplog.records if WARNING in r.getMessage())


@pytest.fixture
def one() -> Iterator[ThreadPoolExecutor]:
    """A one-thread decode pool: candidates decode one after another, as without concurrency."""
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.fixture
def four() -> Iterator[ThreadPoolExecutor]:
    """A four-thread decode pool (the shared one has `min(8, cores)` threads: 2 on the CI machine)."""
    with ThreadPoolExecutor(4) as pool:
        yield pool


def test_images_are_decoded_concurrently_and_unreadable_ones_are_still_reported_in_order(
    tiny_monoqwen: str,
    many: list[Document],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    one: ThreadPoolExecutor,
    four: ThreadPoolExecutor,
) -> None:
    ranker = VisionLanguageRanker(tiny_monoqwen, max_candidates=len(many), batch_size=3)

    monkeypatch.setattr(ranker_module, "decode_pool", lambda: one)
    with caplog.at_level(logging.WARNING):
        one_by_one = ranker.run(query="a red picture", documents=many)["documents"]
    sequential_warning = _warning(caplog)
    caplog.clear()

    # Four workers; the first two decodes wait for each other at a barrier: they can only pass it together.
    monkeypatch.setattr(ranker_module, "decode_pool", lambda: four)
    barrier = threading.Barrier(2, timeout=60)
    lock = threading.Lock()
    calls: list[str] = []
    threads: set[str] = set()
    real_load = ranker_module.load_document_image

    def spy(doc: Document, *args: Any, **kwargs: Any) -> Image.Image:
        with lock:
            calls.append(doc.id)
            threads.add(threading.current_thread().name)
            first_two = len(calls) <= 2
        if first_two:
            barrier.wait()
        return real_load(doc, *args, **kwargs)

    monkeypatch.setattr(ranker_module, "load_document_image", spy)
    with caplog.at_level(logging.WARNING):
        concurrent = ranker.run(query="a red picture", documents=many)["documents"]
    concurrent_warning = _warning(caplog)

    assert len(threads) >= 2
    assert threading.current_thread().name not in threads  # decoding happened off the caller's thread
    assert [d.id for d in concurrent] == [d.id for d in one_by_one]
    for a, b in zip(concurrent, one_by_one, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-6)
    # Unreadable candidates keep their incoming score, come after the judged ones, and are named in one warning,
    # in the order they were met (by incoming score), exactly as without concurrency.
    judged = [d for d in concurrent if "cross_encoder_score" in d.meta]
    assert len(judged) == len(many) - 2
    assert concurrent[: len(judged)] == judged
    by_id = {d.id: d for d in concurrent}
    assert by_id["broken"].score == 0.955
    assert by_id["missing"].score == 0.915
    assert "cross_encoder_score" not in by_id["broken"].meta
    assert concurrent_warning == sequential_warning
    assert concurrent_warning.index("'broken'") < concurrent_warning.index("'missing'")
    assert "2 candidate(s)" in concurrent_warning


def _warm(model: str, many: list[Document], *, batch_size: int) -> tuple[VisionLanguageRanker, Any]:
    """A warmed-up ranker judging all of `many`, and its loaded model backend."""
    ranker = VisionLanguageRanker(model, max_candidates=len(many), batch_size=batch_size)
    ranker.warm_up()
    assert ranker._vlm is not None
    return ranker, ranker._vlm


def test_the_processor_prepares_the_next_batch_while_the_model_runs(
    tiny_monoqwen: str, many: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    ranker, vlm = _warm(tiny_monoqwen, many, batch_size=4)
    preprocessed = [threading.Event() for _ in range(8)]
    preprocess_threads: list[str] = []
    forward_threads: list[str] = []
    real_preprocess = vlm.preprocess
    real_forward = vlm.model.forward

    def spy_preprocess(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = real_preprocess(*args, **kwargs)
        preprocess_threads.append(threading.current_thread().name)
        preprocessed[len(preprocess_threads) - 1].set()
        return out

    def spy_forward(*args: Any, **kwargs: Any) -> Any:
        index = len(forward_threads)
        forward_threads.append(threading.current_thread().name)
        if index + 1 < 5:
            # Batch i's forward pass does not start until batch i+1 has gone through the processor: only
            # possible when the processor works on another thread.
            assert preprocessed[index + 1].wait(timeout=60)
        return real_forward(*args, **kwargs)

    # A context of its own: `monkeypatch.undo()` would also undo the autouse fixture that keeps the reference
    # ranker below on the CPU (on a GPU machine it then ran on CUDA in bfloat16).
    with pytest.MonkeyPatch.context() as spies:
        spies.setattr(vlm, "preprocess", spy_preprocess)
        spies.setattr(vlm.model, "forward", spy_forward)
        pipelined = ranker.run(query="revenue", documents=many)["documents"]

    assert len(forward_threads) == 5  # 18 readable candidates in batches of 4
    assert set(forward_threads) == {threading.current_thread().name}
    assert threading.current_thread().name not in preprocess_threads

    # The same scores as one candidate at a time with no background thread at all.
    monkeypatch.setattr(ranker_module, "prefetch", _sequential)
    single = VisionLanguageRanker(tiny_monoqwen, max_candidates=len(many), batch_size=1)
    reference = {d.id: d for d in single.run(query="revenue", documents=many)["documents"]}
    assert len(reference) == len(pipelined)
    # Batches of 4 (left-padded) against batches of 1: float32 kernels of other shapes round differently (< 1e-4
    # on the 2-vCPU VM). The 1.3e-4 and 5.9e-4 once seen on the H100 machine came from the reference running on
    # its GPU in bfloat16, before the spies got a context of their own.
    for doc in pipelined:
        assert doc.score == pytest.approx(reference[doc.id].score, abs=5e-4)
        assert ("cross_encoder_score" in doc.meta) == ("cross_encoder_score" in reference[doc.id].meta)


def test_refused_and_unreadable_candidates_are_reported_as_before_when_pipelined(
    tiny_monoqwen: str,
    many: list[Document],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    one: ThreadPoolExecutor,
) -> None:
    # The shared loader pads extreme aspect ratios; hand the processor raw 1600x6 banners (which Qwen's processor
    # refuses: aspect ratio over 200) to exercise the per-candidate search after a refused batch.
    real_load = ranker_module.load_document_image

    def raw_banners(doc: Document, *args: Any, **kwargs: Any) -> Image.Image:
        return Image.new("RGB", (1600, 6), "navy") if doc.id.startswith("banner") else real_load(doc, *args, **kwargs)

    monkeypatch.setattr(ranker_module, "load_document_image", raw_banners)
    # batch_size=2: banner0 and banner1 are a batch of their own (wholly refused); banner2 shares one.
    banners = [
        Document(id=f"banner{i}", meta={"file_path": str(tmp_path / "x.png")}, score=s)
        for i, s in enumerate((0.999, 0.998, 0.975))
    ]
    docs = [*banners, *many]
    ranker = VisionLanguageRanker(tiny_monoqwen, max_candidates=len(docs), batch_size=2)

    with caplog.at_level(logging.WARNING):
        pipelined = ranker.run(query="q", documents=docs)["documents"]
    pipelined_warning = _warning(caplog)
    caplog.clear()
    monkeypatch.setattr(ranker_module, "prefetch", _sequential)
    monkeypatch.setattr(ranker_module, "decode_pool", lambda: one)
    with caplog.at_level(logging.WARNING):
        sequential = ranker.run(query="q", documents=docs)["documents"]
    assert _warning(caplog) == pipelined_warning

    assert [d.id for d in pipelined] == [d.id for d in sequential]
    unjudged = [d.id for d in pipelined if "cross_encoder_score" not in d.meta]
    assert unjudged == ["banner0", "banner1", "banner2", "broken", "missing"]  # incoming order
    # Unreadable first, then refused, each in the order met.
    positions = [
        pipelined_warning.index(f"'{name}'") for name in ("broken", "missing", "banner0", "banner1", "banner2")
    ]
    assert positions == sorted(positions)
    assert "5 candidate(s)" in pipelined_warning
    assert "aspect ratio" in pipelined_warning


def test_a_failing_forward_pass_stops_the_pipeline_and_the_next_query_runs(
    tiny_monoqwen: str, many: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    ranker = VisionLanguageRanker(tiny_monoqwen, max_candidates=len(many), batch_size=2)
    ranker.warm_up()
    assert ranker._vlm is not None

    def broken(*args: Any, **kwargs: Any) -> Any:
        msg = "device lost"
        raise RuntimeError(msg)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ranker._vlm.model, "forward", broken)
        with pytest.raises(RuntimeError, match="device lost"):
            ranker.run(query="q", documents=many)
    assert not [t for t in threading.enumerate() if t.name.startswith(("vlm-ranker-decode", "multimodal-rag-prefetch"))]
    out = ranker.run(query="q", documents=many)["documents"]
    assert len(out) == len(many)


def test_batch_size_defaults_by_device_and_round_trips(tiny_monoqwen: str) -> None:
    ranker = VisionLanguageRanker(tiny_monoqwen, device=ComponentDevice.from_str("cpu"))
    assert ranker.batch_size is None
    assert ranker.to_dict()["init_parameters"]["batch_size"] is None
    ranker.warm_up()
    assert ranker._effective_batch_size() == ranker_module.CPU_BATCH_SIZE == 4
    ranker._vlm = SimpleNamespace(device="cuda:0")  # type: ignore[assignment]
    assert ranker._effective_batch_size() == ranker_module.CUDA_BATCH_SIZE == 16
    explicit = VisionLanguageRanker(tiny_monoqwen, batch_size=8)
    explicit._vlm = SimpleNamespace(device="cuda:0")  # type: ignore[assignment]
    assert explicit._effective_batch_size() == 8
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        VisionLanguageRanker(batch_size=0)

    for value in (None, 6):
        pipe = Pipeline()
        pipe.add_component("ranker", VisionLanguageRanker(tiny_monoqwen, batch_size=value))
        restored = Pipeline.loads(pipe.dumps())
        assert restored.get_component("ranker").batch_size == value
        assert restored.get_component("ranker").to_dict() == pipe.get_component("ranker").to_dict()
    # A YAML written before the automatic default (batch_size: 4) still loads as 4.
    data = VisionLanguageRanker(tiny_monoqwen).to_dict()
    data["init_parameters"]["batch_size"] = 4
    assert VisionLanguageRanker.from_dict(data).batch_size == 4


def test_preprocess_stays_on_the_host_and_is_safe_from_several_threads(tiny_instruct: str, tmp_path: Path) -> None:
    ranker = VisionLanguageRanker(tiny_instruct, recipe="zero_shot_yes_no")
    ranker.warm_up()
    vlm = ranker._vlm
    assert vlm is not None
    image = Image.open(make_image(tmp_path / "a.png", size=(64, 56))).convert("RGB")
    prompt = vlm.prompt_text([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}])
    host = vlm.preprocess([prompt, prompt], [[image], [image]], padding_side="left")
    assert all(v.device.type == "cpu" for v in host.values() if isinstance(v, torch.Tensor))
    assert host["pixel_values"].dtype == vlm.dtype
    moved = vlm.to_device(host)
    direct = vlm.encode([prompt, prompt], [[image], [image]], padding_side="left")
    assert moved.keys() == direct.keys()
    for key, value in direct.items():
        assert torch.equal(moved[key], value)

    # The fast tokenizer is shared; callers on several threads (truncation, batches) must not collide.
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                vlm.truncate("revenue " * 300, 50)
                vlm.preprocess([prompt], [[image]], padding_side="left")
        except BaseException as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []


def test_a_querys_first_batch_is_small_so_the_model_starts_early(tiny_monoqwen: str, many: list[Document]) -> None:
    ranker, vlm = _warm(tiny_monoqwen, many, batch_size=8)
    sizes: list[int] = []
    real_forward = vlm.model.forward

    def spy_forward(*args: Any, **kwargs: Any) -> Any:
        sizes.append(int(kwargs["input_ids"].shape[0]))
        return real_forward(*args, **kwargs)

    with pytest.MonkeyPatch.context() as spy:  # not monkeypatch.undo(): see the pipelining test
        spy.setattr(vlm.model, "forward", spy_forward)
        ranked = ranker.run(query="revenue", documents=many)["documents"]
    first = ranker_module.FIRST_BATCH_SIZE
    assert 0 < first < 8
    assert sizes == [first, 8, 18 - first - 8]  # 18 readable candidates: a small first batch, then batch_size
    # The same scores as equal batches of 6 (the batch a candidate lands in changes nothing beyond rounding).
    even = VisionLanguageRanker(tiny_monoqwen, max_candidates=len(many), batch_size=6, top_k=None)
    reference = {d.id: d.score for d in even.run(query="revenue", documents=many)["documents"]}
    for doc in ranked:
        assert doc.score == pytest.approx(reference[doc.id], abs=5e-4)
