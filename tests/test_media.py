"""The one pixel/PDF loader: what every model sees, and how bad paths and files are named."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pypdfium2 as pdfium
import pytest
from haystack import Document
from haystack.dataclasses import ByteStream
from PIL import Image, ImageDraw

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs.media import (
    MAX_ASPECT_RATIO,
    MediaLocation,
    classify,
    decode_image_bytes,
    image_page_count,
    load_document_image,
    load_image,
    load_images,
    locate,
    normalize_image,
    pad_to_aspect_ratio,
    pdf_page_count,
    probe,
    resolve_path,
)
from tests.helpers import make_pdf, make_tiff

WHITE = (255, 255, 255)


def _transparent_chart(mode: str = "RGBA") -> Image.Image:
    """A chart exported with a transparent background: a blue bar on fully transparent black pixels."""
    img = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle([10, 10, 30, 35], fill=(0, 0, 255, 255))
    if mode == "P":
        return img.convert("P")  # keeps a transparency index in img.info
    if mode == "LA":
        return img.convert("LA")
    return img


def _qwen2_vl_processor():  # type: ignore[no-untyped-def]
    # The processor that refuses aspect ratios over 200 (transformers models/qwen2_vl/image_processing_qwen2_vl.py,
    # smart_resize); built with its class defaults, nothing downloaded.
    processing = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    return processing.Qwen2VLImageProcessor()


def _encrypted_pdf(path: Path) -> Path:
    pypdf = pytest.importorskip("pypdf")
    plain = make_pdf(path.with_name("plain_" + path.name), pages=1)
    writer = pypdf.PdfWriter()
    writer.append(str(plain))
    writer.encrypt("secret", algorithm="RC4-128")
    writer.write(str(path))
    return path


def _zero_page_pdf(path: Path) -> Path:
    buffer = io.BytesIO()
    pdfium.PdfDocument.new().save(buffer)
    path.write_bytes(buffer.getvalue())
    return path


# --- pixels ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_transparent_png_is_composited_onto_white_not_black(tmp_path: Path, mode: str) -> None:
    chart = _transparent_chart(mode)
    chart.save(tmp_path / "chart.png")
    assert chart.convert("RGB").getpixel((2, 2)) == (0, 0, 0)  # what a bare convert("RGB") gave before
    doc = Document(meta={"file_path": "chart.png"})
    image = load_document_image(doc, "image", root_path=tmp_path)
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == WHITE
    bar = image.getpixel((20, 20))
    if mode == "LA":
        assert bar[0] == bar[1] == bar[2] < 60  # grey-scale blue: dark, not white
    else:
        assert bar == (0, 0, 255)


def test_transparent_image_bytes_are_composited_onto_white_too() -> None:
    buffer = io.BytesIO()
    _transparent_chart().save(buffer, format="PNG")
    image = decode_image_bytes(buffer.getvalue(), label="image part 1")
    assert image.getpixel((2, 2)) == WHITE


def test_exif_rotated_jpeg_is_loaded_upright(tmp_path: Path) -> None:
    upright = Image.new("RGB", (40, 80), (0, 0, 255))
    ImageDraw.Draw(upright).rectangle([0, 0, 39, 19], fill=(255, 0, 0))  # red band at the top
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes: pixels sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and EXIF Orientation 6: "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "photo.jpg") as raw:
        assert raw.size == (80, 40)
    image = load_document_image(Document(meta={"file_path": "photo.jpg"}), "image", root_path=tmp_path)
    assert image.size == (40, 80)
    top, bottom = image.getpixel((20, 5)), image.getpixel((20, 75))
    assert (top[0] > 200, top[2] < 60) == (True, True)  # red on top
    assert (bottom[2] > 200, bottom[0] < 60) == (True, True)  # blue below


@pytest.mark.parametrize("size", [(1600, 6), (6, 1600), (201, 1)])
def test_extreme_aspect_ratio_is_padded_with_white_and_accepted_by_a_qwen_processor(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    Image.new("RGB", size, (255, 0, 0)).save(tmp_path / "banner.png")
    processor = _qwen2_vl_processor()
    with Image.open(tmp_path / "banner.png") as raw, pytest.raises(ValueError, match="aspect ratio"):
        processor(images=[raw.convert("RGB")], return_tensors="pt")

    source = locate(Document(meta={"file_path": "banner.png"}), "image", root_path=tmp_path)
    image = load_image(source)
    long_side, short_side = max(image.size), min(image.size)
    assert long_side == max(size)
    assert long_side / short_side <= MAX_ASPECT_RATIO
    assert long_side / (short_side - 1) > MAX_ASPECT_RATIO  # padded only as far as needed
    # The original pixels are kept, centred; the padding is white.
    centre = (image.width // 2, image.height // 2)
    assert image.getpixel(centre) == (255, 0, 0)
    assert image.getpixel((0, 0)) == WHITE
    out = processor(images=[image], return_tensors="pt")
    assert out["pixel_values"].shape[0] > 0


def test_extreme_aspect_ratio_survives_shrinking_into_a_box(tmp_path: Path) -> None:
    Image.new("RGB", (1600, 6), (255, 0, 0)).save(tmp_path / "banner.png")
    image = load_document_image(Document(meta={"file_path": "banner.png"}), "image", root_path=tmp_path, fit=(512, 512))
    assert max(image.size) / min(image.size) <= MAX_ASPECT_RATIO


def test_extreme_aspect_ratio_pdf_page_is_padded(tmp_path: Path) -> None:
    make_pdf(tmp_path / "strip.pdf", pages=1, size=(1600, 6))
    image = load_document_image(Document(meta={"file_path": "strip.pdf", "page_number": 1}), "page", root_path=tmp_path)
    assert max(image.size) / min(image.size) <= MAX_ASPECT_RATIO


def test_aspect_ratio_that_cannot_be_padded_within_the_bomb_limit_is_a_named_failure(tmp_path: Path) -> None:
    Image.new("RGB", (100_000, 1), (0, 0, 0)).save(tmp_path / "strip.png")
    source = locate(Document(meta={"file_path": "strip.png"}), "image", root_path=tmp_path)
    with pytest.raises(MediaError, match=r"strip\.png.*100000x1.*decompression-bomb"):
        load_image(source)


def test_ordinary_images_are_not_padded() -> None:
    image = Image.new("RGB", (100, 1), (1, 2, 3))
    assert pad_to_aspect_ratio(image) is image
    assert normalize_image(image).size == (100, 1)


def test_decompression_bomb_limit_stays_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    source = locate(Document(meta={"file_path": "big.png"}), "image", root_path=tmp_path)
    with pytest.raises(MediaError, match="decompression-bomb"):
        probe(source)
    with pytest.raises(MediaError, match="decompression-bomb"):
        decode_image_bytes((tmp_path / "big.png").read_bytes(), label="part 1")


@pytest.mark.parametrize(("data", "reason"), [(b"", "empty"), (b"not an image" * 8, "cannot identify")])
def test_unreadable_image_bytes_are_a_named_failure(data: bytes, reason: str) -> None:
    with pytest.raises(MediaError, match=f"image part 3.*{reason}|{reason}.*image part 3"):
        decode_image_bytes(data, label="part 3")


# --- malformed file paths ----------------------------------------------------------------------------------------

MALFORMED_PATHS = [
    pytest.param(12345, "must be a file path", id="int"),
    pytest.param(["a.png"], "must be a file path", id="list"),
    pytest.param(b"a.png", "must be a file path", id="bytes"),
    pytest.param("", "empty string", id="empty"),
    pytest.param("a\x00.png", "NUL byte", id="nul-byte"),
    pytest.param("x" * 300 + ".png", "255-byte limit", id="name-over-255-bytes"),
    pytest.param("d/" * 2100 + "a.png", "4096-byte path limit", id="path-over-4096-bytes"),
]


@pytest.mark.parametrize(("file_path", "reason"), MALFORMED_PATHS)
def test_malformed_file_path_is_a_named_media_error_in_classify_and_locate(
    tmp_path: Path, file_path: object, reason: str
) -> None:
    doc = Document(id="doc-7", meta={"file_path": file_path})
    for call in (
        lambda: classify(doc),
        lambda: locate(doc, "image", root_path=tmp_path),
        lambda: locate(doc, "image"),
    ):
        with pytest.raises(MediaError, match=reason) as info:
            call()
        assert "meta['file_path']" in str(info.value)


def test_malformed_path_is_named_with_the_documents_own_meta_key(tmp_path: Path) -> None:
    doc = Document(meta={"image_path": 7})
    with pytest.raises(MediaError, match=r"meta\['image_path'\] must be a file path"):
        classify(doc, file_path_meta_field="image_path")


@pytest.mark.parametrize("key", ["path", "filepath", "image"])
def test_a_file_path_under_another_meta_key_is_pointed_out(key: str) -> None:
    # Before: only "neither text content nor an image (no blob and no meta['file_path'])", leaving the user to
    # spot that their key is spelled differently.
    with pytest.raises(MediaError) as info:
        classify(Document(meta={key: "charts/q3.png", "title": "Q3 revenue"}))
    message = str(info.value)
    assert message.startswith("document has neither text content nor an image")
    assert f"meta['{key}'] looks like a file path: store it under meta['file_path'], or set file_path_meta_field" in (
        message
    )
    # Meta that names no image or PDF adds nothing.
    with pytest.raises(MediaError) as info:
        classify(Document(meta={"title": "no content", "source": "notes.txt"}))
    assert "looks like a file path" not in str(info.value)


def test_a_url_or_a_non_string_meta_key_gets_no_file_path_hint() -> None:
    # The loader reads local files only: moving a URL to meta['file_path'] would fail again, so it is not suggested.
    with pytest.raises(MediaError) as info:
        classify(Document(meta={"url": "https://example.com/charts/q3.png"}))
    assert "looks like a file path" not in str(info.value)
    # A non-string key (possible with an explicit id) is skipped: sorting it with str keys raised a TypeError, which
    # escaped the on_error="skip" handling that expects a MediaError.
    with pytest.raises(MediaError, match=r"meta\['path'\] looks like a file path"):
        classify(Document(id="d1", meta={1: "a.png", "path": "b.png"}))


def test_symlink_loop_is_a_named_media_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    doc = Document(meta={"file_path": "a.png"})
    with pytest.raises(MediaError, match=r"'a\.png' cannot be resolved"):
        locate(doc, "image", root_path=tmp_path)


def test_symlink_escaping_root_path_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    outside.mkdir()
    root.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    with pytest.raises(MediaError, match="outside root_path"):
        resolve_path("link.png", root)


# --- PDFs --------------------------------------------------------------------------------------------------------


def test_zero_page_pdf_is_named_as_having_no_pages(tmp_path: Path) -> None:
    pdf = _zero_page_pdf(tmp_path / "empty.pdf")
    with pytest.raises(MediaError, match=r"empty\.pdf.*no pages") as info:
        pdf_page_count(pdf)
    assert "Success" not in str(info.value)


def test_each_pdf_failure_is_its_own_not_the_previous_pdfs(tmp_path: Path) -> None:
    encrypted = _encrypted_pdf(tmp_path / "locked.pdf")
    zero = _zero_page_pdf(tmp_path / "empty.pdf")
    with pytest.raises(MediaError, match="encrypted and needs a password"):
        pdf_page_count(encrypted)
    # pdfium's last-error code is still "password" here; the zero-page PDF must not inherit it.
    with pytest.raises(MediaError) as info:
        pdf_page_count(zero)
    assert "no pages" in str(info.value)
    assert "password" not in str(info.value)
    blob = Document(blob=ByteStream(zero.read_bytes(), mime_type="application/pdf"), meta={"page_number": 1})
    with pytest.raises(MediaError, match=r"blob.*no pages"):
        probe(locate(blob, "page"))


def test_not_a_pdf_is_named_as_corrupt(tmp_path: Path) -> None:
    (tmp_path / "fake.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    with pytest.raises(MediaError, match=r"fake\.pdf.*not a PDF or it is corrupt"):
        pdf_page_count(tmp_path / "fake.pdf")


# --- Haystack's own documents ------------------------------------------------------------------------------------


def test_haystack_pdf_chunks_are_text_not_page_images(tmp_path: Path) -> None:
    pytest.importorskip("pypdf")
    from haystack.components.converters import PyPDFToDocument
    from haystack.components.preprocessors import DocumentSplitter

    pdf = _text_pdf(tmp_path / "report.pdf")
    converted = PyPDFToDocument().run(sources=[pdf])["documents"]
    chunks = DocumentSplitter(split_by="word", split_length=5, split_overlap=0).run(documents=converted)["documents"]
    assert len(chunks) >= 2
    assert all(c.meta.get("file_path") == "report.pdf" for c in chunks)  # store_full_path=False: the name only
    assert all(c.meta.get("page_number") == 1 for c in chunks)
    assert [classify(c) for c in chunks] == ["text"] * len(chunks)


def test_bare_file_name_without_root_path_says_how_to_fix_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    doc = Document(meta={"file_path": "report.pdf", "page_number": 1, "modality": "page"})
    with pytest.raises(MediaError, match=r"store_full_path=False.*set root_path"):
        locate(doc, "page")
    make_pdf(tmp_path / "files" / "report.pdf", pages=1)
    assert locate(doc, "page", root_path=tmp_path / "files").path == (tmp_path / "files" / "report.pdf").resolve()


def _text_pdf(path: Path) -> Path:
    """A one-page PDF with real text (pypdf extracts it), written by hand: Pillow's PDFs hold only images."""
    stream = b"BT /F1 12 Tf 20 100 Td (Revenue grew eighteen percent in the third quarter of the year) Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 600 200] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    ramp = (np.arange(256 * 4, dtype=np.uint32).reshape(4, 256) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "scan.png")
    with Image.open(tmp_path / "scan.png") as raw:
        assert raw.mode == "I;16"
        assert np.asarray(raw.convert("RGB"))[2, 128, 0] == 255  # what a bare convert("RGB") gives: clipped
    image = load_document_image(Document(meta={"file_path": "scan.png"}), "image", root_path=tmp_path)
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    expected = np.clip(np.rint(ramp / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected)
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_the_old_page_modality_name_is_read_as_page_with_a_visible_warning(tmp_path: Path) -> None:
    import warnings

    from haystack_integrations.common.multimodal_rag.inputs.media import modality_of

    pdf = make_pdf(tmp_path / "r.pdf", pages=1)
    doc = Document(meta={"modality": "document", "file_path": str(pdf)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # record everything; the category must be the one Python shows by default
        assert modality_of(doc) == "page"
    assert [w.category for w in caught] == [FutureWarning]
    assert "'page'" in str(caught[0].message)


@pytest.mark.parametrize("page_number", [0, -1, "0"])
def test_a_page_number_below_one_says_page_numbers_are_one_based(tmp_path: Path, page_number: object) -> None:
    make_pdf(tmp_path / "one.pdf", pages=1)
    document = Document(meta={"file_path": "one.pdf", "page_number": page_number})
    with pytest.raises(MediaError, match=r"meta\['page_number'\] must be >= 1 \(page numbers are 1-based"):
        load_document_image(document, "page", root_path=tmp_path)


# --- Multi-page TIFF scans ----------------------------------------------------------------------------------------


def _center(image: Image.Image) -> tuple[int, ...]:
    return image.getpixel((image.width // 2, image.height // 2))


def test_a_multi_page_tiff_shows_the_page_its_page_number_names(tmp_path: Path) -> None:
    scan = make_tiff(tmp_path / "scan.tif")
    for page, color in ((1, (255, 0, 0)), (2, (0, 128, 0)), (3, (0, 0, 255))):
        doc = Document(meta={"file_path": str(scan), "page_number": page})
        assert _center(load_document_image(doc, "image")) == color
    # From a blob too, and without a page number: the first page, as before.
    blob = Document(blob=ByteStream(scan.read_bytes(), mime_type="image/tiff"), meta={"page_number": 3})
    assert _center(load_document_image(blob, "image")) == (0, 0, 255)
    assert _center(load_document_image(Document(meta={"file_path": str(scan)}), "image")) == (255, 0, 0)


def test_a_tiff_page_beyond_the_last_is_a_named_error_in_probe_and_load(tmp_path: Path) -> None:
    scan = make_tiff(tmp_path / "scan.tif")
    source = locate(Document(meta={"file_path": str(scan), "page_number": 4}), "image")
    for check in (lambda: probe(source, decode=False), lambda: probe(source), lambda: load_image(source)):
        # Anchored: the page error is not dressed up as "image ... is corrupt or truncated: page_number 4 ...".
        with pytest.raises(MediaError, match=r"^page_number 4 is beyond image .*scan\.tif.*3 page\(s\)"):
            check()


def test_a_truncated_multi_page_tiff_is_a_named_media_error_not_a_pillow_type_error(tmp_path: Path) -> None:
    # Cut in the middle, the chain of page headers ends in a page without its tags: Pillow's TIFF reader raises
    # TypeError("Missing dimensions") while counting or seeking the pages.
    data = make_tiff(tmp_path / "scan.tif").read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"cut\.tif' is corrupt or truncated"):
        image_page_count(cut)

    def source(page: int) -> MediaLocation:
        return locate(Document(meta={"file_path": str(cut), "page_number": page}), "image")

    load_image(source(1)).close()  # the pages before the damage still load
    with pytest.raises(MediaError, match=r"cut\.tif'.* corrupt or truncated"):
        load_image(source(2))  # its pixels were cut off: found when decoded
    for check in (lambda: probe(source(3), decode=False), lambda: probe(source(3)), lambda: load_image(source(3))):
        with pytest.raises(MediaError, match=r"cut\.tif'.* corrupt or truncated"):
            check()  # its header is gone: found before decoding


def test_a_page_number_on_a_one_page_image_or_an_animation_picks_nothing(tmp_path: Path) -> None:
    # A figure cut out of page 5 of a PDF keeps page_number 5; an animation's frames are not pages.
    png = tmp_path / "figure.png"
    Image.new("RGB", (30, 20), "red").save(png)
    for value in (5, "iv", 0):
        assert _center(load_document_image(Document(meta={"file_path": str(png), "page_number": value}), "image")) == (
            255,
            0,
            0,
        )
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (30, 20), color) for color in ("red", "blue")]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    assert _center(load_document_image(Document(meta={"file_path": str(gif), "page_number": 2}), "image")) == (
        255,
        0,
        0,
    )
    assert image_page_count(gif) == 1
    assert image_page_count(png) == 1
    assert image_page_count(make_tiff(tmp_path / "scan.tiff", colors=("red", "blue"))) == 2


def _tiff_cut_inside_page_3(path: Path) -> Path:
    """A 3-page TIFF cut off in the middle of page 3's directory (IFD): pages 1 and 2 are intact."""
    data = make_tiff(path).read_bytes()
    with Image.open(path) as img:
        img.seek(2)
        third = img._frame_pos[2]  # the byte offset of page 3's directory
    path.write_bytes(data[: third + 10])
    return path


def test_a_tiff_damaged_after_page_2_serves_pages_1_and_2_and_names_page_3(tmp_path: Path) -> None:
    # Pillow raises a bare TypeError("Missing dimensions") for the cut directory; counting the pages before every
    # seek made pages 1 and 2 fail with it too, and the converter and the embedders' on_error="skip" let it through.
    scan = _tiff_cut_inside_page_3(tmp_path / "scan.tif")
    for page, color in ((1, (255, 0, 0)), (2, (0, 128, 0))):
        assert _center(load_document_image(Document(meta={"file_path": str(scan), "page_number": page}), "image")) == (
            color
        )
    source = locate(Document(meta={"file_path": str(scan), "page_number": 3}), "image")
    for check in (lambda: probe(source, decode=False), lambda: load_image(source)):
        with pytest.raises(MediaError, match=r"page 3 of image .*scan\.tif.* corrupt or truncated"):
            check()
    with pytest.raises(MediaError, match=r"scan\.tif.* corrupt or truncated"):
        image_page_count(scan)


@pytest.mark.parametrize("value", [2.0, "two", 0, -1, True, [2]])
def test_an_unusable_page_number_on_a_multi_page_tiff_is_named_not_read_as_page_1(tmp_path: Path, value: Any) -> None:
    # A store that returns numbers as floats gives page_number 2.0: showing page 1 under it would index the wrong
    # page. On a one-page image the same value is someone else's meta and stays ignored.
    scan = make_tiff(tmp_path / "scan.tif")
    for doc in (
        Document(meta={"file_path": str(scan), "page_number": value}),
        Document(blob=ByteStream(scan.read_bytes(), mime_type="image/tiff"), meta={"page_number": value}),
    ):
        source = locate(doc, "image")
        for check in (lambda s=source: probe(s, decode=False), lambda s=source: load_image(s)):
            with pytest.raises(MediaError, match=r"meta\['page_number'\] must be .*it picks the page of multi-page"):
                check()
    single = make_tiff(tmp_path / "single.tif", colors=("red",))
    doc = Document(meta={"file_path": str(single), "page_number": value})
    assert _center(load_document_image(doc, "image")) == (255, 0, 0)


def test_probe_without_decoding_names_a_tiff_page_error_without_calling_the_file_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan = tmp_path / "scan.tif"
    pages = [Image.new("RGB", (10, 10), "red"), Image.new("RGB", (100, 100), "blue")]
    pages[0].save(scan, save_all=True, append_images=pages[1:])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)  # page 2 only is over the limit
    for page, start in ((2, "image '"), (3, "page_number 3 is beyond image")):
        source = locate(Document(meta={"file_path": str(scan), "page_number": page}), "image")
        with pytest.raises(MediaError) as info:
            probe(source, decode=False)
        assert str(info.value).startswith(start)
        assert "corrupt" not in str(info.value)


def _page_source(scan: Path, page: int | None) -> MediaLocation:
    return MediaLocation(document_id=f"p{page}", modality="image", path=scan, page_number=page, label=f"'{scan}'")


def _same(a: Image.Image | MediaError, b: Image.Image | MediaError) -> bool:
    if isinstance(a, MediaError) or isinstance(b, MediaError):
        return type(a) is type(b) and str(a) == str(b)
    return a.size == b.size and a.tobytes() == b.tobytes()


def test_pages_of_one_tiff_in_a_batch_decode_as_each_alone(tmp_path: Path) -> None:
    colors = ("red", "green", "blue", "yellow", "purple", "orange")
    scan = make_tiff(tmp_path / "scan.tif", colors=colors)
    other = make_tiff(tmp_path / "other.tif", colors=("white", "black"))
    pages = [5, 2, None, 6, 2, 1, 9, 3]  # out of order, a duplicate, no page_number, one beyond the last
    sources = [_page_source(scan, p) for p in pages] + [_page_source(other, 2), _page_source(other, 1)]
    batch = load_images(sources)
    for source, got in zip(sources, batch, strict=True):
        alone = load_images([source])[0]
        assert _same(got, alone), source
    assert isinstance(batch[6], MediaError)
    assert "page_number 9 is beyond image" in str(batch[6])
    assert _center(batch[0]) == (128, 0, 128)  # type: ignore[arg-type]  # page 5: purple
    assert _center(batch[8]) == (0, 0, 0)  # type: ignore[arg-type]  # other.tif page 2: black


def test_a_damaged_tiff_in_a_batch_fails_the_same_pages_with_the_same_messages(tmp_path: Path) -> None:
    scan = _tiff_cut_inside_page_3(tmp_path / "scan.tif")
    sources = [_page_source(scan, p) for p in (3, 1, 2, 3, 4)]
    batch = load_images(sources)
    assert [isinstance(r, MediaError) for r in batch] == [True, False, False, True, True]
    for source, got in zip(sources, batch, strict=True):
        assert _same(got, load_images([source])[0]), source


def test_the_pages_of_one_tiff_in_a_batch_walk_its_directories_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loading pages 1..n of an n-page scan each from a freshly opened file walked n^2/2 page directories (a
    # 5000-page scan took ~15 min); a batch now opens the file once and walks on from page to page.
    from PIL import TiffImagePlugin

    from haystack_integrations.common.multimodal_rag.inputs import media

    scan = make_tiff(tmp_path / "scan.tif", colors=("red", "green", "blue", "yellow", "purple", "orange", "white"))
    seeks: list[int] = []
    real_seek = TiffImagePlugin.TiffImageFile.seek

    def counting_seek(self: Any, frame: int) -> None:
        seeks.append(frame)
        real_seek(self, frame)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "seek", counting_seek)
    sources = [_page_source(scan, p) for p in range(7, 0, -1)]
    # One decoding thread: one run, one step per page (21 steps when each page walked from page 1).
    monkeypatch.setattr(media, "DECODE_THREADS", 1)
    assert not any(isinstance(r, MediaError) for r in load_images(sources))
    assert len(seeks) == 6
    # Two threads: two runs of consecutive pages (1-4, 5-7), each walking from page 1 to its first page.
    seeks.clear()
    monkeypatch.setattr(media, "DECODE_THREADS", 2)
    assert not any(isinstance(r, MediaError) for r in load_images(sources))
    assert len(seeks) == 3 + 6
