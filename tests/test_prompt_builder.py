from __future__ import annotations

import base64
import io
import logging
import os
from pathlib import Path

import pytest
from haystack import Document, Pipeline
from haystack.dataclasses import ImageContent
from PIL import Image

from haystack_integrations.components.builders.multimodal import MultimodalChatPromptBuilder, chat_prompt_builder
from tests.helpers import make_corrupt_image, make_image, make_pdf, make_tiff


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


def test_builder_numbers_text_and_images_and_maps_citations(
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

    sources = {s["document_id"]: s for s in out["citations"]}
    assert [s["document_id"] for s in out["citations"]] == [d.id for d in ranked]
    assert out["sources"] == out["citations"]  # the deprecated name, until 0.3
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


def test_builder_sends_each_page_of_a_multi_page_tiff_not_the_cached_first_one(tmp_path: Path) -> None:
    make_tiff(tmp_path / "scan.tif", colors=("red", "blue"))
    builder = MultimodalChatPromptBuilder(root_path=str(tmp_path))  # its image cache must key on the page
    colors = []
    for page in (1, 2, 1):
        doc = Document(meta={"file_path": "scan.tif", "page_number": page, "modality": "image"}, score=1.0)
        picture = _decode(builder.run(query="q", documents=[doc])["messages"][0].images[0]).convert("RGB")
        pixel = picture.getpixel((picture.width // 2, picture.height // 2))
        colors.append(max(range(3), key=lambda channel, pixel=pixel: pixel[channel]))  # JPEG: 254 is red too
    assert colors == [0, 2, 0]  # red, blue, red
    docs = [
        Document(meta={"file_path": "scan.tif", "page_number": page, "modality": "image"}, score=1.0 - page / 10)
        for page in (1, 2)
    ]
    texts = builder.run(query="q", documents=docs)["messages"][0].texts
    assert texts[:2] == ["[1] image scan.tif, page 1", "[2] image scan.tif, page 2"]  # the citation names the page
    figure = Document(meta={"file_path": "fig.png", "page_number": 5, "modality": "image"}, score=1.0)
    make_image(tmp_path / "fig.png")
    assert builder.run(query="q", documents=[figure])["messages"][0].texts[0] == "[1] image fig.png"  # not its own


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
        ({"image_size": 1024}, "image_size"),
        ({"image_size": "64x64"}, "image_size"),
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


def _spy_on_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every image the builder decodes (the real loader still runs)."""
    loaded: list[str] = []
    real = chat_prompt_builder.load_fitted_image

    def spy(source, **kwargs):  # type: ignore[no-untyped-def]
        loaded.append(source.label)
        return real(source, **kwargs)

    monkeypatch.setattr(chat_prompt_builder, "load_fitted_image", spy)
    return loaded


def test_builder_reuses_encoded_images_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image(tmp_path / "chart.png", size=(80, 60), color="blue")
    make_pdf(tmp_path / "r.pdf", pages=2)
    docs = [
        Document(id="img", meta={"modality": "image", "file_path": "chart.png"}, score=0.9),
        Document(id="page", meta={"modality": "page", "file_path": "r.pdf", "page_number": 2}, score=0.8),
    ]
    loaded = _spy_on_loads(monkeypatch)
    builder = MultimodalChatPromptBuilder(image_size=(64, 64), root_path=str(tmp_path))
    first = builder.run(query="q", documents=docs)["messages"][0].images
    second = builder.run(query="q", documents=docs)["messages"][0].images
    assert loaded == ["'chart.png'", "'r.pdf'"]  # decoded once, not per query
    assert [i.base64_image for i in first] == [i.base64_image for i in second]
    assert [i.meta for i in second] == [
        {"document_id": "img", "citation_number": 1, "source_number": 1},
        {"document_id": "page", "citation_number": 2, "source_number": 2},
    ]

    make_image(tmp_path / "chart.png", size=(80, 60), color="red")  # the file changes: its entry is stale
    stat = (tmp_path / "chart.png").stat()
    os.utime(tmp_path / "chart.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    third = builder.run(query="q", documents=docs)["messages"][0].images
    assert loaded == ["'chart.png'", "'r.pdf'", "'chart.png'"]
    red = _decode(third[0]).convert("RGB").getpixel((2, 2))
    assert red[0] > 200
    assert red[2] < 60


def test_builder_cache_is_bounded_and_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a", "b"):
        make_image(tmp_path / f"{name}.png")
    docs = [Document(meta={"modality": "image", "file_path": f"{n}.png"}, score=1.0) for n in ("a", "b")]
    loaded = _spy_on_loads(monkeypatch)
    off = MultimodalChatPromptBuilder(root_path=str(tmp_path), image_cache_size=0)
    off.run(query="q", documents=docs)
    off.run(query="q", documents=docs)
    assert len(loaded) == 4
    loaded.clear()
    one = MultimodalChatPromptBuilder(root_path=str(tmp_path), image_cache_size=1)
    one.run(query="q", documents=docs)
    one.run(query="q", documents=docs)
    assert len(loaded) == 4  # two images through a one-entry LRU: each evicts the other
    loaded.clear()
    one.run(query="q", documents=docs[:1])
    one.run(query="q", documents=docs[:1])
    assert len(loaded) == 1
    with pytest.raises(ValueError, match="image_cache_size"):
        MultimodalChatPromptBuilder(image_cache_size=-1)
    assert MultimodalChatPromptBuilder(image_cache_size=5).to_dict()["init_parameters"]["image_cache_size"] == 5


@pytest.mark.parametrize(
    ("file_path", "reason"),
    [(12345, "must be a file path"), ("a\x00.png", "NUL byte"), ("x" * 300 + ".png", "255-byte limit")],
    ids=["int", "nul-byte", "long-name"],
)
def test_builder_skips_a_malformed_file_path_and_keeps_going(
    tmp_path: Path, file_path: object, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_image(tmp_path / "ok.png")
    docs = [
        Document(id="bad", meta={"modality": "image", "file_path": file_path}, score=0.9),
        Document(id="good", meta={"modality": "image", "file_path": "ok.png"}, score=0.8),
        Document(id="text", content="Some text.", meta={"file_path": file_path}, score=0.7),
    ]
    with caplog.at_level(logging.WARNING):
        out = MultimodalChatPromptBuilder(max_images=1, root_path=str(tmp_path)).run(query="q", documents=docs)
    assert [i.meta["document_id"] for i in out["messages"][0].images] == ["good"]
    citations = {c["document_id"]: c for c in out["citations"]}
    assert citations["bad"]["included"] is False
    assert reason in citations["bad"]["skipped_reason"]
    assert citations["text"]["number"] == 2  # text with a malformed file_path is still text
    assert "'bad'" in caplog.text


def test_builder_images_are_upright_on_white_and_within_the_aspect_ratio_bound(tmp_path: Path) -> None:
    chart = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    chart.paste((0, 0, 255, 255), (10, 10, 30, 35))
    chart.save(tmp_path / "chart.png")
    Image.new("RGB", (1600, 6), (255, 0, 0)).save(tmp_path / "banner.png")
    docs = [
        Document(id="chart", meta={"modality": "image", "file_path": "chart.png"}, score=0.9),
        Document(id="banner", meta={"modality": "image", "file_path": "banner.png"}, score=0.8),
    ]
    out = MultimodalChatPromptBuilder(image_size=(800, 800), root_path=str(tmp_path)).run(query="q", documents=docs)
    chart_image, banner_image = (_decode(i).convert("RGB") for i in out["messages"][0].images)
    assert min(chart_image.getpixel((2, 2))) > 240  # white, not black
    assert max(banner_image.size) / min(banner_image.size) <= 100


def test_builder_template_still_receives_the_deprecated_variable_names(ranked: list[Document], tmp_path: Path) -> None:
    builder = MultimodalChatPromptBuilder(
        template="{% for s in text_sources %}{{ s.number }};{% endfor %}|{% for c in text_citations %}{{ c.number }};"
        "{% endfor %}",
        max_images=0,
        root_path=str(tmp_path),
    )
    assert builder.run(query="q", documents=ranked)["messages"][0].text == "1;2;|1;2;"
