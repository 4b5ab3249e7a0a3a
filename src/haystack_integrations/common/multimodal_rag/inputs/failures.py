"""Per-document failure bookkeeping shared by every component that accepts `on_error`.

Rule (see DESIGN.md): every bad input gets an error naming the document id and the reason; with
`on_error="skip"` failures are returned, never dropped, so `inputs == outputs + failures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import PurePath
from typing import Literal

from haystack import Document

OnError = Literal["raise", "skip"]
ON_ERROR_VALUES: tuple[str, ...] = ("raise", "skip")

#: Meta key written on documents returned in `failed_documents`.
EMBEDDING_ERROR_META_KEY = "embedding_error"


def validate_on_error(on_error: str) -> None:
    """
    Check an `on_error` parameter value.

    :param on_error: The value to check.
    :raises ValueError: If it is not `"raise"` or `"skip"`.
    """
    if on_error not in ON_ERROR_VALUES:
        msg = f"on_error must be one of {ON_ERROR_VALUES}, got {on_error!r}"
        raise ValueError(msg)


def mark_failed(document: Document, reason: str) -> Document:
    """
    Return a copy of `document` with `meta["embedding_error"]` set to `reason`.

    :param document: The failed document (not mutated).
    :param reason: Why it failed.
    :returns: A new Document.
    """
    return replace(document, meta={**document.meta, EMBEDDING_ERROR_META_KEY: reason})


def check_documents_input(component: str, documents: object, *, allow_tuple: bool = False) -> None:
    """
    Validate that a component received a list of Documents.

    :param component: Name of the component (used in the message).
    :param documents: What the component received.
    :param allow_tuple: Accept a tuple of Documents too (the components that iterated any sequence before this
        check existed, so a caller passing a tuple keeps working).
    :raises TypeError: If `documents` is not a list of `Document`, naming what it got and what to pass instead.
    """
    containers = (list, tuple) if allow_tuple else list
    if isinstance(documents, containers) and all(isinstance(d, Document) for d in documents):
        return
    if isinstance(documents, containers):
        item = next(d for d in documents if not isinstance(d, Document))
        got = f"a {type(documents).__name__} holding a {type(item).__name__} ({_preview(item)})"
    else:
        item = documents
        got = f"a {type(documents).__name__} ({_preview(documents)})"
    msg = f"{component} expects a list of Documents as input, got {got}."
    if isinstance(item, Document):
        msg += " Wrap a single Document in a list: [document]."
    elif isinstance(item, (str, PurePath)):
        msg += (
            " For files, wrap each path in a Document (Document(meta={'file_path': path})) or convert them with "
            "MultimodalFileToDocument first."
        )
        if "Embedder" in component and isinstance(documents, str):  # one string: most likely a query text
            msg += " To embed a query text, use the matching text embedder."
    raise TypeError(msg)


def _preview(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def duplicate_id_failures(documents: Sequence[Document]) -> dict[int, str]:
    """
    The positions of documents whose id already appeared earlier in the same batch, with the reason.

    A document store keeps one document per id, so without this check all but one of them would vanish
    silently when written.

    :param documents: The input documents.
    :returns: Reason per position of every later duplicate (the first occurrence is not a failure).
    """
    first: dict[str, int] = {}
    failures: dict[int, str] = {}
    for i, doc in enumerate(documents):
        j = first.setdefault(doc.id, i)
        if j != i:
            failures[i] = (
                f"duplicate document id: the document at position {j} of this batch has the same id, and a "
                "document store keeps one document per id (give each document a unique id, or drop the duplicate)"
            )
    return failures
