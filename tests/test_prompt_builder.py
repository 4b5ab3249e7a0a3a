from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import pytest
from haystack import Document, Pipeline
from haystack.dataclasses import ImageContent
from PIL import Image

from haystack_integrations.components.builders.multimodal import MultimodalChatPromptBuilder
from tests.helpers import make_corrupt_image, make_image, make_pdf


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
