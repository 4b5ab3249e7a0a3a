"""The one place that decides what a Document is (text, image, PDF page) and opens its pixels.

Every component that needs the image of a document (dense embedder, ColPali embedder and ranker,
prompt builder, VLM ranker) goes through `classify`, `probe` and `load_images` here, so the rules
and the error messages are the same everywhere:

- `meta["modality"]` set by the user (or an earlier component) wins when it is valid;
- otherwise a `blob` or the file named by `meta[file_path_meta_field]` decides: an image MIME type
  gives `"image"`, a PDF gives `"page"` (the page is `meta["page_number"]`, 1-based); on a multi-page TIFF
  `meta["page_number"]` picks the page (frame) too;
- otherwise non-blank `content` gives `"text"`.

A document that has non-blank `content` and no declared modality is text even when it also names a file:
Haystack's own PDF converter + splitter produce chunks that carry the PDF's `file_path` and `page_number`,
and those are text chunks, not page images. The old name `"document"` for a PDF page is accepted (with a
`FutureWarning`, which Python shows by default: it concerns your data, not your code) for one release and
read as `"page"`.

Paths are resolved against `root_path` when one is given, and a path that escapes it is refused. A
`file_path` that is not a usable path (not a string, a NUL byte, a name over 255 bytes) is a `MediaError`
naming the meta key, never a bare `TypeError`/`ValueError`/`OSError`.

Pixels are normalised the same way for every model (`normalize_image`):

- EXIF orientation is applied (`ImageOps.exif_transpose`): a phone photo stored sideways is seen upright;
- 16-bit grey-scale images (scans, PNG `"I;16"`) are scaled to 8 bits, not clipped (`convert("RGB")` clips them
  to almost white);
- transparency is composited onto white: `Image.convert("RGB")` drops the alpha channel and keeps the colour
  under it, which for most transparent PNGs (charts, logos exported with a transparent background) is black;
- an aspect ratio above `MAX_ASPECT_RATIO` (100:1) is padded with white, centred, to exactly that ratio. The
  Qwen2-VL / Qwen2.5-VL image processor (and the GLM-4V, Qwen3-VL video, PaddleOCR-VL ... processors that copy
  its `smart_resize`) raise `ValueError: absolute aspect ratio must be smaller than 200` (transformers
  `models/qwen2_vl/image_processing_qwen2_vl.py`, `smart_resize`). We stop at half that limit because some of
  those processors first scale tiny sides up with `int()` truncation before checking (transformers
  `models/glm4v/video_processing_glm4v.py`, `smart_resize`), and because a later `thumbnail` into a box
  rounds the short side, which moves the ratio by a few percent; 100:1 keeps every such path under 200. Padding
  (not cropping or stretching) keeps every pixel of the original, undistorted. When the padded image would exceed
  the decompression-bomb limit (a 100000x1 strip) the image is a named `MediaError` instead.

Pillow's decompression-bomb limit stays on: an image larger than `PIL.Image.MAX_IMAGE_PIXELS` is an
error, not a warning.
"""

from __future__ import annotations

import io
import math
import mimetypes
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from struct import error as struct_error
from typing import Any, Literal

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_raw
from haystack import Document, logging
from PIL import Image, ImageOps, UnidentifiedImageError

from haystack_integrations.common.multimodal_rag.errors import MediaError

logger = logging.getLogger(__name__)

Modality = Literal["text", "image", "page"]
MODALITIES: tuple[str, ...] = ("text", "image", "page")
VISUAL_MODALITIES: tuple[str, ...] = ("image", "page")
#: Deprecated spelling of `"page"` (until 0.3): read as `"page"` with a FutureWarning.
DEPRECATED_PAGE_MODALITY = "document"

MODALITY_META_KEY = "modality"
PAGE_NUMBER_META_KEY = "page_number"
#: Image formats whose frames are pages (of a scan), selected by `meta["page_number"]`. The frames of animations
#: (GIF, APNG, WebP) are not pages: those images are read as their first frame.
PAGED_IMAGE_FORMATS: tuple[str, ...] = ("TIFF",)

#: PDF pages are rendered at this resolution unless that exceeds `MAX_RENDER_SIDE` pixels.
RENDER_DPI = 150.0
#: Longest side, in pixels, of a rendered PDF page.
MAX_RENDER_SIDE = 2048

#: Widest aspect ratio (long side / short side) an image is given to a model; wider ones are padded with white.
#: Half of the 200 that Qwen2-VL-style processors refuse (see the module docstring).
MAX_ASPECT_RATIO = 100
#: Colour that transparency is composited onto and that extreme aspect ratios are padded with.
BACKGROUND_RGB = (255, 255, 255)
#: Longest file name (one path component) most file systems accept, in bytes (ext4, XFS, btrfs, APFS: 255).
MAX_NAME_BYTES = 255
#: Longest path Linux accepts (PATH_MAX), in bytes.
MAX_PATH_BYTES = 4096

_PDF_MAGIC = b"%PDF-"
_EXIF_ORIENTATION = 0x0112

# pdfium is not thread-safe: every call into it holds this lock.
_PDFIUM_LOCK = threading.RLock()


@dataclass(frozen=True)
class MediaLocation:
    """
    Where the pixels of an image or PDF-page document come from.

    :param document_id: Id of the document.
    :param modality: `"image"` or `"page"` (a PDF page).
    :param path: Resolved file path, when the pixels come from a file.
    :param data: Raw bytes, when the pixels come from the document's blob.
    :param page_number: 1-based page: of a PDF, or of a multi-page image (a multi-page TIFF scan; ignored for
        an image file with one frame, and never used to pick a frame of an animation).
    :param label: Human-readable origin used in messages (the file path as given, or `"blob"`).
    :param page_number_error: Why an image's `meta["page_number"]` is unusable (not a 1-based integer), when it
        is: ignored on a one-frame image (someone else's meta), an error on a multi-page TIFF, whose page it names.
    """

    document_id: str
    modality: str
    path: Path | None = None
    data: bytes | None = None
    page_number: int | None = None
    label: str = ""
    page_number_error: str | None = None

    @property
    def is_pdf(self) -> bool:
        """True when the source is a PDF page."""
        return self.modality == "page"


