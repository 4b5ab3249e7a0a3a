from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from haystack import Document, Pipeline
from PIL import Image, ImageDraw

from haystack_integrations.common.multimodal_rag.errors import DocumentProcessingError
from haystack_integrations.components.preprocessors.multimodal import PageQualityFilter
from tests.helpers import make_corrupt_image, make_pdf

PAGE = (600, 800)


def _blank(path: Path) -> Path:
    Image.new("RGB", PAGE, "white").save(path)
    return path


def _noisy_scan(path: Path, seed: int = 0) -> Path:
    # Slightly gray paper, scanner noise, and a few dust specks: what a scanned blank page looks like.
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(236, 6, size=(PAGE[1], PAGE[0])), 0, 255).astype(np.uint8)
    for y, x in rng.integers(0, min(PAGE), size=(6, 2)):
        pixels[y : y + 2, x : x + 2] = 40
    Image.fromarray(pixels, mode="L").save(path)
    return path


def _one_line_of_text(path: Path) -> Path:
    image = Image.new("RGB", PAGE, "white")
    ImageDraw.Draw(image).text((60, 100), "Quarterly revenue by region, 2026", fill="black")
    image.save(path)
    return path


def _chart(path: Path) -> Path:
    image = Image.new("RGBA", PAGE, "white")
    draw = ImageDraw.Draw(image)
    draw.line([(60, 700), (560, 700)], fill="black", width=3)
    for i, height in enumerate((200, 350, 120, 480)):
        draw.rectangle(
            [100 + i * 110, 700 - height, 170 + i * 110, 700], fill=("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")[i]
        )
    image.save(path)
    return path


def _pdf_with_invisible_text(path: Path, text: str = "Scanned invoice 4711 total 99.50 EUR") -> Path:
    # A one-page PDF whose only content is an invisible text layer (render mode 3, like OCR over a scan):
    # its pixels are blank but its text says what it holds.
    stream = f"BT /F1 12 Tf 3 Tr 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))
    return path


def _doc(path: Path, doc_id: str | None = None, **meta) -> Document:
    return Document(id=doc_id or path.stem, meta={"file_path": str(path), **meta})


@pytest.fixture
def pages(tmp_path: Path) -> dict[str, Document]:
    blank_pdf = tmp_path / "blank.pdf"
    Image.new("RGB", (200, 260), "white").save(blank_pdf, format="PDF")
    return {
        "blank": _doc(_blank(tmp_path / "blank.png")),
        "noisy_scan": _doc(_noisy_scan(tmp_path / "noisy_scan.png")),
        "blank_pdf_page": _doc(blank_pdf, "blank_pdf_page", page_number=1),
        "one_line": _doc(_one_line_of_text(tmp_path / "one_line.png")),
        "chart": _doc(_chart(tmp_path / "chart.png")),
        "invisible_text_pdf": _doc(
            _pdf_with_invisible_text(tmp_path / "invisible_text.pdf"), "invisible_text_pdf", page_number=1
        ),
        "text": Document(id="text", content="A text chunk passes through untouched."),
    }


def test_blank_and_noisy_pages_are_skipped_and_content_is_kept(pages: dict[str, Document]) -> None:
    out = PageQualityFilter(progress_bar=False).run(list(pages.values()))
    assert [d.id for d in out["documents"]] == ["one_line", "chart", "invisible_text_pdf", "text"]
    assert [d.id for d in out["skipped_documents"]] == ["blank", "noisy_scan", "blank_pdf_page"]
    assert out["failed_documents"] == []
    for doc in out["skipped_documents"]:
        assert doc.meta["skip_reason"].startswith("low-content page: ink coverage")
        assert doc.meta["page_quality"]["ink_coverage"] < 0.0005
    assert out["documents"][-1] is pages["text"]


def test_measured_values_are_recorded_on_every_page(pages: dict[str, Document]) -> None:
    out = PageQualityFilter(progress_bar=False).run(list(pages.values()))
    by_id = {d.id: d for d in out["documents"] + out["skipped_documents"]}
    assert by_id["blank"].meta["page_quality"] == {"ink_coverage": 0.0, "pixel_std": 0.0, "text_layer_chars": None}
    assert by_id["noisy_scan"].meta["page_quality"]["pixel_std"] > 3  # noise is there, but it is not ink
    assert by_id["one_line"].meta["page_quality"]["ink_coverage"] > 0.0005
    assert by_id["chart"].meta["page_quality"]["ink_coverage"] > 0.1
    assert by_id["invisible_text_pdf"].meta["page_quality"]["text_layer_chars"] == len(
        "Scannedinvoice4711total99.50EUR"
    )
    assert by_id["blank_pdf_page"].meta["page_quality"]["text_layer_chars"] == 0
    assert "page_quality" not in pages["chart"].meta  # inputs are not mutated


