"""The one place that decides what a Document is (text, image, PDF page) and opens its pixels.

Every component that needs the image of a document (dense embedder, ColPali embedder and ranker,
prompt builder, VLM ranker) goes through `classify`, `probe` and `load_images` here, so the rules
and the error messages are the same everywhere:

- `meta["modality"]` set by the user (or an earlier component) wins when it is valid;
- otherwise a `blob` or the file named by `meta[file_path_meta_field]` decides: an image MIME type
  gives `"image"`, a PDF gives `"page"` (the page is `meta["page_number"]`, 1-based);
- otherwise non-blank `content` gives `"text"`.

A document that has non-blank `content` and no declared modality is text even when it also names a file:
Haystack's own PDF converter + splitter produce chunks that carry the PDF's `file_path` and `page_number`,
and those are text chunks, not page images. The old name `"document"` for a PDF page is accepted (with a
`DeprecationWarning`) for one release and read as `"page"`.

Paths are resolved against `root_path` when one is given, and a path that escapes it is refused.
Pillow's decompression-bomb limit stays on: an image larger than `PIL.Image.MAX_IMAGE_PIXELS` is an
error, not a warning.
"""

from __future__ import annotations

import io
import mimetypes
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pypdfium2 as pdfium
from haystack import Document
from PIL import Image, UnidentifiedImageError

from haystack_integrations.common.multimodal_rag.errors import MediaError

Modality = Literal["text", "image", "page"]
MODALITIES: tuple[str, ...] = ("text", "image", "page")
VISUAL_MODALITIES: tuple[str, ...] = ("image", "page")
#: Deprecated spelling of `"page"` (until 0.3): read as `"page"` with a DeprecationWarning.
DEPRECATED_PAGE_MODALITY = "document"

MODALITY_META_KEY = "modality"
PAGE_NUMBER_META_KEY = "page_number"

#: PDF pages are rendered at this resolution unless that exceeds `MAX_RENDER_SIDE` pixels.
RENDER_DPI = 150.0
#: Longest side, in pixels, of a rendered PDF page.
MAX_RENDER_SIDE = 2048

_PDF_MAGIC = b"%PDF-"

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
    :param page_number: 1-based page, for PDFs.
    :param label: Human-readable origin used in messages (the file path as given, or `"blob"`).
    """

    document_id: str
    modality: str
    path: Path | None = None
    data: bytes | None = None
    page_number: int | None = None
    label: str = ""

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
            DeprecationWarning,
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


def resolve_path(file_path: str | Path, root_path: str | Path | None) -> Path:
    """
    Resolve a document's file path, refusing paths that escape `root_path`.

    :param file_path: The path as stored in the document's meta.
    :param root_path: Directory that relative paths are resolved against and that every path must stay in.
        `None` resolves relative paths against the working directory and allows any path.
    :returns: The resolved absolute path.
    :raises MediaError: On path traversal outside `root_path`.
    """
    path = Path(file_path).expanduser()
    if root_path is None:
        return path.resolve()
    root = Path(root_path).expanduser().resolve()
    candidate = (root / path).resolve()
    if not candidate.is_relative_to(root):
        msg = f"file '{file_path}' resolves outside root_path '{root_path}' (path traversal refused)"
        raise MediaError(msg)
    return candidate


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
    except OSError as e:
        msg = f"cannot read image {label}: {e}"
        raise MediaError(msg) from e
    _check_pixel_limit(img.width, img.height, label)
    return img


def _decode_image(fp: Any, label: str) -> Image.Image:
    img = _open_image(fp, label)
    try:
        img.load()
        return img.convert("RGB")
    except Image.DecompressionBombError as e:
        msg = f"image {label} exceeds Pillow's decompression-bomb limit: {e}"
        raise MediaError(msg) from e
    except (OSError, SyntaxError, ValueError) as e:
        msg = f"image {label} is corrupt or truncated: {e}"
        raise MediaError(msg) from e
    finally:
        img.close()


def _open_pdf(source: MediaLocation) -> pdfium.PdfDocument:
    with _PDFIUM_LOCK:
        try:
            if source.data is not None:
                return pdfium.PdfDocument(source.data)
            return pdfium.PdfDocument(str(source.path))
        except pdfium.PdfiumError as e:
            msg = f"cannot open PDF {source.label}: {e} (the file is corrupt or truncated)"
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
                    image = bitmap.to_pil().convert("RGB")
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
        return int(raw)
    except ValueError as e:
        msg = f"meta['{PAGE_NUMBER_META_KEY}'] must be a 1-based integer, got {raw!r}"
        raise MediaError(msg) from e


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
    page_number = _parse_page_number(document) if modality == "page" else None
    if document.blob is not None:
        if len(document.blob.data) == 0:
            msg = "the document's blob is empty (zero bytes)"
            raise MediaError(msg)
        return MediaLocation(
            document_id=document.id, modality=modality, data=document.blob.data, page_number=page_number, label="blob"
        )
    file_path = document.meta.get(file_path_meta_field)
    if file_path is None:
        msg = f"document is marked '{modality}' but has no blob and no meta['{file_path_meta_field}']"
        raise MediaError(msg)
    path = resolve_path(file_path, root_path)
    label = f"'{file_path}'"
    if not path.exists():
        msg = f"file {label} does not exist" + (f" (looked in root_path '{root_path}')" if root_path else "")
        raise MediaError(msg)
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
    return MediaLocation(document_id=document.id, modality=modality, path=path, page_number=page_number, label=label)


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
        img.verify()
    except (OSError, SyntaxError, ValueError) as e:
        msg = f"image {source.label} is corrupt or truncated: {e}"
        raise MediaError(msg) from e
    finally:
        img.close()


def _read_image(source: MediaLocation) -> Image.Image:
    if source.data is not None:
        return _decode_image(io.BytesIO(source.data), source.label)
    return _decode_image(source.path, source.label)


def load_images(sources: Sequence[MediaLocation], *, max_side: int | None = None) -> list[Image.Image | MediaError]:
    """
    Decode a batch of sources into RGB images, opening each distinct PDF once.

    :param sources: The sources of one batch.
    :param max_side: Longest side of rendered PDF pages (images are returned at their own size).
    :returns: One RGB `PIL.Image` per source, or the `MediaError` that source raised, in order.
    """
    results: list[Image.Image | MediaError] = []
    open_pdfs: dict[Any, pdfium.PdfDocument] = {}
    try:
        for source in sources:
            try:
                if source.is_pdf:
                    key = source.path if source.path is not None else id(source.data)
                    pdf = open_pdfs.get(key)
                    if pdf is None:
                        pdf = _open_pdf(source)
                        open_pdfs[key] = pdf
                    results.append(_render_page(pdf, source, max_side))
                else:
                    results.append(_read_image(source))
            except MediaError as e:
                results.append(e)
    finally:
        with _PDFIUM_LOCK:
            for pdf in open_pdfs.values():
                pdf.close()
    return results


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
    image = load_image(source, max_side=max(fit) if fit is not None else None)
    if fit is not None:
        image.thumbnail(fit, reducing_gap=None)
    return image


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


def is_image_path(path: str | Path) -> bool:
    """True when the file name's extension is an image MIME type."""
    return _guess_path_kind(str(path)) == "image"


def is_pdf_path(path: str | Path) -> bool:
    """True when the file name's extension says PDF."""
    return _guess_path_kind(str(path)) == "pdf"