def _kind_from_mime(mime_type: str | None) -> str | None:
    if not mime_type:
        return None
    mime_type = mime_type.split(";")[0].strip().lower()
    if mime_type == "application/pdf":
        return "pdf"
    if mime_type.startswith("image/"):
        return "image"
    return "other"


def _kind_from_bytes(head: bytes) -> str | None:
    if head.startswith(_PDF_MAGIC):
        return "pdf"
    try:
        with Image.open(io.BytesIO(head)) as img:
            img.format  # noqa: B018  (header parsed: it is an image)
        return "image"
    except Exception:
        return None


def _guess_path_kind(path_str: str) -> str | None:
    mime_type, _ = mimetypes.guess_type(path_str)
    if mime_type is None:
        return None
    return _kind_from_mime(mime_type)


def looks_like_media_path(value: Any) -> bool:
    """
    Whether `value` reads like the path of an image or a PDF (judged by its name only; the file is not opened).

    :param value: Any value (a meta value, a query).
    :returns: `True` for a one-line string or path whose extension is an image or PDF type (not a URL: the
        loader reads local files only).
    """
    if not isinstance(value, (str, os.PathLike)):
        return False
    text = str(value).strip()
    return bool(text) and "\n" not in text and "://" not in text and _guess_path_kind(text) in ("image", "pdf")


def _has_text(document: Document) -> bool:
    return isinstance(document.content, str) and document.content.strip() != ""


def declared_modality(value: Any, *, meta_field: str = MODALITY_META_KEY) -> str | None:
    """
    Validate a recorded modality, translating the deprecated `"document"` to `"page"`.

    :param value: The value of `meta[meta_field]` (`None` when absent).
    :param meta_field: The meta key, for messages.
    :returns: `"text"`, `"image"`, `"page"` or `None`.
    :raises MediaError: On any other value.
    """
    if value is None:
        return None
    if value == DEPRECATED_PAGE_MODALITY:
        warnings.warn(
            f"meta['{meta_field}'] = 'document' is deprecated and will be refused in 0.3: a PDF page's modality "
            "is now 'page'",
            FutureWarning,
            stacklevel=3,
        )
        return "page"
    if value not in MODALITIES:
        msg = f"unknown modality {value!r} in meta['{meta_field}'] (expected one of {MODALITIES})"
        raise MediaError(msg)
    return str(value)


def classify(document: Document, *, file_path_meta_field: str = "file_path") -> str:
    """
    Decide the modality of a document without reading pixels.

    :param document: The document.
    :param file_path_meta_field: Meta key holding the path of the image or PDF.
    :returns: `"text"`, `"image"` or `"page"`.
    :raises MediaError: When the document has nothing usable or declares an unknown modality.
    """
    declared = declared_modality(document.meta.get(MODALITY_META_KEY))
    if declared == "text" or (declared is None and _has_text(document)):
        if not _has_text(document):
            msg = "meta['modality'] is 'text' but the document has no text content"
            raise MediaError(msg)
        return "text"
    # A declared "image"/"page" still needs a source; the source decides which of the two it is.

    if document.blob is not None:
        kind = _kind_from_mime(document.blob.mime_type)
        if kind is None:
            kind = _kind_from_bytes(document.blob.data[:4096])
        if kind == "pdf":
            return "page"
        if kind == "image":
            return "image"
        mime = document.blob.mime_type or "unknown"
        msg = f"unsupported MIME type '{mime}' for the document's blob (expected an image or a PDF)"
        raise MediaError(msg)

    file_path = document.meta.get(file_path_meta_field)
    if file_path is not None:
        file_path = check_file_path(file_path, meta_field=file_path_meta_field)
        kind = _guess_path_kind(str(file_path))
        if kind == "pdf":
            return "page"
        if kind == "image":
            return "image"
        if kind is None:
            # No telling extension: `locate` sniffs the file's first bytes.
            return "image"
        mime_type, _ = mimetypes.guess_type(str(file_path))
        msg = f"unsupported MIME type '{mime_type}' for file '{file_path}' (expected an image or a PDF)"
        raise MediaError(msg)

    if declared is not None:
        msg = f"meta['modality'] is {declared!r} but the document has no blob and no meta['{file_path_meta_field}']"
        raise MediaError(msg)
    msg = f"document has neither text content nor an image (no blob and no meta['{file_path_meta_field}'])"
    path_like = sorted(k for k, v in document.meta.items() if isinstance(k, str) and looks_like_media_path(v))
    if path_like:
        # e.g. meta={"path": "charts/q3.png"} or {"filepath": ...}: say where the path has to go.
        msg += (
            f"; meta[{path_like[0]!r}] looks like a file path: store it under meta['{file_path_meta_field}'], "
            f"or set file_path_meta_field={path_like[0]!r}"
        )
    raise MediaError(msg)


