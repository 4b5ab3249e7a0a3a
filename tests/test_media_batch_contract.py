"""`load_images` batches: every position gives exactly what `load_images([that source])` gives alone.

Probes of the multi-page TIFF runs (`_decode_pages`: one file's pages decoded by walking one opened image from page
to page) mixed with everything else a batch can hold, for 1, 2 and 8 decoding threads.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageFile

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs import media
from haystack_integrations.common.multimodal_rag.inputs.media import MediaLocation, load_images
from tests.helpers import make_tiff

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
