from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict, logging

from haystack_integrations.common.multimodal_rag.errors import ConversionError, MediaError
from haystack_integrations.common.multimodal_rag.inputs.failures import validate_on_error
from haystack_integrations.common.multimodal_rag.inputs.media import (
    MODALITY_META_KEY,
    PAGE_NUMBER_META_KEY,
    image_page_count,
    is_image_path,
    is_pdf_path,
    is_tiff_path,
    pdf_page_count,
    resolve_path,
)

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".csv", ".json", ".html", ".htm")


@component
class MultimodalFileToDocument:
    """
    Turns files into the Documents the multimodal embedders expect: one per image, one per PDF page, one per
    text file.

    - images (any type Pillow reads): `Document(meta={"file_path": ..., "modality": "image"})`; a multi-page TIFF
      (a scan or fax) gives one such Document per page, with `meta["page_number"]` (1-based); the frames of an
      animated GIF, PNG or WebP are not pages (one Document, its first frame);
    - PDFs: one `Document` per page with `meta["page_number"]` (1-based) and `meta["modality"] = "page"`;
      the page is rendered later, by the embedders, one batch at a time;
    - text files (`.txt`, `.md`, ...): `Document(content=..., meta={"file_path": ..., "modality": "text"})`.

    `sources` must be a list (a bare string is refused with a `TypeError` rather than read as a list of
    one-character paths); an empty path is a failure, not the working directory. Directories are expanded
    recursively (files of other types inside them are ignored; a directory with nothing to convert is logged as a
    warning). With `root_path`, a file inside an expanded directory that is a symlink resolving outside
    `root_path` is refused like a named one. Document ids are
    derived from the file path, page and meta, so converting the same files again gives the same ids and a
    re-run of an indexing pipeline overwrites instead of duplicating. With `root_path`, paths are stored
    relative to it (and must stay inside it). Pixels are not read here: a corrupt image is reported by the
    embedder. A PDF that cannot be opened (corrupt, encrypted, no pages), a TIFF whose headers cannot be read (they
    are read to count its pages), an unreadable text file or an unsupported type is reported here.

    The converter only adds: to remove the documents of files deleted since the last run, put a
    `StaleDocumentPruner` after it.

    ### Usage example
    ```python
    from haystack_integrations.components.converters.multimodal import MultimodalFileToDocument

    converter = MultimodalFileToDocument(root_path="data")
    docs = converter.run(sources=["charts/revenue.png", "reports/annual.pdf", "notes"])["documents"]
    ```
    """

    def __init__(
        self,
        *,
        root_path: str | None = None,
        file_path_meta_field: str = "file_path",
        encoding: str = "utf-8",
        on_error: str = "raise",
    ) -> None:
        """
        Create the converter.

        :param root_path: Directory that relative sources are resolved in; stored paths are relative to it.
        :param file_path_meta_field: Meta key the file path is written to.
        :param encoding: Encoding of text files.
        :param on_error: `"raise"` (one error naming every bad file) or `"skip"` (report them in `failed_sources`).
        """
        validate_on_error(on_error)
        self.root_path = root_path
        self.file_path_meta_field = file_path_meta_field
        self.encoding = encoding
        self.on_error = on_error

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            root_path=self.root_path,
            file_path_meta_field=self.file_path_meta_field,
            encoding=self.encoding,
            on_error=self.on_error,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultimodalFileToDocument:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    def _stored_path(self, path: Path) -> str:
        if self.root_path is not None:
            return str(path.relative_to(Path(self.root_path).expanduser().resolve()))
        return str(path)

    def _expand(self, source: str | Path, position: int) -> tuple[list[Path], list[dict[str, str]]]:
        path = resolve_path(source, self.root_path, name=f"source {position}")
        if not path.is_dir():
            return [path], []
        root = Path(self.root_path).expanduser().resolve() if self.root_path is not None else None
        files: list[Path] = []
        refused: list[dict[str, str]] = []
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            if not (is_image_path(child) or is_pdf_path(child) or child.suffix.lower() in TEXT_SUFFIXES):
                continue
            if root is not None and not child.resolve().is_relative_to(root):
                # The same rule as for a named symlink (resolve_path): nothing outside root_path is read.
                reason = (
                    f"file '{child.relative_to(root)}' is a symlink to '{child.resolve()}', outside root_path "
                    f"'{self.root_path}' (path traversal refused)"
                )
                refused.append({"source": str(child), "reason": reason})
                continue
            files.append(child)
        if not files and not refused:
            logger.warning(
                "MultimodalFileToDocument: directory '{source}' holds no image, PDF or text file "
                "({suffixes}); it gives 0 documents",
                source=str(source),
                suffixes=", ".join(TEXT_SUFFIXES),
            )
        return files, refused

    def _convert(self, path: Path, meta: dict[str, Any]) -> list[Document]:
        if not path.exists():
            msg = f"file '{path}' does not exist"
            raise MediaError(msg)
        stored = self._stored_path(path)
        base = {**meta, self.file_path_meta_field: stored}
        if is_pdf_path(path):
            pages = pdf_page_count(path)
            if pages < 1:  # pdfium refuses these at open; kept in case a PDF library ever opens one
                msg = f"PDF '{path}' has no pages"
                raise MediaError(msg)
            return [
                Document(meta={**base, PAGE_NUMBER_META_KEY: page, MODALITY_META_KEY: "page"})
                for page in range(1, pages + 1)
            ]
        if is_image_path(path):
            # Only TIFFs can hold pages; other images are not opened here (their errors belong to the embedder).
            pages = image_page_count(path) if is_tiff_path(path) else 1
            if pages == 1:
                return [Document(meta={**base, MODALITY_META_KEY: "image"})]
            return [
                Document(meta={**base, PAGE_NUMBER_META_KEY: page, MODALITY_META_KEY: "image"})
                for page in range(1, pages + 1)
            ]
        if path.suffix.lower() in TEXT_SUFFIXES:
            try:
                text = path.read_text(encoding=self.encoding)
            except (OSError, UnicodeDecodeError) as e:
                msg = f"cannot read text file '{path}': {e}"
                raise MediaError(msg) from e
            if not text.strip():
                msg = f"text file '{path}' is empty"
                raise MediaError(msg)
            return [Document(content=text, meta={**base, MODALITY_META_KEY: "text"})]
        mime_type, _ = mimetypes.guess_type(str(path))
        msg = f"unsupported file type for '{path}' (MIME type {mime_type}); expected an image, a PDF or a text file"
        raise MediaError(msg)

    @component.output_types(documents=list[Document], failed_sources=list[dict[str, str]])
    def run(
        self, sources: list[str | Path], meta: dict[str, Any] | list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """
        Convert files (and directories of files) into Documents.

        :param sources: File or directory paths.
        :param meta: Meta added to every document (a dict), or one dict per source (a list of the same length).
        :returns: A dictionary with:
            - `documents`: the Documents, in source order (pages in page order);
            - `failed_sources`: with `on_error="skip"`, `{"source": ..., "reason": ...}` per file that failed.
        :raises ConversionError: With `on_error="raise"`, naming every file that failed and why.
        :raises ValueError: When `meta` is a list of another length than `sources`.
        :raises TypeError: When `sources` is not a list (a bare string or path is refused: iterating it would read
            every character as a path, and `"."` or `"/"` as the working directory or the whole disk).
        """
        if not isinstance(sources, (list, tuple)):
            kind = type(sources).__name__
            msg = (
                f"MultimodalFileToDocument: sources must be a list of file or directory paths, got a {kind} "
                f"({sources!r:.80}); to convert one path, pass sources=[{sources!r:.80}]"
            )
            raise TypeError(msg)
        if isinstance(meta, list):
            if len(meta) != len(sources):
                msg = f"meta has {len(meta)} entries but there are {len(sources)} sources"
                raise ValueError(msg)
            metas = meta
        else:
            metas = [meta or {}] * len(sources)
        documents: list[Document] = []
        failed: list[dict[str, str]] = []
        for position, (source, source_meta) in enumerate(zip(sources, metas, strict=True)):
            try:
                expanded, refused = self._expand(source, position)
            except MediaError as e:
                failed.append({"source": str(source), "reason": str(e)})
                continue
            except OSError as e:
                failed.append({"source": str(source), "reason": f"cannot read '{source}': {e.strerror or e}"})
                continue
            failed.extend(refused)
            for path in expanded:
                try:
                    documents.extend(self._convert(path, dict(source_meta)))
                except MediaError as e:
                    failed.append({"source": str(path), "reason": str(e)})
                except OSError as e:
                    failed.append({"source": str(path), "reason": f"cannot read '{path}': {e.strerror or e}"})
        if failed and self.on_error == "raise":
            lines = "\n".join(f"  - {f['source']}: {f['reason']}" for f in failed)
            msg = f"MultimodalFileToDocument: {len(failed)} source(s) could not be converted:\n{lines}"
            raise ConversionError(msg)
        if failed:
            logger.warning(
                "MultimodalFileToDocument skipped {count} source(s); see 'failed_sources'", count=len(failed)
            )
        return {"documents": documents, "failed_sources": failed}