def modality_of(
    document: Document, *, modality_meta_field: str = MODALITY_META_KEY, file_path_meta_field: str = "file_path"
) -> str:
    """
    A document's modality as later components see it: the recorded one, else what `classify` infers.

    Unlike `classify`, a valid recorded modality is taken as it is, without checking that the document still
    has a source (rankers and monitors read scores, not pixels).

    :param document: The document.
    :param modality_meta_field: Meta key the modality is recorded under.
    :param file_path_meta_field: Meta key holding the file path (for inference).
    :returns: `"text"`, `"image"` or `"page"`.
    :raises MediaError: On an unknown recorded value, or when none is recorded and none can be inferred.
    """
    value = declared_modality(document.meta.get(modality_meta_field), meta_field=modality_meta_field)
    if value is None:
        return classify(document, file_path_meta_field=file_path_meta_field)
    return value


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def check_file_path(value: Any, *, meta_field: str = "file_path", name: str | None = None) -> str:
    """
    Check that a stored file path can name a file at all, before the file system sees it.

    :param value: The value of `meta[meta_field]` (or a converter source).
    :param meta_field: The meta key it came from, for messages.
    :param name: How to call the value in messages instead of `meta['<meta_field>']` (e.g. `"source 2"`).
    :returns: The path as a string.
    :raises MediaError: When it is not a `str`/`os.PathLike`, is empty, holds a NUL byte, or has a component over
        `MAX_NAME_BYTES` bytes or a total over `MAX_PATH_BYTES` bytes (what `open()` would refuse with a bare
        `TypeError`, `ValueError` or `OSError(ENAMETOOLONG)`).
    """
    what = f"meta['{meta_field}']" if name is None else name
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        msg = f"{what} must be a file path (a string), got {type(value).__name__} {_short(value)}"
        raise MediaError(msg)
    if value.strip() == "":
        msg = f"{what} is an empty string, not a file path"
        raise MediaError(msg)
    if "\x00" in value:
        msg = f"{what} contains a NUL byte, which no file name can hold: {_short(value)}"
        raise MediaError(msg)
    encoded = value.encode("utf-8", errors="surrogateescape")
    if len(encoded) > MAX_PATH_BYTES:
        msg = f"{what} is {len(encoded)} bytes long, over the {MAX_PATH_BYTES}-byte path limit: {_short(value)}"
        raise MediaError(msg)
    for part in Path(value).parts:
        size = len(part.encode("utf-8", errors="surrogateescape"))
        if size > MAX_NAME_BYTES:
            msg = (
                f"{what} has a file name of {size} bytes, over the {MAX_NAME_BYTES}-byte limit of "
                f"common file systems: {_short(value)}"
            )
            raise MediaError(msg)
    return value


def resolve_path(
    file_path: str | Path, root_path: str | Path | None, *, meta_field: str = "file_path", name: str | None = None
) -> Path:
    """
    Resolve a document's file path, refusing paths that escape `root_path`.

    Symlinks are resolved first, so a link inside `root_path` that points outside it is refused too.

    :param file_path: The path as stored in the document's meta.
    :param root_path: Directory that relative paths are resolved against and that every path must stay in.
        `None` resolves relative paths against the working directory and allows any path.
    :param meta_field: Where the path came from, for messages.
    :param name: How to call the path in messages (see `check_file_path`).
    :returns: The resolved absolute path.
    :raises MediaError: On a malformed path (see `check_file_path`), path traversal outside `root_path`, or a
        path the operating system cannot resolve (a symlink loop).
    """
    checked = check_file_path(file_path, meta_field=meta_field, name=name)
    try:
        path = Path(checked).expanduser()
        if root_path is None:
            return path.resolve()
        root = Path(root_path).expanduser().resolve()
        candidate = (root / path).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        # RuntimeError: a symlink loop (Python < 3.13); OSError: ENAMETOOLONG, ELOOP, EACCES on a parent.
        msg = f"file {_short(checked)} cannot be resolved: {e}"
        raise MediaError(msg) from e
    if not candidate.is_relative_to(root):
        msg = f"file '{checked}' resolves outside root_path '{root_path}' (path traversal refused)"
        raise MediaError(msg)
    return candidate


#: What Pillow raises on a damaged header beyond `OSError`: a TIFF directory (IFD) without its width tag is a
#: `TypeError("Missing dimensions")`, an unknown tag value a `KeyError`, a bad size a `ValueError`.
_DAMAGED_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct_error)


