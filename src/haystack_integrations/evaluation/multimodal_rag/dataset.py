"""The in-memory form of an evaluation dataset: corpus entries, queries and graded relevance judgements."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from haystack import Document, logging

from haystack_integrations.common.multimodal_rag.inputs.media import (
    MODALITY_META_KEY,
    PAGE_NUMBER_META_KEY,
    classify,
)
from haystack_integrations.common.multimodal_rag.validation import check_int

logger = logging.getLogger(__name__)

Modality = Literal["text", "image", "page"]

#: Meta key of the file path, the default of every component's `file_path_meta_field`.
FILE_PATH_META_KEY = "file_path"

_WHITESPACE = re.compile(r"\s")


def check_id(kind: str, value: object) -> str:
    """
    Validate a query or document id: a non-empty string without whitespace (it must fit in a TREC run line).

    :param kind: `"query"` or `"document"`, for the message.
    :param value: The id.
    :returns: The id.
    :raises ValueError: On an empty id or one containing whitespace.
    """
    if not isinstance(value, str) or not value or _WHITESPACE.search(value):
        msg = f"{kind} id {value!r} must be a non-empty string without whitespace (TREC run format)"
        raise ValueError(msg)
    return value


@dataclass(frozen=True)
class CorpusEntry:
    """
    One document of an evaluation corpus.

    Exactly one of `text` (a text document) and `path` (an image, or a PDF whose page `page_number` is the
    document) is set. `path` is relative to the dataset folder (or absolute inside it).
    """

    id: str
    modality: Modality
    text: str | None = None
    path: str | None = None
    page_number: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        doc_id: str,
        *,
        text: str | None = None,
        path: str | None = None,
        page_number: int | None = None,
        modality: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> CorpusEntry:
        """
        Build an entry, deciding its modality with the package's one modality rule (`inputs.media.classify`).

        :param doc_id: The document id (no whitespace).
        :param text: Text of a text document.
        :param path: Image or PDF path of an image or page document.
        :param page_number: 1-based page of a PDF.
        :param modality: `"text"`, `"image"` or `"page"`; inferred from `text`/`path` when `None`.
        :param meta: Extra meta (e.g. a `caption`).
        :returns: The entry.
        :raises ValueError: When the entry has neither or both of text and path, a PDF has no page number, or the
            declared modality does not match the source.
        """
        check_id("document", doc_id)
        has_text = isinstance(text, str) and text.strip() != ""
        if has_text == (path is not None):
            which = "both" if has_text else "neither"
            msg = f"corpus entry '{doc_id}': give either non-empty 'text' or a 'path' (image or PDF), not {which}"
            raise ValueError(msg)
        probe = Document(
            content=text if has_text else None,
            meta={FILE_PATH_META_KEY: path} if path is not None else {},
        )
        try:
            inferred = classify(probe)
        except Exception as e:
            msg = f"corpus entry '{doc_id}': {e}"
            raise ValueError(msg) from e
        if modality is not None:
            declared = "page" if modality == "document" else modality
            if declared != inferred:
                msg = f"corpus entry '{doc_id}': modality {modality!r} does not match its source (a {inferred})"
                raise ValueError(msg)
        if inferred == "page":
            # "...: a PDF page needs 'page_number', which must be a positive integer, got None"
            check_int(f"corpus entry '{doc_id}': a PDF page needs 'page_number', which", page_number, minimum=1)
        elif page_number is not None:
            msg = f"corpus entry '{doc_id}': 'page_number' is only for PDF pages"
            raise ValueError(msg)
        return cls(
            id=doc_id,
            modality=inferred,  # type: ignore[arg-type]
            text=text if has_text else None,
            path=path,
            page_number=page_number,
            meta=dict(meta or {}),
        )

    def to_document(self) -> Document:
        """
        The Haystack `Document` an indexing pipeline receives for this entry (what the converter would produce,
        with the entry's id).

        :returns: The document.
        """
        meta: dict[str, Any] = {**self.meta, MODALITY_META_KEY: self.modality}
        if self.path is not None:
            meta[FILE_PATH_META_KEY] = self.path
        if self.page_number is not None:
            meta[PAGE_NUMBER_META_KEY] = self.page_number
        return Document(id=self.id, content=self.text, meta=meta)


@dataclass(frozen=True)
class QueryEntry:
    """One query: a text (`text`) or an image (`image`, a path: query-by-image)."""

    id: str
    text: str | None = None
    image: str | None = None

    def __post_init__(self) -> None:
        check_id("query", self.id)
        has_text = isinstance(self.text, str) and self.text.strip() != ""
        if has_text == (self.image is not None):
            which = "both" if has_text else "neither"
            msg = f"query '{self.id}': give either non-empty 'text' or an 'image' path, not {which}"
            raise ValueError(msg)


@dataclass
class RetrievalDataset:
    """
    A retrieval test collection: corpus, queries and graded relevance judgements (qrels).

    :param name: A name for reports.
    :param root: Folder relative paths of the corpus and of image queries are resolved in (the dataset folder).
    :param corpus: The documents.
    :param queries: The queries.
    :param qrels: `{query_id: {doc_id: relevance}}`, relevance > 0 means relevant.
    """

    name: str
    root: Path
    corpus: list[CorpusEntry]
    queries: list[QueryEntry]
    qrels: dict[str, dict[str, int]]

    def __post_init__(self) -> None:
        duplicates = [i for i, n in Counter(e.id for e in self.corpus).items() if n > 1]
        if duplicates:
            msg = f"dataset '{self.name}': duplicate corpus ids {sorted(duplicates)[:5]}"
            raise ValueError(msg)
        duplicates = [i for i, n in Counter(q.id for q in self.queries).items() if n > 1]
        if duplicates:
            msg = f"dataset '{self.name}': duplicate query ids {sorted(duplicates)[:5]}"
            raise ValueError(msg)
        query_ids = {q.id for q in self.queries}
        unknown_queries = sorted(set(self.qrels) - query_ids)
        if unknown_queries:
            logger.warning(
                "Dataset {name}: qrels of {count} unknown query id(s) ignored (e.g. {example})",
                name=self.name,
                count=len(unknown_queries),
                example=unknown_queries[0],
            )
            self.qrels = {q: rels for q, rels in self.qrels.items() if q in query_ids}
        doc_ids = {e.id for e in self.corpus}
        unknown_docs = sorted({d for rels in self.qrels.values() for d in rels} - doc_ids)
        if unknown_docs:
            # Kept (they count in recall's denominator, as trec_eval counts them), but worth knowing.
            logger.warning(
                "Dataset {name}: qrels name {count} document id(s) that are not in the corpus (e.g. {example})",
                name=self.name,
                count=len(unknown_docs),
                example=unknown_docs[0],
            )

    def modalities(self) -> dict[str, str]:
        """
        The modality of every corpus document.

        :returns: `{doc_id: "text" | "image" | "page"}`.
        """
        return {entry.id: entry.modality for entry in self.corpus}
