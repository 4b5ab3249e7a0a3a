"""`load_images` batches: every position gives exactly what `load_images([that source])` gives alone.

Probes of the multi-page TIFF runs (`_decode_pages`: one file's pages decoded by walking one opened image from page
to page) mixed with everything else a batch can hold, for 1, 2 and 8 decoding threads.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageFile

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs import media
from haystack_integrations.common.multimodal_rag.inputs.media import MediaLocation, load_images
from tests.helpers import make_pdf, make_tiff, make_truncated_image

THREADS = (1, 2, 8)


def _src(path: Path | None, page: int | None = None, *, data: bytes | None = None, **kw: Any) -> MediaLocation:
    label = kw.pop("label", f"'{path}'" if path is not None else "blob")
    return MediaLocation(
        document_id=f"{path}:{page}", modality=kw.pop("modality", "image"), path=path, data=data,
        page_number=page, label=label, **kw,
    )  # fmt: skip


def _outcome(result: Image.Image | MediaError) -> tuple[Any, ...]:
    if isinstance(result, MediaError):
        return ("error", type(result), str(result))
    return ("image", result.mode, result.size, result.tobytes())


def _alone(source: MediaLocation) -> tuple[Any, ...]:
    try:
        return _outcome(load_images([source])[0])
    except Exception as e:  # a bare exception escaping alone: the batch must raise it too
        return ("raise", type(e), str(e))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _check(sources: list[MediaLocation], monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Compare a batch with each source alone for every thread count; no file handle may stay open."""
    alone = [_alone(s) for s in sources]
    for threads in THREADS:
        monkeypatch.setattr(media, "DECODE_THREADS", threads)
        before = _open_fds()
        try:
            batch = load_images(sources)
        except Exception as e:
            raised = ("raise", type(e), str(e))
            assert raised in alone, (threads, raised)
        else:
            assert len(batch) == len(sources)
            for position, (got, want) in enumerate(zip(batch, alone, strict=True)):
                assert _outcome(got) == want, (threads, position, sources[position])
        assert _open_fds() <= before, threads
    return alone


# --- a hand-written TIFF writer, so that directories can be damaged precisely ----------------------------------------