def _check_pixel_limit(width: int, height: int, label: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        msg = (
            f"image {label} is {width}x{height} = {width * height} pixels, over Pillow's decompression-bomb "
            f"limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
        )
        raise MediaError(msg)


def _open_image(fp: Any, label: str) -> Image.Image:
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:
        msg = f"image {label} exceeds Pillow's decompression-bomb limit: {e}"
        raise MediaError(msg) from e
    except UnidentifiedImageError as e:
        msg = f"cannot identify image {label}: the file is corrupt or not an image"
        raise MediaError(msg) from e
    except _DAMAGED_IMAGE_ERRORS as e:
        msg = f"cannot read image {label}: {e}"
        raise MediaError(msg) from e
    _check_pixel_limit(img.width, img.height, label)
    return img


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def pad_to_aspect_ratio(
    image: Image.Image, *, max_ratio: float = MAX_ASPECT_RATIO, label: str = "image"
) -> Image.Image:
    """
    Pad an RGB image with white, centred, so that its long side is at most `max_ratio` times its short side.

    :param image: An RGB image.
    :param max_ratio: The widest ratio allowed (`MAX_ASPECT_RATIO` by default; see the module docstring).
    :param label: What the image is, for messages.
    :returns: The image itself when its ratio is within bounds, else a new, padded image.
    :raises MediaError: When the padded image would exceed Pillow's decompression-bomb limit.
    """
    width, height = image.size
    if max(width, height) <= max_ratio * min(width, height):
        return image
    size = (width, math.ceil(width / max_ratio)) if width >= height else (math.ceil(height / max_ratio), height)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        msg = (
            f"image {label} is {width}x{height}: its aspect ratio is over {max_ratio:g}:1 (vision processors such as "
            f"Qwen2-VL's refuse 200:1) and padding it to {size[0]}x{size[1]} would exceed Pillow's decompression-bomb "
            f"limit of {limit} pixels"
        )
        raise MediaError(msg)
    canvas = Image.new("RGB", size, BACKGROUND_RGB)
    canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    logger.debug(
        "Padded {label} from {width}x{height} to {padded} (aspect ratio over {ratio}:1)",
        label=label,
        width=width,
        height=height,
        padded=f"{size[0]}x{size[1]}",
        ratio=max_ratio,
    )
    return canvas


def _to_8_bit(image: Image.Image) -> Image.Image:
    """
    A 16-bit or 32-bit grey-scale image as 8-bit `"L"`, scaled rather than clipped.

    Pillow's `convert("RGB")` clips these modes at 255, so a 16-bit scan (PNG opens as `"I;16"`) comes out
    almost entirely white. 16-bit data is divided by 257 (65535 -> 255); `"I"` / `"F"` images whose values exceed
    255 are read as 16-bit data the same way (what Pillow gives for 16-bit PNG/TIFF), others are kept as they are.
    """
    values = np.asarray(image, dtype=np.float32)
    if image.mode.startswith("I;16") or (values.size > 0 and float(values.max()) > 255.0):
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"


def normalize_image(image: Image.Image, *, label: str = "image") -> Image.Image:
    """
    Turn a decoded image into the RGB image every model gets: upright, transparency on white, bounded aspect ratio.

    :param image: A loaded PIL image of any mode (not modified).
    :param label: What the image is, for messages.
    :returns: A new RGB image (the EXIF orientation applied, 16-bit grey scaled to 8 bits, transparent pixels
        composited onto white, padded with white to at most `MAX_ASPECT_RATIO`:1).
    :raises MediaError: When the padded image would exceed the decompression-bomb limit.
    """
    upright = image
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) in range(2, 9):
            upright = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct_error) as e:
        # A damaged EXIF block should not cost the image: use it as stored.
        logger.debug("Ignoring unreadable EXIF orientation of {label}: {error}", label=label, error=e)
    if upright.mode in ("I", "F") or upright.mode.startswith("I;16"):
        upright = _to_8_bit(upright)
    if _has_transparency(upright):
        rgba = upright.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND_RGB, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = upright.convert("RGB")
    return pad_to_aspect_ratio(rgb, label=label)


def _frame_count(img: Image.Image, label: str) -> int:
    try:
        return int(getattr(img, "n_frames", 1))
    except _DAMAGED_IMAGE_ERRORS as e:
        msg = f"image {label} is corrupt or truncated: {e}"
        raise MediaError(msg) from e


def _has_pages(img: Image.Image, label: str) -> bool:
    """True when a TIFF has a second frame (read without counting them all); leaves it on frame 1."""
    try:
        img.seek(1)
    except EOFError:
        return False
    except _DAMAGED_IMAGE_ERRORS as e:
        msg = f"page 2 of image {label} cannot be read, the file is corrupt or truncated: {e}"
        raise MediaError(msg) from e
    img.seek(0)
    return True


def _seek_page(img: Image.Image, page_number: int | None, label: str, page_error: str | None = None) -> None:
    """
    Move a multi-page TIFF to its 1-based `page_number` (other images and one-page files: frame 1).

    `page_error` (why the document's page_number was unusable) is raised on a multi-page TIFF only: there a
    `2.0` or `"two"` must not quietly show page 1.
    """
    if img.format not in PAGED_IMAGE_FORMATS:
        return
    if page_error is not None and _has_pages(img, label):
        msg = f"{page_error}; it picks the page of multi-page image {label}"
        raise MediaError(msg)
    if page_number is None or page_number == 1:
        if img.tell() != 0:
            img.seek(0)  # an image already walked to a later page (`_decode_pages`)
        return
    if img.tell() >= page_number:
        img.seek(0)
    # Walk to the page one directory at a time rather than counting the pages first: counting reads every page's
    # directory (0.35 s for a 5000-page scan, on every page loaded), and a directory damaged after the page asked
    # for must not cost it. One step at a time also keeps the count right: a single seek past the end leaves
    # Pillow (13.0) with `n_frames` one per missing page too high. An image already on an earlier page (several
    # pages of one file, `_decode_pages`) walks on from there.
    for frame in range(img.tell() + 1, page_number):
        try:
            img.seek(frame)
        except EOFError:
            if frame == 1:
                img.seek(0)
                return  # one page: e.g. a page image cut out of a PDF that kept the PDF's page_number
            msg = f"page_number {page_number} is beyond image {label}, which has {frame} page(s)"
            raise MediaError(msg) from None
        except _DAMAGED_IMAGE_ERRORS as e:
            msg = f"page {frame + 1} of image {label} cannot be read, the file is corrupt or truncated: {e}"
            raise MediaError(msg) from e
    _check_pixel_limit(img.width, img.height, f"{label}, page {page_number}")


def _decode_image(
    fp: Any,
    label: str,
    draft_side: int | None = None,
    page_number: int | None = None,
    page_error: str | None = None,
) -> Image.Image:
    img = _open_image(fp, label)
    try:
        return _decode_frame(img, label, draft_side, page_number, page_error)
    finally:
        img.close()


def _forget_pixels(img: Image.Image) -> None:
    """
    Drop the pixel buffer of the page an image showed before it was moved to another (`_decode_pages`).

    Pillow (11+) decodes a TIFF page into the buffer of the page loaded before it when both have the same size and
    mode, so the rows a damaged page does not cover (a directory listing too few strips, a page cut short under
    `ImageFile.LOAD_TRUNCATED_IMAGES`) would show the page before instead of the black they are when the page is
    loaded alone. Pillow 10 allocates a new buffer on every seek (and has no `_im`).
    """
    if getattr(img, "_im", None) is not None:
        img._im = None


