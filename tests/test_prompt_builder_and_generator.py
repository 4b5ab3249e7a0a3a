from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import pytest
import torch
from haystack import Document, Pipeline
from haystack.components.generators.utils import print_streaming_chunk
from haystack.dataclasses import ChatMessage, ImageContent, StreamingChunk, ToolCall
from PIL import Image

from haystack_integrations.common.multimodal_rag.errors import ConversionError, ModelLoadError
from haystack_integrations.components.builders.multimodal import MultimodalChatPromptBuilder
from haystack_integrations.components.converters.multimodal import MultimodalFileToDocument
from haystack_integrations.components.generators.local_vlm import LocalVLMChatGenerator
from tests.helpers import make_corrupt_image, make_image, make_pdf, make_truncated_pdf


def _decode(image: ImageContent) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image.base64_image)))


@pytest.fixture
def ranked(tmp_path: Path) -> list[Document]:
    make_image(tmp_path / "chart.png", size=(300, 200), color="blue")
    make_image(tmp_path / "photo.png", size=(120, 90), color="green")
    make_pdf(tmp_path / "report.pdf", pages=3, size=(200, 260))
    make_corrupt_image(tmp_path / "broken.png")
    return [
        Document(id="d-text-1", content="Revenue grew 18% in Q3.", meta={"modality": "text"}, score=0.9),
        Document(id="d-chart", meta={"modality": "image", "file_path": "chart.png"}, score=0.8),
        Document(id="d-broken", meta={"modality": "image", "file_path": "broken.png"}, score=0.7),
        Document(id="d-page-2", meta={"modality": "page", "file_path": "report.pdf", "page_number": 2}, score=0.6),
        Document(id="d-text-2", content="Hiring slows in 2026.", meta={"modality": "text"}, score=0.5),
        Document(id="d-photo", meta={"modality": "image", "file_path": "photo.png"}, score=0.4),
    ]