def _write_tiff(path: Path, pages: list[dict[str, Any]]) -> Path:
    """
    Write an uncompressed grey-scale multi-page TIFF (little-endian); each page dict: `value` (grey level),
    `size` (w, h), `rows` (rows per strip), `listed` (how many strips the directory lists, default all),
    `beyond` (the first strip whose offset points past the end of the file), `orientation`, `drop` (tag ids left
    out), `extra` ({tag: (type, count, value)}).
    """
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    previous_next = 4  # where the offset of the next directory is written
    for page in pages:
        w, h = page.get("size", (40, 30))
        rows = page.get("rows", h)
        strips = -(-h // rows)
        pixels_at = len(out)
        offsets = [pixels_at + i * rows * w for i in range(strips)]
        offsets[page.get("beyond", strips) :] = [10**8] * (strips - page.get("beyond", strips))  # cut-off strips
        counts = [min(rows, h - i * rows) * w for i in range(strips)]
        listed = page.get("listed", strips)
        out += bytes([page["value"]]) * sum(counts[:listed])  # only the strips listed (a bomb stays small)
        arrays_at = len(out)
        out += struct.pack(f"<{listed}I", *offsets[:listed]) + struct.pack(f"<{listed}I", *counts[:listed])
        tags: dict[int, tuple[int, int, int]] = {
            256: (4, 1, w),
            257: (4, 1, h),
            258: (3, 1, 8),
            259: (3, 1, 1),
            262: (3, 1, 1),
            273: (4, listed, offsets[0] if listed == 1 else arrays_at),
            277: (3, 1, 1),
            278: (4, 1, rows),
            279: (4, listed, counts[0] if listed == 1 else arrays_at + 4 * listed),
        }
        if "orientation" in page:
            tags[274] = (3, 1, page["orientation"])
        for tag in page.get("drop", ()):
            tags.pop(tag, None)
        tags.update(page.get("extra", {}))
        if len(out) % 2:
            out += b"\x00"
        ifd_at = len(out)
        struct.pack_into("<I", out, previous_next, ifd_at)
        out += struct.pack("<H", len(tags))
        for tag in sorted(tags):
            kind, count, value = tags[tag]
            packed = struct.pack("<H", value) + b"\x00\x00" if kind == 3 and count == 1 else struct.pack("<I", value)
            out += struct.pack("<HHI", tag, kind, count) + packed
        previous_next = len(out)
        out += b"\x00\x00\x00\x00"
    path.write_bytes(bytes(out))
    return path


def _pages(n: int, **damage: dict[str, Any]) -> list[dict[str, Any]]:
    """n pages of grey levels 10, 20, ...; `damage={"3": {...}}` merges into page 3 (1-based)."""
    pages: list[dict[str, Any]] = [{"value": 10 * (k + 1)} for k in range(n)]
    for key, patch in damage.items():
        pages[int(key) - 1].update(patch)
    return pages


# --- scenarios ----------------------------------------------------------------------------------------------------


def test_an_exception_leaves_the_call_only_after_the_other_runs_closed_their_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bare exception from one run cancelled the runs not started but left those under way decoding (their file
    # open) after `load_images` had raised.
    import threading
    import time

    from PIL import TiffImagePlugin

    scan = make_tiff(tmp_path / "scan.tif", colors=("red", "green", "blue", "yellow", "white", "black"))
    raised, finished = threading.Event(), threading.Event()
    real_load = TiffImagePlugin.TiffImageFile.load

    def load(self: Any) -> Any:
        if self.tell() == 2:  # page 3, in the first run (pages 1-3)
            raised.set()
            raise TypeError("bad IFD")
        if self.tell() == 5:  # page 6, the end of the second run (pages 4-6)
            raised.wait(5)
            time.sleep(0.2)
            finished.set()
        return real_load(self)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", load)
    monkeypatch.setattr(media, "DECODE_THREADS", 2)
    before = _open_fds()
    with pytest.raises(TypeError, match="bad IFD"):
        load_images([_src(scan, p) for p in (1, 2, 3, 4, 5, 6)])
    assert finished.is_set() or not raised.is_set()
    assert _open_fds() <= before


def test_a_page_whose_directory_lists_too_few_strips_shows_no_pixels_of_the_page_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow decodes only the strips a directory lists, into the image buffer it keeps when the next page has the
    # same size and mode: a page walked to from the one before must not show that page's pixels where its own
    # strips are missing (alone, those rows are black).
    scan = _write_tiff(tmp_path / "scan.tif", _pages(4, **{"2": {"rows": 5}, "3": {"rows": 5, "listed": 2}}))
    alone = _check([_src(scan, p) for p in (1, 2, 3, 4)], monkeypatch)
    assert alone[2][0] == "image"


def test_a_truncated_page_with_load_truncated_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With ImageFile.LOAD_TRUNCATED_IMAGES (a setting users turn on for damaged collections) a truncated page is
    # decoded as far as its data goes; the rest must be what it is alone, not the page before.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    scan = _write_tiff(tmp_path / "scan.tif", _pages(3, **{"2": {"rows": 5}, "3": {"rows": 5, "beyond": 2}}))
    alone = _check([_src(scan, p) for p in (1, 2, 3)], monkeypatch)
    assert alone[2][0] == "image"


def test_sound_tiff_pages_in_every_order_with_duplicates_none_and_huge_page_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan = make_tiff(tmp_path / "scan.tif", colors=("red", "green", "blue", "yellow", "purple", "orange", "white"))
    pages = [7, None, 3, 3, 1, 2**40, 8, 6, None, 5, 4, 2, 1, 10**12, 7]
    _check([_src(scan, p) for p in pages], monkeypatch)


def test_compressed_tiff_pages_with_per_page_orientation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow 13 applies a TIFF page's EXIF orientation in place when it loads it: the walk must not carry one
    # page's orientation (or its rotated buffer) over to the next.
    scan = tmp_path / "rot.tif"
    frames = []
    for k, orientation in enumerate((6, 1, 3, 8, 6, 1)):
        frame = Image.new("RGB", (40, 20), (40 * k, 255 - 40 * k, 7))
        frame.paste((255, 255, 255), (0, 0, 10, 5))
        exif = Image.Exif()
        exif[0x0112] = orientation
        frame.encoderinfo = {"exif": exif}  # type: ignore[attr-defined]
        frames.append(frame)
    for compression in (None, "tiff_deflate"):
        kw: dict[str, Any] = {} if compression is None else {"compression": compression}
        frames[0].save(scan, save_all=True, append_images=frames[1:], tiffinfo={0x0112: 6}, **kw)
        _check([_src(scan, p) for p in (6, 1, 2, 2, 5, 3, 4, None, 1)], monkeypatch)


def test_tiff_pages_of_different_sizes_and_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "mixed.tif"
    frames = [
        Image.new("RGB", (40, 30), "red"),
        Image.new("L", (40, 30), 90),
        Image.new("I;16", (30, 40), 40000),
        Image.new("RGBA", (40, 30), (0, 0, 255, 0)),
        Image.new("1", (40, 30), 1),
        Image.new("RGB", (30, 40), "green"),
        Image.new("P", (40, 30), 3),
        Image.new("CMYK", (40, 30), (0, 255, 0, 0)),
    ]
    frames[0].save(scan, save_all=True, append_images=frames[1:])
    _check([_src(scan, p) for p in range(9, 0, -1)], monkeypatch)


def test_one_path_listed_as_images_of_every_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = tmp_path / "a.png"
    Image.new("RGBA", (30, 20), (255, 0, 0, 128)).save(png)
    gif = tmp_path / "anim.gif"
    gif_frames = [Image.new("P", (20, 20), k) for k in range(4)]
    gif_frames[0].save(gif, save_all=True, append_images=gif_frames[1:], transparency=0, duration=50, loop=0)
    apng = tmp_path / "anim.png"
    apng_frames = [Image.new("RGBA", (20, 20), (60 * k, 0, 0, 100 + 40 * k)) for k in range(4)]
    apng_frames[0].save(apng, save_all=True, append_images=apng_frames[1:], duration=50)
    one_page = tmp_path / "page5.tif"  # a page image cut out of a PDF, keeping the PDF's page_number
    Image.new("RGB", (30, 40), "blue").save(one_page, compression="tiff_deflate")
    one_page_raw = tmp_path / "page5_raw.tif"
    Image.new("RGB", (30, 40), "yellow").save(one_page_raw)
    jpeg = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 32), "green").save(jpeg, exif=exif)
    webp = tmp_path / "anim.webp"
    apng_frames[0].save(webp, save_all=True, append_images=apng_frames[1:], duration=50)
    sources = [
        _src(png), _src(png), _src(png, 2),
        _src(gif, 3), _src(gif, 1), _src(gif), _src(gif, 99),
        _src(apng, 2), _src(apng, None), _src(apng, 4),
        _src(one_page, 5), _src(one_page, 1), _src(one_page, None), _src(one_page, 5), _src(one_page, 2),
        _src(one_page_raw, 5), _src(one_page_raw, 5), _src(one_page_raw, 1),
        _src(jpeg), _src(jpeg, 3), _src(webp, 2), _src(webp),
    ]  # fmt: skip
    _check(sources, monkeypatch)