def _decode_frame(
    img: Image.Image, label: str, draft_side: int | None, page_number: int | None, page_error: str | None
) -> Image.Image:
    """Decode page `page_number` of an opened image (see `_seek_page`) into a new normalised RGB image."""
    try:
        frame = img.tell()
        _seek_page(img, page_number, label, page_error)
        if img.tell() != frame:
            _forget_pixels(img)
        if draft_side is not None and img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result stays at least draft_side x draft_side
            # (a square box, so the EXIF rotation applied later cannot make it smaller than the fitted image).
            img.draft(None, (draft_side, draft_side))
        img.load()
        return normalize_image(img, label=label)
    except Image.DecompressionBombError as e:
        msg = f"image {label} exceeds Pillow's decompression-bomb limit: {e}"
        raise MediaError(msg) from e
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, MediaError):
            raise
        msg = f"image {label} is corrupt or truncated: {e}"
        raise MediaError(msg) from e


def _complete(results: list[Image.Image | MediaError | None]) -> list[Image.Image | MediaError]:
    """The results of a batch whose every position was decoded (or the call raised before returning)."""
    done: list[Image.Image | MediaError] = []
    for result in results:
        assert result is not None
        done.append(result)
    return done


def _decode_pages(sources: Sequence[MediaLocation]) -> list[Image.Image | MediaError]:
    """
    Decode several pages of ONE image file (a multi-page TIFF scan) opening it once, in page order.

    Each page walks on from the previous one instead of from page 1: loading the pages of an n-page scan one file
    open at a time walks n^2/2 page directories (a 2000-page scan: 0.12 s for its last page on the 2-vCPU VM).
    After a page fails, the file is opened again for the next one, so each page's result, error message included,
    is what `_read_image` gives it alone.

    :param sources: Sources sharing one `path` (no blob data, no `page_number_error`).
    :returns: One image or error per source, in the order given.
    """
    results: list[Image.Image | MediaError | None] = [None] * len(sources)
    order = sorted(range(len(sources)), key=lambda i: sources[i].page_number or 1)
    img: Image.Image | None = None
    try:
        for i in order:
            source = sources[i]
            try:
                if img is None:
                    img = _open_image(source.path, source.label)
                results[i] = _decode_frame(img, source.label, None, source.page_number, None)
            except MediaError as e:
                results[i] = e
                if img is not None:
                    img.close()
                    img = None
    finally:
        if img is not None:
            img.close()
    return _complete(results)


def decode_image_bytes(data: bytes, *, label: str) -> Image.Image:
    """
    Decode encoded image bytes (for example an `ImageContent`'s base64-decoded data) through the shared rules.

    :param data: The encoded image (PNG, JPEG, ...).
    :param label: What the image is, for messages (e.g. `"image part 2 of message 1"`).
    :returns: The normalised RGB image (see `normalize_image`), with the decompression-bomb limit checked.
    :raises MediaError: When the bytes are empty, not an image, corrupt, or over the decompression-bomb limit.
    """
    if len(data) == 0:
        msg = f"image {label} is empty (zero bytes)"
        raise MediaError(msg)
    return _decode_image(io.BytesIO(data), label)


_PDFIUM_ERRORS = {
    pdfium_raw.FPDF_ERR_FILE: "the file cannot be opened",
    pdfium_raw.FPDF_ERR_FORMAT: "it is not a PDF or it is corrupt",
    pdfium_raw.FPDF_ERR_PASSWORD: "it is encrypted and needs a password",
    pdfium_raw.FPDF_ERR_SECURITY: "it uses an unsupported security handler",
    pdfium_raw.FPDF_ERR_PAGE: "a page is missing or corrupt",
}


def _explain_pdf_failure(source: MediaLocation) -> str:
    """
    Find out why pdfium refused a PDF, without trusting a stale error code.

    pypdfium2's `PdfDocument` treats a document that loads but has no pages as a failure and reports
    `FPDF_GetLastError()`, which pdfium only sets when a load FAILS: the code is left over from an earlier PDF
    ("Incorrect password" after an encrypted one, "Success" in a fresh process). So load it again through the raw
    API: a NULL handle means the load failed and the error code is this PDF's own; a handle means it has no pages.
    Call with `_PDFIUM_LOCK` held.
    """
    data = source.data
    if data is None:
        try:
            data = Path(str(source.path)).read_bytes()
        except OSError as e:
            return f"the file cannot be read: {e.strerror or e}"
    if len(data) == 0:
        return "it is empty (zero bytes)"
    raw = pdfium_raw.FPDF_LoadMemDocument64(data, len(data), None)
    if raw:
        try:
            pages = pdfium_raw.FPDF_GetPageCount(raw)
        finally:
            pdfium_raw.FPDF_CloseDocument(raw)
        if pages < 1:
            return "it has no pages"
        return "pdfium could not load it (no reason given)"
    code = pdfium_raw.FPDF_GetLastError()
    return _PDFIUM_ERRORS.get(code, f"pdfium could not load it (error code {code})")


def _open_pdf(source: MediaLocation) -> pdfium.PdfDocument:
    with _PDFIUM_LOCK:
        try:
            if source.data is not None:
                return pdfium.PdfDocument(source.data)
            return pdfium.PdfDocument(str(source.path))
        except (pdfium.PdfiumError, OSError) as e:
            msg = f"cannot open PDF {source.label}: {_explain_pdf_failure(source)}"
            raise MediaError(msg) from e


