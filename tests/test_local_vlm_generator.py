from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import pytest
import torch
from haystack.components.generators.utils import print_streaming_chunk
from haystack.dataclasses import ChatMessage, ImageContent, StreamingChunk, ToolCall
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.vlm import decode_image_content
from haystack_integrations.common.multimodal_rag.errors import MediaError, ModelLoadError
from haystack_integrations.common.multimodal_rag.inputs import media
from haystack_integrations.components.generators.local_vlm import LocalVLMChatGenerator
from tests.helpers import make_image


def _decode(image: ImageContent) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image.base64_image)))


def _image_message(tmp_path: Path, n_images: int = 2) -> ChatMessage:
    parts: list = ["Describe these pictures."]
    for i in range(n_images):
        path = make_image(tmp_path / f"img{i}.png", size=(56 + 28 * i, 56))
        parts.append(ImageContent.from_file_path(path))
    return ChatMessage.from_user(content_parts=parts)


def test_generator_passes_the_pixels_to_the_model(
    tiny_vlm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = LocalVLMChatGenerator(tiny_vlm, generation_kwargs={"max_new_tokens": 5})
    generator.warm_up()
    seen: dict = {}
    real_generate = generator._vlm.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(generator._vlm.model, "generate", spy)
    message = _image_message(tmp_path)
    reply = generator.run(messages=[ChatMessage.from_system("Be brief."), message])["replies"][0]
    assert reply.role.value == "assistant"
    assert isinstance(reply.text, str)
    assert reply.meta["images"] == 2
    assert reply.meta["usage"]["completion_tokens"] <= 5
    assert reply.meta["finish_reason"] in ("stop", "length")
    pixel_values = seen["pixel_values"]
    assert isinstance(pixel_values, torch.Tensor)
    assert pixel_values.ndim == 2
    assert pixel_values.shape[0] > 0
    assert seen["image_grid_thw"].shape[0] == 2  # one grid per image
    image_token = generator._vlm.processor.image_token_id
    assert int((seen["input_ids"] == image_token).sum()) > 0

    # Different pixels give different model inputs: the images really reach the model.
    first = pixel_values.clone()
    other = ChatMessage.from_user(
        content_parts=[
            "Describe these pictures.",
            ImageContent.from_file_path(make_image(tmp_path / "o.png", color="black", size=(56, 56))),
            ImageContent.from_file_path(tmp_path / "img1.png"),
        ]
    )
    generator.run(messages=[other])
    assert not torch.equal(first, seen["pixel_values"])


def test_generator_streams_chunks_and_handles_text_only(tiny_vlm: str) -> None:
    chunks: list[StreamingChunk] = []
    generator = LocalVLMChatGenerator(
        tiny_vlm, generation_kwargs={"max_new_tokens": 8}, streaming_callback=chunks.append
    )
    reply = generator.run(messages=[ChatMessage.from_user("hello")])["replies"][0]
    assert reply.meta["images"] == 0
    if reply.text:
        assert chunks
        assert "".join(c.content for c in chunks).strip() == reply.text
        assert chunks[0].start is True
        assert chunks[0].component_info.type.endswith("LocalVLMChatGenerator")
    runtime: list[StreamingChunk] = []
    generator.run(messages=[ChatMessage.from_user("hello")], streaming_callback=runtime.append)
    assert len(runtime) == len(chunks)


def test_generator_rejects_tool_calls_and_bad_images(tiny_vlm: str) -> None:
    generator = LocalVLMChatGenerator(tiny_vlm)
    with pytest.raises(ValueError, match="does not support 'tool_call'"):
        generator.run(messages=[ChatMessage.from_assistant(tool_calls=[ToolCall(tool_name="x", arguments={})])])
    bad = ImageContent(base64_image=base64.b64encode(b"not an image").decode(), mime_type="image/png", validation=False)
    with pytest.raises(MediaError, match=r"message 0, part 1: the image cannot be decoded"):
        generator.run(messages=[ChatMessage.from_user(content_parts=["look", bad])])
    with pytest.raises(ValueError, match="no messages"):
        generator.run(messages=[])


def test_generator_refuses_a_model_without_chat_support(tiny_siglip: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        LocalVLMChatGenerator(tiny_siglip).warm_up()
    with pytest.raises(ModelLoadError, match=r"local directory path|local path"):
        LocalVLMChatGenerator("org/no-such-vlm", local_files_only=True).warm_up()


def test_generator_round_trips_with_its_streaming_callback(tiny_vlm: str) -> None:
    generator = LocalVLMChatGenerator(
        tiny_vlm,
        generation_kwargs={"max_new_tokens": 3},
        model_kwargs={"dtype": torch.float32},
        streaming_callback=print_streaming_chunk,
        local_files_only=True,
    )
    data = generator.to_dict()
    assert data["init_parameters"]["processor_kwargs"] is None
    assert data["init_parameters"]["streaming_callback"].endswith("print_streaming_chunk")
    assert data["init_parameters"]["model_kwargs"] == {"dtype": "torch.float32"}
    restored = LocalVLMChatGenerator.from_dict(data)
    assert restored.streaming_callback is print_streaming_chunk
    assert restored.model_kwargs == {"dtype": "torch.float32"}  # turned back into torch.float32 when loading
    assert restored.to_dict() == data


def _spy_generate(generator: LocalVLMChatGenerator, monkeypatch: pytest.MonkeyPatch) -> dict:
    generator.warm_up()
    seen: dict = {}
    real_generate = generator._vlm.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(generator._vlm.model, "generate", spy)
    return seen


def test_a_12_megapixel_photo_gets_a_bounded_number_of_visual_tokens(
    tiny_instruct_full_budget: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), "teal").save(path, quality=50)
    message = ChatMessage.from_user(content_parts=["What is this?", ImageContent.from_file_path(path)])

    generator = LocalVLMChatGenerator(tiny_instruct_full_budget, generation_kwargs={"max_new_tokens": 1})
    seen = _spy_generate(generator, monkeypatch)
    generator.run(messages=[message])
    merge = generator._vlm.processor.image_processor.merge_size
    visual_tokens = int(seen["image_grid_thw"].prod()) // merge**2
    # At most 1280 visual tokens (Qwen's recommended max_pixels), not the checkpoint's 16384 (~15k for this photo).
    assert 1000 < visual_tokens <= 1280
    assert int((seen["input_ids"] == generator._vlm.processor.image_token_id).sum()) == visual_tokens

    small = LocalVLMChatGenerator(
        tiny_instruct_full_budget,
        generation_kwargs={"max_new_tokens": 1},
        processor_kwargs={"max_pixels": 100 * 28 * 28},
    )
    assert LocalVLMChatGenerator.from_dict(small.to_dict()).processor_kwargs == {"max_pixels": 100 * 28 * 28}
    seen_small = _spy_generate(small, monkeypatch)
    small.run(messages=[message])
    assert int(seen_small["image_grid_thw"].prod()) // merge**2 <= 100


def test_an_image_the_processor_refuses_is_dropped_with_a_warning(
    tiny_vlm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    banner_path = tmp_path / "banner.png"
    Image.new("RGB", (1600, 6), "navy").save(banner_path)
    banner = ImageContent.from_file_path(banner_path)
    good = ImageContent.from_file_path(make_image(tmp_path / "ok.png", size=(56, 56)))
    message = ChatMessage.from_user(content_parts=["Compare.", good, banner])
    generator = LocalVLMChatGenerator(tiny_vlm, generation_kwargs={"max_new_tokens": 2})
    seen = _spy_generate(generator, monkeypatch)
    with caplog.at_level(logging.WARNING):
        reply = generator.run(messages=[message])["replies"][0]
    decoded = decode_image_content(banner, label="banner")
    if max(decoded.size) / min(decoded.size) > 200:
        # The shared loader hands the banner over as it is; Qwen's processor refuses aspect ratios over 200.
        assert reply.meta["images"] == 1
        assert reply.meta["dropped_images"] == ["message 0, part 2"]
        assert seen["image_grid_thw"].shape[0] == 1  # the other image still reaches the model
        assert "message 0, part 2 (1600x6)" in caplog.text
        assert "aspect ratio" in caplog.text
    else:  # the shared loader made it acceptable: both images reach the model
        assert reply.meta["images"] == 2
        assert seen["image_grid_thw"].shape[0] == 2


def test_image_content_is_decoded_by_the_shared_loader_with_the_bomb_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 30, 20))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    content = ImageContent(base64_image=base64.b64encode(buffer.getvalue()).decode(), mime_type="image/png")
    ours = decode_image_content(content, label="x")
    shared = media._decode_image(io.BytesIO(buffer.getvalue()), "x")
    assert ours.mode == "RGB"
    assert ours.tobytes() == shared.tobytes()  # the same pixels as every other component gets

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    message = ChatMessage.from_user(content_parts=["look", content])
    with pytest.raises(MediaError, match=r"message 0, part 1: .*decompression-bomb"):
        LocalVLMChatGenerator("unused-model").run(messages=[message])