def test_blobs_symlinks_pdf_pages_and_page_number_errors_in_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan = make_tiff(tmp_path / "scan.tif", colors=("red", "green", "blue", "yellow"))
    link = tmp_path / "link.tif"
    link.symlink_to(scan)
    pdf = make_pdf(tmp_path / "doc.pdf", pages=3)
    blob = scan.read_bytes()
    sources = [
        _src(scan, 3), _src(link, 3), _src(link, 1), _src(scan, 2),
        _src(None, 2, data=blob), _src(None, 4, data=blob), _src(scan, 4, data=blob),
        _src(pdf, 2, modality="page"), _src(pdf, 9, modality="page"), _src(scan, 1, modality="page"),
        _src(scan, None, page_number_error="meta['page_number'] 2.5 is not an integer"),
        _src(scan, 4), _src(scan, 1, label="other label"),
    ]  # fmt: skip
    _check(sources, monkeypatch)


def test_truncated_files_and_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truncated_png = make_truncated_image(tmp_path / "cut.png")
    scan = make_tiff(tmp_path / "scan.tif", colors=("red", "green", "blue", "yellow"))
    data = scan.read_bytes()
    cut = tmp_path / "cut.tif"
    for length in (len(data) - 5, len(data) * 3 // 4, len(data) // 2, 200, 9):
        cut.write_bytes(data[:length])
        sources = [_src(cut, p) for p in (4, 1, 2, 3, 2)]
        sources += [_src(truncated_png), _src(truncated_png, 2), _src(tmp_path / "gone.tif", 2)]
        sources += [_src(tmp_path / "gone.tif", 3), _src(tmp_path, 1), _src(tmp_path, 2)]
        _check(sources, monkeypatch)


@pytest.mark.parametrize(
    "damage",
    [
        {"drop": (256,)},  # no width: Pillow's TypeError("Missing dimensions") while seeking
        {"extra": {258: (3, 1, 7)}},  # 7 bits per sample: an unknown pixel mode
        {"extra": {259: (3, 1, 60000)}},  # an unknown compression
        {"extra": {273: (4, 1, 10**9)}},  # pixels beyond the end of the file
        {"extra": {262: (3, 1, 99)}},  # an unknown photometric interpretation
        {"size": (20000, 20000), "rows": 1, "listed": 2},  # over the decompression-bomb limit
        {"extra": {277: (3, 1, 0)}},  # no samples
        {"extra": {279: (4, 1, 0)}},  # an empty strip
    ],
    ids=["no-width", "bits", "compression", "pixels-beyond-eof", "photometric", "bomb", "no-samples", "empty-strip"],
)
@pytest.mark.parametrize("damaged_page", [1, 2, 3, 5, 6])
def test_a_damaged_directory_anywhere_in_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: dict[str, Any], damaged_page: int
) -> None:
    if damage.get("size") and damaged_page == 1:
        pytest.skip("page 1 over the limit is refused on opening, tested elsewhere")
    scan = _write_tiff(tmp_path / "scan.tif", _pages(8, **{str(damaged_page): damage}))
    # With 2 threads the runs are pages 1-4 and 5-8: page 5 is the first of the second run.
    _check([_src(scan, p) for p in (8, 7, 6, 5, 4, 3, 2, 1, 3, None, 12)], monkeypatch)