def _page_index(source: MediaLocation, n_pages: int) -> int:
    page_number = source.page_number
    if page_number is None:
        if n_pages == 1:
            return 0
        msg = (
            f"PDF {source.label} has {n_pages} pages but the document has no meta['{PAGE_NUMBER_META_KEY}'] "
            "saying which one it is (1-based)"
        )
        raise MediaError(msg)
    if page_number < 1 or page_number > n_pages:
        msg = f"page_number {page_number} is beyond PDF {source.label}, which has {n_pages} page(s)"
        raise MediaError(msg)
    return page_number - 1


def _render_page(pdf: pdfium.PdfDocument, source: MediaLocation, max_side: int | None) -> Image.Image:
    with _PDFIUM_LOCK:
        n_pages = len(pdf)
        index = _page_index(source, n_pages)
        try:
            page = pdf[index]
            try:
                width_pt, height_pt = page.get_size()
                scale = RENDER_DPI / 72.0
                side_limit = MAX_RENDER_SIDE if max_side is None else min(MAX_RENDER_SIDE, max_side)
                scale = min(scale, side_limit / max(width_pt, height_pt, 1.0))
                pixel_limit = Image.MAX_IMAGE_PIXELS
                if pixel_limit is not None and width_pt * height_pt * scale * scale > pixel_limit:
                    scale = (pixel_limit / (width_pt * height_pt)) ** 0.5
                bitmap = page.render(scale=scale)
                try:
                    image = normalize_image(bitmap.to_pil(), label=f"page {index + 1} of PDF {source.label}")
                finally:
                    bitmap.close()
            finally:
                page.close()
        except pdfium.PdfiumError as e:
            msg = f"cannot render page {index + 1} of PDF {source.label}: {e}"
            raise MediaError(msg) from e
    return image


def _parse_page_number(document: Document) -> int | None:
    raw = document.meta.get(PAGE_NUMBER_META_KEY)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        msg = f"meta['{PAGE_NUMBER_META_KEY}'] must be a 1-based integer, got {raw!r}"
        raise MediaError(msg)
    try:
        number = int(raw)
    except ValueError as e:
        msg = f"meta['{PAGE_NUMBER_META_KEY}'] must be a 1-based integer, got {raw!r}"
        raise MediaError(msg) from e
    if number < 1:
        msg = f"meta['{PAGE_NUMBER_META_KEY}'] must be >= 1 (page numbers are 1-based), got {raw!r}"
        raise MediaError(msg)
    return number


def _image_page_number(document: Document) -> tuple[int | None, str | None]:
    # An image's page_number only picks a page of a multi-page TIFF; on any other image it is someone else's meta
    # (e.g. the PDF page a figure was cut from), so an unusable value is ignored there: the loader refuses it only
    # on a multi-page TIFF. Returns the number, or None and why it is unusable.
    try:
        return _parse_page_number(document), None
    except MediaError as e:
        return None, str(e)


def _missing_file_message(label: str, file_path: Any, root_path: str | Path | None) -> str:
    if root_path is not None:
        return f"file {label} does not exist (looked in root_path '{root_path}')"
    message = f"file {label} does not exist (resolved against the working directory '{Path.cwd()}')"
    if len(Path(str(file_path)).parts) == 1:
        # Haystack's converters store only the file name by default (store_full_path=False).
        message += (
            "; it is a bare file name, as Haystack's converters store by default (store_full_path=False): "
            "set root_path to the folder the files are in"
        )
    return message


def locate(
    document: Document,
    modality: str,
    *,
    file_path_meta_field: str = "file_path",
    root_path: str | Path | None = None,
) -> MediaLocation:
    """
    Find where an image or page document's pixels live, checking the path but not reading pixels.

    :param document: The document.
    :param modality: Its modality, from `classify` (`"image"` or `"page"`).
    :param file_path_meta_field: Meta key holding the file path.
    :param root_path: See `resolve_path`.
    :returns: The source.
    :raises MediaError: Missing file, path traversal, a directory, a zero-byte file.
    """
    page_error = None
    if modality == "page":
        page_number = _parse_page_number(document)
    else:
        page_number, page_error = _image_page_number(document)
    if document.blob is not None:
        if len(document.blob.data) == 0:
            msg = "the document's blob is empty (zero bytes)"
            raise MediaError(msg)
        return MediaLocation(
            document_id=document.id,
            modality=modality,
            data=document.blob.data,
            page_number=page_number,
            label="blob",
            page_number_error=page_error,
        )
    file_path = document.meta.get(file_path_meta_field)
    if file_path is None:
        msg = f"document is marked '{modality}' but has no blob and no meta['{file_path_meta_field}']"
        raise MediaError(msg)
    path = resolve_path(file_path, root_path, meta_field=file_path_meta_field)
    label = f"'{file_path}'"
    try:
        if not path.exists():
            raise MediaError(_missing_file_message(label, file_path, root_path))
        if not path.is_file():
            msg = f"file {label} is not a regular file"
            raise MediaError(msg)
        if path.stat().st_size == 0:
            msg = f"file {label} is empty (zero bytes)"
            raise MediaError(msg)
        if modality == "image" and _guess_path_kind(str(file_path)) is None:
            # Extension says nothing: look at the first bytes.
            with path.open("rb") as fh:
                kind = _kind_from_bytes(fh.read(4096))
            if kind == "pdf":
                modality = "page"
                page_number = _parse_page_number(document)
            elif kind != "image":
                msg = f"unsupported file type for {label}: it is neither an image nor a PDF"
                raise MediaError(msg)
    except OSError as e:
        msg = f"file {label} cannot be read: {e.strerror or e}"
        raise MediaError(msg) from e
    return MediaLocation(
        document_id=document.id,
        modality=modality,
        path=path,
        page_number=page_number,
        label=label,
        page_number_error=page_error if modality == "image" else None,
    )


