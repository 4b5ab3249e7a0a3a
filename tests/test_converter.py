from __future__ import annotations

from pathlib import Path

import pytest

from haystack_integrations.common.multimodal_rag.errors import ConversionError
from haystack_integrations.components.converters.multimodal import MultimodalFileToDocument
from tests.helpers import make_image, make_pdf, make_truncated_pdf


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