def test_a_file_replaced_or_deleted_between_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = make_tiff(tmp_path / "scan.tif", colors=("red", "green", "blue", "yellow"))
    sources = [_src(scan, p) for p in (4, 2, 1, 3)]
    _check(sources, monkeypatch)
    replacement = make_tiff(tmp_path / "new.tif", colors=("white", "black"))
    shutil.move(replacement, scan)
    _check(sources, monkeypatch)
    scan.unlink()
    _check(sources, monkeypatch)


@pytest.mark.parametrize("exception", [TypeError("bad IFD"), struct.error("unpack requires"), KeyError(7)])
@pytest.mark.parametrize("where", ["load", "seek"])
def test_a_bare_exception_on_page_3_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exception: Exception, where: str
) -> None:
    from PIL import TiffImagePlugin

    scan = make_tiff(tmp_path / "scan.tif", colors=("red", "green", "blue", "yellow", "white", "black"))
    real_load, real_seek = TiffImagePlugin.TiffImageFile.load, TiffImagePlugin.TiffImageFile.seek

    def load(self: Any) -> Any:
        if where == "load" and self.tell() == 2:
            raise exception
        return real_load(self)

    def seek(self: Any, frame: int) -> None:
        if where == "seek" and frame == 2:
            raise exception
        real_seek(self, frame)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", load)
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "seek", seek)
    _check([_src(scan, p) for p in (1, 2, 3, 4, 5, 6)], monkeypatch)
    _check([_src(scan, p) for p in (1, 2, 4, 5, 6)], monkeypatch)


def test_a_decompression_bomb_error_on_page_3_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import TiffImagePlugin

    scan = make_tiff(tmp_path / "scan.tif", colors=("red", "green", "blue", "yellow", "white", "black"))
    real_load = TiffImagePlugin.TiffImageFile.load

    def load(self: Any) -> Any:
        if self.tell() == 2:
            raise Image.DecompressionBombError("page 3 is a bomb")
        return real_load(self)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", load)
    _check([_src(scan, p) for p in (1, 2, 3, 4, 5, 6)], monkeypatch)