def probe(source: MediaLocation, *, decode: bool = True) -> None:
    """
    Check that a source's pixels can be read: the image, or the PDF and its page.

    Holds at most one decoded image at a time, so it is safe to call over a whole corpus.

    :param source: The source to check.
    :param decode: Decode the image fully (catches every corrupt file, at the cost of a second decode later).
        `False` parses the header and runs Pillow's integrity check (`verify`): it catches unreadable files,
        decompression bombs and truncated PNGs without decoding, but a truncated JPEG may only fail when loaded.
    :raises MediaError: Corrupt or truncated image or PDF, page out of range, decompression bomb.
    """
    if source.is_pdf:
        pdf = _open_pdf(source)
        try:
            with _PDFIUM_LOCK:
                index = _page_index(source, len(pdf))
                try:
                    pdf[index].close()
                except pdfium.PdfiumError as e:
                    msg = f"cannot load page {index + 1} of PDF {source.label}: {e}"
                    raise MediaError(msg) from e
        finally:
            with _PDFIUM_LOCK:
                pdf.close()
        return
    if decode:
        _read_image(source).close()
        return
    img = _open_image(io.BytesIO(source.data) if source.data is not None else source.path, source.label)
    try:
        _seek_page(img, source.page_number, source.label, source.page_number_error)
        img.verify()
    except MediaError:
        raise  # already says what is wrong (a page beyond the last, over the decompression-bomb limit)
    except (OSError, SyntaxError, ValueError) as e:
        msg = f"image {source.label} is corrupt or truncated: {e}"
        raise MediaError(msg) from e
    finally:
        img.close()


def _read_image(source: MediaLocation, draft_side: int | None = None) -> Image.Image:
    if source.data is not None:
        return _decode_image(
            io.BytesIO(source.data), source.label, draft_side, source.page_number, source.page_number_error
        )
    return _decode_image(source.path, source.label, draft_side, source.page_number, source.page_number_error)


#: Threads that decode the image files of one batch concurrently (Pillow releases the GIL while it decodes; on a
#: GPU, decoding one file after another is what kept the model waiting, issue 15). PDF pages are rendered one at
#: a time in the calling thread: pdfium is not thread-safe.
DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))
_DECODE_POOL: ThreadPoolExecutor | None = None
_DECODE_POOL_PID: int | None = None  # a forked child inherits no threads: it starts its own pool
_DECODE_POOL_LOCK = threading.Lock()


def decode_pool() -> ThreadPoolExecutor:
    """The process's image-decoding thread pool (`DECODE_THREADS` threads, started on first use).

    :returns: The pool; submit decodes of single sources to it (one batch's `load_images` already uses it).
    """
    global _DECODE_POOL, _DECODE_POOL_PID
    with _DECODE_POOL_LOCK:
        if _DECODE_POOL is None or os.getpid() != _DECODE_POOL_PID:
            _DECODE_POOL = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="multimodal-rag-decode")
            _DECODE_POOL_PID = os.getpid()
        return _DECODE_POOL


def _read_image_or_error(source: MediaLocation) -> Image.Image | MediaError:
    try:
        return _read_image(source)
    except MediaError as e:
        return e


