"""`load_images` batches: every position gives exactly what `load_images([that source])` gives alone.

Probes of the multi-page TIFF runs (`_decode_pages`: one file's pages decoded by walking one opened image from page
to page) mixed with everything else a batch can hold, for 1, 2 and 8 decoding threads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

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
