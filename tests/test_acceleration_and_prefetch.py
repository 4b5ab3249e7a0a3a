from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from haystack_integrations.common.multimodal_rag.backends import acceleration
from haystack_integrations.common.multimodal_rag.backends.acceleration import with_device_defaults
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.common.multimodal_rag.inputs.prefetch import prefetch


def _spec(device: str, model_kwargs: dict | None = None, model: str = "no-such-org/no-such-model") -> LoadSpec:
    return LoadSpec(
        model=model, component="C", device=device, token=None, local_files_only=True, model_kwargs=model_kwargs
    )


def test_cpu_gets_float32_and_the_default_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda: False)
    assert with_device_defaults(_spec("cpu")).model_kwargs == {"dtype": "float32"}


def test_cuda_defaults_to_bf16_and_keeps_sdpa_without_flash_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(acceleration, "flash_attention_available", lambda: False)
    # transformers' own default kernel on CUDA is SDPA: nothing to set.
    assert with_device_defaults(_spec("cuda:0")).model_kwargs == {"dtype": "bfloat16"}


def test_cuda_uses_flash_attention_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(acceleration, "flash_attention_available", lambda: True)
    assert with_device_defaults(_spec("cuda")).model_kwargs == {
        "dtype": "bfloat16",
        "attn_implementation": "flash_attention_2",
    }


def test_the_users_choices_win_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(acceleration, "flash_attention_available", lambda: True)
    chosen = {"torch_dtype": "float32", "attn_implementation": "eager"}
    spec = _spec("cuda:1", chosen)
    assert with_device_defaults(spec).model_kwargs == chosen
    assert spec.model_kwargs == {"torch_dtype": "float32", "attn_implementation": "eager"}  # not modified


def test_a_bf16_colpali_checkpoint_loads_in_float32_on_a_cpu_without_native_bf16(
    tiny_colqwen2: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every backend goes through the same rule, not only the dense one: ColQwen2.5 checkpoints record bf16.
    import json
    import shutil

    from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder

    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda: False)
    path = Path(shutil.copytree(tiny_colqwen2, tmp_path / "bf16"))
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    encoder = LateInteractionEncoder.get(_spec("cpu", model=str(path)))
    assert next(encoder.model.parameters()).dtype == torch.float32


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


def test_prefetched_image_batches_equal_the_unprefetched_ones_failures_included(tmp_path: Path) -> None:
    from haystack import Document

    from haystack_integrations.common.multimodal_rag.inputs.planning import iter_image_batches, plan_documents
    from tests.helpers import make_image, make_pdf

    docs = [Document(id=f"img{i}", meta={"file_path": str(make_image(tmp_path / f"{i}.png"))}) for i in range(6)]
    pdf = make_pdf(tmp_path / "deck.pdf", pages=2)
    docs += [Document(id=f"p{n}", meta={"file_path": str(pdf), "page_number": n}) for n in (1, 2)]
    plan = plan_documents(docs, file_path_meta_field="file_path", root_path=None, probe_pixels=False)
    visual = plan.visual_indices()
    (tmp_path / "4.png").unlink()  # gone between planning and decoding: a failure of its batch

    def collect(depth: int) -> list[tuple[list[int], list[bytes], dict[int, str]]]:
        return [
            (positions, [image.tobytes() for image in images], failed)
            for positions, images, failed in iter_image_batches(plan, visual, 3, prefetch_depth=depth)
        ]

    plain, ahead = collect(0), collect(2)
    assert ahead == plain
    assert [list(failed) for _, _, failed in plain] == [[], [4], []]  # reported in its batch either way


# --- contiguous vision embeddings (SigLIP, also inside PaliGemma) -------------------------------------------------


def _siglip_vision(seed: int = 0) -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, image_size=56, patch_size=14
    )
    return SiglipVisionModel(config).eval()


def test_siglip_embeddings_leave_a_transposed_view_and_the_hook_makes_them_contiguous() -> None:
    model = _siglip_vision()
    embeddings = next(m for m in model.modules() if type(m).__name__ == "SiglipVisionEmbeddings")
    pixels = torch.randn(3, 3, 56, 56)
    with torch.inference_mode():
        assert not embeddings(pixels).is_contiguous()  # what the tower gets from transformers (the reason)
        want = model(pixel_values=pixels)
        assert acceleration.contiguous_vision_embeddings(model) == 1
        assert acceleration.contiguous_vision_embeddings(model) == 0  # once per module
        assert embeddings(pixels).is_contiguous()
        got = model(pixel_values=pixels)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)  # bit for bit: only the layout changed
    assert torch.equal(got.pooler_output, want.pooler_output)


def test_towers_without_siglip_embeddings_are_left_alone() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
    )
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        want = clip(pixel_values=pixels).pooler_output
        assert acceleration.contiguous_vision_embeddings(clip) == 0  # CLIP's embeddings are contiguous (a cat)
        assert torch.equal(clip(pixel_values=pixels).pooler_output, want)
    assert acceleration.contiguous_vision_embeddings(torch.nn.Linear(2, 2)) == 0


def test_loaded_siglip_and_colpali_models_get_contiguous_embeddings(
    tmp_path: Path, tiny_colpali_family: Callable[[str], str]
) -> None:
    from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder
    from haystack_integrations.common.multimodal_rag.backends.dense import DenseEncoder
    from haystack_integrations.testing.multimodal_rag.tiny_models import build_tiny_siglip

    def spec(model: str) -> LoadSpec:
        return LoadSpec(
            model=model, component="test", device="cpu", token=None, local_files_only=True, model_kwargs=None
        )

    dense = DenseEncoder.get(spec(str(build_tiny_siglip(tmp_path / "siglip"))))
    colpali = LateInteractionEncoder.get(spec(tiny_colpali_family("ColPali")))  # PaliGemma: a SigLIP tower
    for model in (dense.model, colpali.model):
        hooked = [m for m in model.modules() if type(m).__name__ == "SiglipVisionEmbeddings"]
        assert hooked
        assert all(getattr(m, "_mmrag_contiguous", False) for m in hooked)