def _split_pages(group: list[int], sources: Sequence[MediaLocation]) -> list[list[int]]:
    """The positions of one file's pages in page order, cut into at most `DECODE_THREADS` runs of similar size."""
    if len(group) == 1:
        return [group]
    ordered = sorted(group, key=lambda i: sources[i].page_number or 1)
    runs = min(len(ordered), DECODE_THREADS)
    size = -(-len(ordered) // runs)  # ceiling
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


def _decode_group(sources: list[MediaLocation]) -> list[Image.Image | MediaError]:
    """Decode one `load_images` group: several pages of one file together, a lone source by itself."""
    if len(sources) == 1:
        return [_read_image_or_error(sources[0])]
    return _decode_pages(sources)


def load_images(sources: Sequence[MediaLocation], *, max_side: int | None = None) -> list[Image.Image | MediaError]:
    """
    Decode a batch of sources into RGB images, opening each distinct PDF once.

    Image files are decoded concurrently (`DECODE_THREADS` threads) while the PDF pages of the batch are rendered
    in the calling thread.

    :param sources: The sources of one batch.
    :param max_side: Longest side of rendered PDF pages (images are returned at their own size).
    :returns: One RGB `PIL.Image` per source, or the `MediaError` that source raised, in order.
    """
    results: list[Image.Image | MediaError | None] = [None] * len(sources)
    # Image files, as groups of positions decoded by one task each: the pages of one file (a multi-page TIFF scan)
    # in runs of consecutive pages, each run opened once and walked in page order (`_decode_pages`), one run per
    # decoding thread (so heavy pages still decode in parallel); every other file alone.
    by_path: dict[Path, list[int]] = {}
    groups: list[list[int]] = []
    for i, source in enumerate(sources):
        if source.is_pdf:
            continue
        if source.path is not None and source.data is None and source.page_number_error is None:
            if source.path not in by_path:
                by_path[source.path] = []
                groups.append(by_path[source.path])
            by_path[source.path].append(i)
        else:
            groups.append([i])
    groups = [chunk for group in groups for chunk in _split_pages(group, sources)]
    pending: dict[tuple[int, ...], Future[list[Image.Image | MediaError]]] = {}
    if len(groups) > 1 and DECODE_THREADS > 1:
        pool = decode_pool()
        pending = {tuple(group): pool.submit(_decode_group, [sources[i] for i in group]) for group in groups}
    open_pdfs: dict[Any, pdfium.PdfDocument] = {}
    try:
        for group in groups:
            if tuple(group) not in pending:
                for i, result in zip(group, _decode_group([sources[i] for i in group]), strict=True):
                    results[i] = result
        for i, source in enumerate(sources):
            if not source.is_pdf:
                continue
            try:
                key = source.path if source.path is not None else id(source.data)
                pdf = open_pdfs.get(key)
                if pdf is None:
                    pdf = _open_pdf(source)
                    open_pdfs[key] = pdf
                results[i] = _render_page(pdf, source, max_side)
            except MediaError as e:
                results[i] = e
    finally:
        with _PDFIUM_LOCK:
            for pdf in open_pdfs.values():
                pdf.close()
        for positions, future in pending.items():  # collected even when rendering raised: no decode outlives it
            try:
                for i, result in zip(positions, future.result(), strict=True):
                    results[i] = result
            except BaseException:
                for other in pending.values():
                    other.cancel()
                # The runs already under way finish (and close their files) before the exception leaves the call.
                wait(pending.values())
                raise
    return _complete(results)


def load_image(source: MediaLocation, *, max_side: int | None = None) -> Image.Image:
    """
    Decode one source into an RGB image.

    :param source: The source.
    :param max_side: Longest side of a rendered PDF page.
    :returns: The image.
    :raises MediaError: When it cannot be read.
    """
    result = load_images([source], max_side=max_side)[0]
    if isinstance(result, MediaError):
        raise result
    return result


def load_fitted_image(source: MediaLocation, *, fit: tuple[int, int] | None = None) -> Image.Image:
    """
    Decode one located source and shrink it to fit a `(width, height)` box, keeping the aspect-ratio bound.

    :param source: The source, from `locate`.
    :param fit: Box the image is shrunk into (aspect ratio kept; PDF pages are rendered at that size); `None`
        keeps the image's own size.
    :returns: The RGB image.
    :raises MediaError: When it cannot be read.
    """
    if fit is not None and not source.is_pdf:
        # A JPEG is decoded at reduced scale when that still covers the box (4x less work for a 12 MP photo).
        image = _read_image(source, draft_side=max(fit))
    else:
        image = load_image(source, max_side=max(fit) if fit is not None else None)
    if fit is not None:
        image.thumbnail(fit, reducing_gap=None)
        # Shrinking rounds the short side; keep the ratio bound after it.
        image = pad_to_aspect_ratio(image, label=source.label)
    return image


def load_document_image(
    document: Document,
    modality: str,
    *,
    file_path_meta_field: str = "file_path",
    root_path: str | Path | None = None,
    fit: tuple[int, int] | None = None,
) -> Image.Image:
    """
    Locate and decode the image of an image or PDF-page document, shrunk to fit a `(width, height)` box.

    :param document: The document.
    :param modality: Its modality (`"image"` or `"page"`).
    :param file_path_meta_field: Meta key holding the file path.
    :param root_path: See `resolve_path`.
    :param fit: Box the image is shrunk into (aspect ratio kept; PDF pages are rendered at that size); `None`
        keeps the image's own size.
    :returns: The RGB image.
    :raises MediaError: When it cannot be located or read.
    """
    source = locate(document, modality, file_path_meta_field=file_path_meta_field, root_path=root_path)
    return load_fitted_image(source, fit=fit)


def pdf_page_count(path: str | Path) -> int:
    """
    Count the pages of a PDF file.

    :param path: The PDF.
    :returns: The number of pages.
    :raises MediaError: When the PDF cannot be opened.
    """
    source = MediaLocation(document_id="", modality="page", path=Path(path), label=f"'{path}'")
    pdf = _open_pdf(source)
    with _PDFIUM_LOCK:
        try:
            return len(pdf)
        finally:
            pdf.close()


def pdf_page_text_length(location: MediaLocation) -> int:
    """
    Count the non-whitespace characters of a PDF page's text layer (0 for a scan without one).

    :param location: A PDF-page location (from `locate`).
    :returns: The number of non-whitespace characters.
    :raises MediaError: When the PDF cannot be opened or the page does not exist.
    """
    pdf = _open_pdf(location)
    with _PDFIUM_LOCK:
        try:
            page = pdf[_page_index(location, len(pdf))]
            try:
                textpage = page.get_textpage()
                try:
                    text = textpage.get_text_range()
                finally:
                    textpage.close()
            finally:
                page.close()
        except pdfium.PdfiumError as e:
            msg = f"cannot read the text layer of PDF {location.label}: {e}"
            raise MediaError(msg) from e
        finally:
            pdf.close()
    return sum(1 for ch in text if not ch.isspace())


def image_page_count(path: str | Path) -> int:
    """
    Count the pages of an image file: the frames of a multi-page TIFF (scanners and fax software write one page
    per frame), 1 for every other image (the frames of an animated GIF, PNG or WebP are not pages).

    Reads the file's headers only, not its pixels.

    :param path: The image file.
    :returns: The number of pages.
    :raises MediaError: When the file cannot be read as an image.
    """
    label = f"'{path}'"
    img = _open_image(path, label)
    try:
        if img.format not in PAGED_IMAGE_FORMATS:
            return 1
        return _frame_count(img, label)
    finally:
        img.close()


def is_image_path(path: str | Path) -> bool:
    """True when the file name's extension is an image MIME type."""
    return _guess_path_kind(str(path)) == "image"


def is_tiff_path(path: str | Path) -> bool:
    """True when the file name's extension says TIFF (`.tif`, `.tiff`): the image type that holds pages."""
    return mimetypes.guess_type(str(path))[0] == "image/tiff"


def is_pdf_path(path: str | Path) -> bool:
    """True when the file name's extension says PDF."""
    return _guess_path_kind(str(path)) == "pdf"
