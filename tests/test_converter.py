from __future__ import annotations

import io
import logging
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from PIL import Image

from haystack_integrations.common.multimodal_rag.errors import ConversionError
from haystack_integrations.components.converters.multimodal import MultimodalFileToDocument
from tests.helpers import make_image, make_pdf, make_tiff, make_truncated_pdf


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


@pytest.mark.parametrize("sources", ["."], ids=["str"])
def test_converter_refuses_a_string_instead_of_a_list(tmp_path: Path, sources: object) -> None:
    make_image(tmp_path / "a.png")
    converter = MultimodalFileToDocument(root_path=str(tmp_path), on_error="skip")
    with pytest.raises(TypeError, match=r"sources must be a list.*got a str.*sources=\['\.'\]"):
        converter.run(sources=sources)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got a PosixPath"):
        converter.run(sources=tmp_path)  # type: ignore[arg-type]


def test_converter_refuses_an_empty_path_instead_of_reading_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "a.png")
    with pytest.raises(ConversionError, match="source 0 is an empty string"):
        MultimodalFileToDocument().run(sources=[""])
    out = MultimodalFileToDocument(on_error="skip").run(sources=["", "a.png"])
    assert len(out["documents"]) == 1
    assert out["failed_sources"] == [{"source": "", "reason": "source 0 is an empty string, not a file path"}]


@pytest.mark.parametrize(
    ("source", "reason"),
    [(7, "source 0 must be a file path"), ("a\x00.png", "NUL byte"), ("n" * 300 + ".png", "255-byte limit")],
    ids=["int", "nul-byte", "long-name"],
)
def test_converter_names_malformed_sources(tmp_path: Path, source: object, reason: str) -> None:
    out = MultimodalFileToDocument(root_path=str(tmp_path), on_error="skip").run(sources=[source])  # type: ignore[list-item]
    assert out["documents"] == []
    assert len(out["failed_sources"]) == 1
    assert reason in out["failed_sources"][0]["reason"]


def test_converter_warns_about_an_empty_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.bin").write_bytes(b"\x00")
    with caplog.at_level(logging.WARNING):
        out = MultimodalFileToDocument(root_path=str(tmp_path)).run(sources=["empty", "other"])
    assert out == {"documents": [], "failed_sources": []}
    assert "directory 'empty' holds no image, PDF or text file" in caplog.text
    assert "directory 'other' holds no image, PDF or text file" in caplog.text


def test_symlink_inside_an_expanded_directory_is_refused_when_it_leaves_root_path(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    make_image(outside / "secret.png")
    make_image(root / "docs" / "ok.png")
    make_image(root / "inside.png")
    (root / "docs" / "leak.png").symlink_to(outside / "secret.png")
    (root / "docs" / "alias.png").symlink_to(root / "inside.png")  # a link that stays inside is fine
    with pytest.raises(ConversionError, match=r"docs/leak\.png' is a symlink to .*outside root_path"):
        MultimodalFileToDocument(root_path=str(root)).run(sources=["docs"])
    out = MultimodalFileToDocument(root_path=str(root), on_error="skip").run(sources=["docs"])
    assert sorted(d.meta["file_path"] for d in out["documents"]) == ["docs/alias.png", "docs/ok.png"]
    assert [f["source"] for f in out["failed_sources"]] == [str(root.resolve() / "docs" / "leak.png")]
    # Named directly, the same link is refused by the same rule.
    named = MultimodalFileToDocument(root_path=str(root), on_error="skip").run(sources=["docs/leak.png"])
    assert "outside root_path" in named["failed_sources"][0]["reason"]


def test_zero_page_and_encrypted_pdfs_each_get_their_own_reason(tmp_path: Path) -> None:
    pypdf = pytest.importorskip("pypdf")
    make_pdf(tmp_path / "plain.pdf", pages=1)
    writer = pypdf.PdfWriter()
    writer.append(str(tmp_path / "plain.pdf"))
    writer.encrypt("secret", algorithm="RC4-128")
    writer.write(str(tmp_path / "a_locked.pdf"))
    buffer = io.BytesIO()
    pdfium.PdfDocument.new().save(buffer)
    (tmp_path / "b_empty.pdf").write_bytes(buffer.getvalue())
    out = MultimodalFileToDocument(root_path=str(tmp_path), on_error="skip").run(
        sources=["a_locked.pdf", "b_empty.pdf", "plain.pdf"]
    )
    assert [d.meta["file_path"] for d in out["documents"]] == ["plain.pdf"]
    reasons = {Path(f["source"]).name: f["reason"] for f in out["failed_sources"]}
    assert "encrypted and needs a password" in reasons["a_locked.pdf"]
    assert "has no pages" in reasons["b_empty.pdf"]
    assert "password" not in reasons["b_empty.pdf"]
    assert "Success" not in reasons["b_empty.pdf"]


def test_a_truncated_multi_page_tiff_is_a_failed_source_not_an_exception(tmp_path: Path) -> None:
    data = make_tiff(tmp_path / "scan.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    out = MultimodalFileToDocument(root_path=str(tmp_path), on_error="skip").run(sources=["cut.tif", "scan.tif"])
    assert [d.meta["page_number"] for d in out["documents"]] == [1, 2, 3]
    assert len(out["failed_sources"]) == 1
    assert "cut.tif' is corrupt or truncated" in out["failed_sources"][0]["reason"]
    with pytest.raises(ConversionError, match=r"cut\.tif"):
        MultimodalFileToDocument(root_path=str(tmp_path)).run(sources=["cut.tif"])


def test_a_multi_page_tiff_scan_becomes_one_image_document_per_page(tmp_path: Path) -> None:
    make_tiff(tmp_path / "scan.tif")
    make_tiff(tmp_path / "single.tiff", colors=("white",))
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\xff" * 20)
    converter = MultimodalFileToDocument(root_path=str(tmp_path), on_error="skip")
    out = converter.run(sources=["scan.tif", "single.tiff", "broken.tif"])
    docs = out["documents"]
    assert [(d.meta["modality"], d.meta["file_path"], d.meta.get("page_number")) for d in docs] == [
        ("image", "scan.tif", 1),
        ("image", "scan.tif", 2),
        ("image", "scan.tif", 3),
        ("image", "single.tiff", None),  # one page: exactly as before
    ]
    assert len({d.id for d in docs}) == 4
    assert [f["source"] for f in out["failed_sources"]] == [str(tmp_path / "broken.tif")]


def test_a_tiff_with_a_damaged_page_directory_is_a_failed_source_not_a_crash(tmp_path: Path) -> None:
    scan = make_tiff(tmp_path / "scan.tif")
    with Image.open(scan) as img:
        img.seek(2)
        third = img._frame_pos[2]  # the byte offset of page 3's directory
    scan.write_bytes(scan.read_bytes()[: third + 10])
    make_tiff(tmp_path / "good.tif")
    out = MultimodalFileToDocument(on_error="skip").run(sources=[tmp_path / "scan.tif", tmp_path / "good.tif"])
    assert [d.meta["page_number"] for d in out["documents"]] == [1, 2, 3]  # good.tif
    assert [f["source"] for f in out["failed_sources"]] == [str(scan)]
    assert "corrupt or truncated" in out["failed_sources"][0]["reason"]