def test_builder_numbers_text_and_images_and_maps_sources(
    ranked: list[Document], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    builder = MultimodalChatPromptBuilder(max_images=2, image_size=(100, 100), root_path=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        out = builder.run(query="What grew in Q3?", documents=ranked)
    messages = out["messages"]
    assert len(messages) == 1
    user = messages[0]
    images = user.images
    assert len(images) == 2
    # The best two readable images: the chart and the PDF page (the broken file gave its slot away).
    assert [img.meta["document_id"] for img in images] == ["d-chart", "d-page-2"]
    for img in images:
        picture = _decode(img)
        assert max(picture.size) <= 100
        assert img.mime_type == "image/jpeg"
    text = user.texts[-1]
    assert "[1] Revenue grew 18% in Q3." in text
    assert "[4] Hiring slows in 2026." in text
    assert "Question: What grew in Q3?" in text
    assert user.texts[0].startswith("[2] image chart.png")
    assert user.texts[1].startswith("[3] page report.pdf, page 2")

    sources = {s["document_id"]: s for s in out["sources"]}
    assert [s["document_id"] for s in out["sources"]] == [d.id for d in ranked]
    assert sources["d-text-1"]["number"] == 1
    assert sources["d-chart"] | {} == {
        "number": 2,
        "document_id": "d-chart",
        "file_path": "chart.png",
        "page_number": None,
        "modality": "image",
        "score": 0.8,
        "included": True,
        "skipped_reason": None,
    }
    assert sources["d-page-2"]["number"] == 3
    assert sources["d-page-2"]["page_number"] == 2
    assert sources["d-broken"]["included"] is False
    assert sources["d-broken"]["skipped_reason"].startswith("unreadable")
    assert sources["d-photo"]["skipped_reason"] == "over max_images=2"
    assert "'d-broken'" in caplog.text


def test_builder_pdf_page_is_rendered_from_page_number(tmp_path: Path) -> None:
    make_pdf(tmp_path / "r.pdf", pages=3)
    builder = MultimodalChatPromptBuilder(root_path=str(tmp_path))
    colors = []
    for page in (1, 2):
        doc = Document(meta={"file_path": "r.pdf", "page_number": page, "modality": "page"}, score=1.0)
        picture = _decode(builder.run(query="q", documents=[doc])["messages"][0].images[0]).convert("RGB")
        colors.append(picture.getpixel((picture.width // 2, picture.height // 2)))
    assert colors[0] != colors[1]  # red page vs green page


def test_builder_system_prompt_custom_template_and_no_images(ranked: list[Document], tmp_path: Path) -> None:
    builder = MultimodalChatPromptBuilder(
        template="Q={{ query }};{% for s in text_sources %}{{ s.number }}:{{ s.content }};{% endfor %}",
        max_images=0,
        system_prompt="You are careful.",
        root_path=str(tmp_path),
    )
    out = builder.run(query="hi", documents=ranked)
    system, user = out["messages"]
    assert system.text == "You are careful."
    assert user.images == []
    assert user.text == "Q=hi;1:Revenue grew 18% in Q3.;2:Hiring slows in 2026.;"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"template": "{% for %}"}, "not valid Jinja2"),
        ({"max_images": -1}, "max_images"),
        ({"image_size": (10,)}, "image_size"),
    ],
)
def test_builder_rejects_bad_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultimodalChatPromptBuilder(**kwargs)


def test_builder_rejects_empty_query() -> None:
    with pytest.raises(ValueError, match="empty query"):
        MultimodalChatPromptBuilder().run(query=" ", documents=[])


def test_builder_survives_yaml_round_trip(ranked: list[Document], tmp_path: Path) -> None:
    pipe = Pipeline()
    pipe.add_component(
        "builder", MultimodalChatPromptBuilder(max_images=1, image_size=(64, 64), root_path=str(tmp_path))
    )
    restored = Pipeline.loads(pipe.dumps())
    builder = restored.get_component("builder")
    assert builder.image_size == (64, 64)
    out = restored.run({"builder": {"query": "q", "documents": ranked}})
    assert len(out["builder"]["messages"][0].images) == 1


# --- LocalVLMChatGenerator --------------------------------------------------------------------------


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
    with pytest.raises(ValueError, match="cannot be decoded"):
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
    assert data["init_parameters"]["streaming_callback"].endswith("print_streaming_chunk")
    assert data["init_parameters"]["model_kwargs"] == {"dtype": "torch.float32"}
    restored = LocalVLMChatGenerator.from_dict(data)
    assert restored.streaming_callback is print_streaming_chunk
    assert restored.model_kwargs == {"dtype": "torch.float32"}  # turned back into torch.float32 when loading
    assert restored.to_dict() == data


# --- MultimodalFileToDocument -------------------------------------------------------------------------


def test_converter_makes_one_document_per_image_page_and_text_file(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    make_pdf(tmp_path / "sub" / "r.pdf", pages=3)
    (tmp_path / "sub" / "n.txt").write_text("some notes")
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\x00\x01")
    converter = MultimodalFileToDocument(root_path=str(tmp_path))
    docs = converter.run(sources=["a.png", "sub"], meta={"source": "test"})["documents"]
    assert [(d.meta["modality"], d.meta["file_path"], d.meta.get("page_number")) for d in docs] == [
        ("image", "a.png", None),
        ("text", "sub/n.txt", None),
        ("page", "sub/r.pdf", 1),
        ("page", "sub/r.pdf", 2),
        ("page", "sub/r.pdf", 3),
    ]
    assert docs[1].content == "some notes"
    assert all(d.meta["source"] == "test" for d in docs)
    again = converter.run(sources=["a.png", "sub"], meta={"source": "test"})["documents"]
    assert [d.id for d in again] == [d.id for d in docs]  # deterministic ids: re-indexing overwrites


def test_converter_reports_bad_sources_in_both_modes(tmp_path: Path) -> None:
    make_truncated_pdf(tmp_path / "bad.pdf")
    (tmp_path / "x.docx").write_bytes(b"PK")
    make_image(tmp_path / "ok.png")
    sources = ["ok.png", "bad.pdf", "x.docx", "missing.png", "../outside.png"]
    with pytest.raises(ConversionError) as info:
        MultimodalFileToDocument(root_path=str(tmp_path)).run(sources=sources)
    message = str(info.value)
    for fragment in ("bad.pdf", "x.docx", "missing.png", "outside root_path"):
        assert fragment in message
    out = MultimodalFileToDocument(root_path=str(tmp_path), on_error="skip").run(sources=sources)
    assert len(out["documents"]) == 1
    assert len(out["failed_sources"]) == 4
