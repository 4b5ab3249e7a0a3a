"""Validate a batch of documents up front, then stream their pixels batch by batch.

Shared by `MultimodalDocumentEmbedder` and `ColPaliDocumentEmbedder` so both apply the same bad-input
rules: every failure is known (and, with `on_error="raise"`, raised naming every document) before any
output is produced, and pixels are only held for one batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from haystack import Document
from PIL import Image

from haystack_integrations.common.multimodal_rag.errors import DocumentProcessingError, MediaError
from haystack_integrations.common.multimodal_rag.inputs.failures import mark_failed
from haystack_integrations.common.multimodal_rag.inputs.media import (
    VISUAL_MODALITIES,
    MediaLocation,
    classify,
    load_images,
    locate,
    probe,
)
from haystack_integrations.common.multimodal_rag.inputs.prefetch import prefetch
from haystack_integrations.common.multimodal_rag.validation import batched

T = TypeVar("T")


@dataclass
class DocumentPlan:
    """
    What each input document is and where its pixels are.

    :param modalities: Modality per input position (`None` where classification failed).
    :param locations: Where the pixels are, per position of image/page documents.
    :param failures: Reason per failed position.
    """

    modalities: list[str | None]
    locations: dict[int, MediaLocation] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)

    @property
    def sources(self) -> dict[int, MediaLocation]:
        """The old name of `locations` (the same dict), kept for callers written before the rename."""
        return self.locations

    def indices(self, *modalities: str) -> list[int]:
        """Positions of the documents of the given modalities that have not failed, in input order."""
        return [
            i for i, m in enumerate(self.modalities) if m is not None and m in modalities and i not in self.failures
        ]

    def visual_indices(self) -> list[int]:
        """Positions of the image and PDF-page documents that have not failed."""
        return self.indices(*VISUAL_MODALITIES)


def plan_documents(
    documents: Sequence[Document],
    *,
    file_path_meta_field: str,
    root_path: str | Path | None,
    probe_pixels: bool = True,
) -> DocumentPlan:
    """
    Classify every document and check its image source.

    :param documents: The input documents.
    :param file_path_meta_field: Meta key holding image/PDF paths.
    :param root_path: Directory file paths are resolved in (and confined to).
    :param probe_pixels: Decode each image fully (one at a time) to catch every corrupt file now; `False` only
        parses headers and runs Pillow's integrity check, so an image is decoded once, when its batch is loaded
        (see `media.probe`). PDFs are opened and their page looked up either way.
    :returns: The plan.
    """
    plan = DocumentPlan(modalities=[None] * len(documents))
    for i, doc in enumerate(documents):
        try:
            modality = classify(doc, file_path_meta_field=file_path_meta_field)
            if modality in VISUAL_MODALITIES:
                source = locate(doc, modality, file_path_meta_field=file_path_meta_field, root_path=root_path)
                probe(source, decode=probe_pixels)
                modality = source.modality
                plan.locations[i] = source
            plan.modalities[i] = modality
        except MediaError as e:
            plan.failures[i] = str(e)
    return plan


def raise_if_failed(component: str, documents: Sequence[Document], failures: dict[int, str]) -> None:
    """
    Raise one `DocumentProcessingError` naming every failed document, if there is any.

    :param component: Component name for the message.
    :param documents: The input documents.
    :param failures: Reason per failed position.
    :raises DocumentProcessingError: When `failures` is not empty.
    """
    if failures:
        raise DocumentProcessingError(component, [(documents[i].id, failures[i]) for i in sorted(failures)])


def iter_image_batches(
    plan: DocumentPlan,
    indices: Sequence[int],
    batch_size: int,
    *,
    max_side: int | None = None,
    prefetch_depth: int = 1,
) -> Iterator[tuple[list[int], list[Image.Image], dict[int, str]]]:
    """
    Decode the images of `indices`, one batch at a time.

    With `prefetch_depth >= 1` the next batches are decoded (and PDF pages rendered) in a background thread
    while the caller runs the model on the current one; at most `prefetch_depth + 1` batches are held.

    :param plan: The plan holding each position's location.
    :param indices: Positions to load (visual documents only).
    :param batch_size: Images per batch.
    :param max_side: Longest side of rendered PDF pages.
    :param prefetch_depth: Batches decoded ahead of the caller; `0` decodes each batch when it is asked for.
    :returns: An iterator of `(positions, images, failures)`: the positions that loaded, their images,
        and the reason per position that did not.
    """
    batches = _decode_batches(plan, indices, batch_size, max_side)
    return prefetch(batches, depth=prefetch_depth) if prefetch_depth > 0 else batches


def iter_prepared_batches(
    plan: DocumentPlan,
    indices: Sequence[int],
    batch_size: int,
    prepare: Callable[[list[int], list[Image.Image]], T],
    *,
    max_side: int | None = None,
    prefetch_depth: int = 1,
) -> Iterator[tuple[list[int], list[Image.Image], dict[int, str], T]]:
    """
    Like `iter_image_batches`, and `prepare(positions, images)` (e.g. the model's processor) runs in the
    background thread too, so the caller only runs the model while the next batch is decoded and prepared.

    :param plan: The plan holding each position's location.
    :param indices: Positions to load (visual documents only).
    :param batch_size: Images per batch.
    :param prepare: Called once per batch with the positions that decoded and their images (also when none did).
    :param max_side: Longest side of rendered PDF pages.
    :param prefetch_depth: Batches prepared ahead of the caller; `0` prepares each batch when it is asked for.
    :returns: An iterator of `(positions, images, failures, prepared)`.
    """

    def prepared() -> Iterator[tuple[list[int], list[Image.Image], dict[int, str], T]]:
        for positions, images, failed in _decode_batches(plan, indices, batch_size, max_side):
            try:
                ready = prepare(positions, images)
            except BaseException:
                for image in images:
                    image.close()
                raise
            yield positions, images, failed, ready

    return prefetch(prepared(), depth=prefetch_depth) if prefetch_depth > 0 else prepared()


def _decode_batches(
    plan: DocumentPlan, indices: Sequence[int], batch_size: int, max_side: int | None
) -> Iterator[tuple[list[int], list[Image.Image], dict[int, str]]]:
    for chunk in batched(indices, batch_size):
        loaded = load_images([plan.locations[i] for i in chunk], max_side=max_side)
        ok_positions: list[int] = []
        images: list[Image.Image] = []
        failed: dict[int, str] = {}
        for i, result in zip(chunk, loaded, strict=True):
            if isinstance(result, MediaError):
                failed[i] = str(result)
            else:
                ok_positions.append(i)
                images.append(result)
        yield ok_positions, images, failed


def split_outputs(
    documents: Sequence[Document],
    failures: dict[int, str],
    make_output: Callable[[int, Document], Document],
) -> dict[str, list[Document]]:
    """
    Build the `documents` / `failed_documents` outputs, in input order.

    :param documents: The input documents.
    :param failures: Reason per failed position.
    :param make_output: Builds the output document for a successful position.
    :returns: `{"documents": [...], "failed_documents": [...]}` with `len(documents) + len(failed) == len(input)`.
    """
    ok: list[Document] = []
    failed: list[Document] = []
    for i, doc in enumerate(documents):
        if i in failures:
            failed.append(mark_failed(doc, failures[i]))
        else:
            ok.append(make_output(i, doc))
    return {"documents": ok, "failed_documents": failed}
