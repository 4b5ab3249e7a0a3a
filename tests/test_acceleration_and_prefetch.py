from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from haystack_integrations.common.multimodal_rag.backends import acceleration
from haystack_integrations.common.multimodal_rag.backends.acceleration import accelerated_model_kwargs
from haystack_integrations.common.multimodal_rag.inputs.prefetch import prefetch


def test_cpu_keeps_float32_and_the_default_attention() -> None:
    assert accelerated_model_kwargs("cpu", None) == {}
    assert accelerated_model_kwargs("cpu", {"dtype": "bfloat16"}) == {"dtype": "bfloat16"}


def test_cuda_defaults_to_bf16_and_sdpa_without_flash_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(acceleration, "flash_attention_available", lambda: False)
    assert accelerated_model_kwargs("cuda:0", None) == {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}


def test_cuda_uses_flash_attention_when_installed_and_fp16_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(acceleration, "flash_attention_available", lambda: True)
    assert accelerated_model_kwargs("cuda", {}) == {"dtype": torch.float16, "attn_implementation": "flash_attention_2"}


def test_the_users_choices_win_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    chosen = {"torch_dtype": "float32", "attn_implementation": "eager"}
    assert accelerated_model_kwargs("cuda:1", chosen) == chosen
    assert chosen == {"torch_dtype": "float32", "attn_implementation": "eager"}  # not modified


def test_prefetch_keeps_order_and_everything() -> None:
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))
    assert list(prefetch([], depth=1)) == []


def test_prefetch_overlaps_the_producer_with_the_consumer() -> None:
    produced_while_consuming: list[int] = []
    consuming = threading.Event()

    def producer() -> Iterator[int]:
        for i in range(3):
            if consuming.is_set():
                produced_while_consuming.append(i)
            yield i

    for item in prefetch(producer(), depth=1):
        consuming.set()
        if item == 0:
            deadline = time.monotonic() + 10
            while not produced_while_consuming and time.monotonic() < deadline:
                time.sleep(0.005)
    assert produced_while_consuming  # batch i+1 was produced while batch i was being consumed


def test_prefetch_memory_is_bounded_by_depth() -> None:
    alive = []

    def producer() -> Iterator[int]:
        for i in range(50):
            alive.append(i)
            yield i

    it = prefetch(producer(), depth=2)
    first = next(it)
    deadline = time.monotonic() + 5
    while len(alive) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    # one consumed, two queued, one the producer holds waiting for a slot: never the whole stream
    assert first == 0
    assert len(alive) <= 4
    assert list(it) == list(range(1, 50))


def test_a_producer_error_reaches_the_consumer_at_its_position() -> None:
    def producer() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    got: list[int] = []

    def consume() -> None:
        got.extend(prefetch(producer()))

    with pytest.raises(OSError, match="disk gone"):
        consume()
    assert got == [1, 2]


def test_stopping_early_stops_the_producer() -> None:
    produced = []

    def producer() -> Iterator[int]:
        for i in range(10_000):
            produced.append(i)
            yield i

    it = prefetch(producer(), depth=1)
    assert next(it) == 0
    it.close()
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count < 10_000
    assert not [t for t in threading.enumerate() if t.name == "multimodal-rag-prefetch"]


def test_invalid_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        prefetch([1], depth=0)