def test_without_the_text_rule_an_invisible_text_layer_does_not_save_a_blank_page(pages: dict[str, Document]) -> None:
    out = PageQualityFilter(min_text_chars=0, progress_bar=False).run([pages["invisible_text_pdf"]])
    assert [d.id for d in out["skipped_documents"]] == ["invisible_text_pdf"]


def test_a_corrupt_image_is_a_named_failure_not_a_skip(tmp_path: Path, pages: dict[str, Document]) -> None:
    broken = _doc(make_corrupt_image(tmp_path / "broken.png"))
    docs = [pages["chart"], broken, pages["blank"]]
    with pytest.raises(DocumentProcessingError, match="document 'broken'"):
        PageQualityFilter(progress_bar=False).run(docs)
    out = PageQualityFilter(on_error="skip", progress_bar=False).run(docs)
    assert [d.id for d in out["failed_documents"]] == ["broken"]
    assert out["failed_documents"][0].meta["embedding_error"]
    assert [d.id for d in out["documents"]] == ["chart"]
    assert [d.id for d in out["skipped_documents"]] == ["blank"]


def test_every_input_comes_back_in_exactly_one_output(tmp_path: Path, pages: dict[str, Document]) -> None:
    docs = [*pages.values(), _doc(make_corrupt_image(tmp_path / "bad.png")), Document(id="empty")]
    out = PageQualityFilter(on_error="skip", progress_bar=False).run(docs)
    returned = [d.id for key in ("documents", "skipped_documents", "failed_documents") for d in out[key]]
    assert sorted(returned) == sorted(d.id for d in docs)


def test_a_multi_page_pdf_is_judged_page_by_page(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "deck.pdf", pages=3, size=(200, 260))  # red, green, blue full-bleed pages
    docs = [_doc(pdf, page_number=n) for n in (1, 2, 3)]
    docs = [Document(id=f"p{n}", meta=d.meta) for n, d in enumerate(docs, start=1)]
    out = PageQualityFilter(progress_bar=False).run(docs)
    # A full-bleed colour page is uniform: its background is the colour, so it carries no ink.
    assert [d.id for d in out["skipped_documents"]] == ["p1", "p2", "p3"]


def test_yaml_round_trip_keeps_the_thresholds(tmp_path: Path) -> None:
    pipe = Pipeline()
    pipe.add_component(
        "quality", PageQualityFilter(min_ink_coverage=0.01, ink_threshold=30, root_path=str(tmp_path), on_error="skip")
    )
    restored = Pipeline.loads(pipe.dumps()).get_component("quality")
    assert (restored.min_ink_coverage, restored.ink_threshold, restored.root_path, restored.on_error) == (
        0.01,
        30,
        str(tmp_path),
        "skip",
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_ink_coverage": 2}, "min_ink_coverage"),
        ({"ink_threshold": 0}, "ink_threshold"),
        ({"min_text_chars": -1}, "min_text_chars"),
        ({"batch_size": 0}, "batch_size"),
        ({"on_error": "ignore"}, "on_error"),
    ],
)
def test_invalid_parameters_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PageQualityFilter(**kwargs)


def test_a_list_of_strings_is_refused() -> None:
    with pytest.raises(TypeError, match="list of Documents"):
        PageQualityFilter().run(["page.png"])  # type: ignore[list-item]


def test_each_page_of_a_multi_page_tiff_scan_is_judged_on_its_own(tmp_path: Path) -> None:
    # A blank cover page followed by a page of text: the text page must not inherit the cover's verdict.
    from haystack_integrations.components.converters.multimodal import MultimodalFileToDocument

    blank = Image.new("RGB", PAGE, "white")
    text = Image.open(_one_line_of_text(tmp_path / "text.png"))
    blank.save(tmp_path / "scan.tif", save_all=True, append_images=[text])
    docs = MultimodalFileToDocument(root_path=str(tmp_path)).run(sources=["scan.tif"])["documents"]
    out = PageQualityFilter(root_path=str(tmp_path), progress_bar=False).run(docs)
    assert [d.meta["page_number"] for d in out["skipped_documents"]] == [1]
    assert [d.meta["page_number"] for d in out["documents"]] == [2]
