"""Route blank and near-empty pages away from the index before any model sees them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict, logging
from PIL import Image
from tqdm import tqdm

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs.failures import (
    OnError,
    check_documents_input,
    mark_failed,
    validate_on_error,
)
from haystack_integrations.common.multimodal_rag.inputs.media import pdf_page_text_length
from haystack_integrations.common.multimodal_rag.inputs.planning import (
    iter_image_batches,
    plan_documents,
    raise_if_failed,
)
from haystack_integrations.common.multimodal_rag.validation import check_int, check_number, check_positive_int

logger = logging.getLogger(__name__)

#: Meta key with the measured values, on every image/page document the filter returns.
PAGE_QUALITY_META_KEY = "page_quality"
#: Meta key with the reason, on documents routed to `skipped_documents`.
SKIP_REASON_META_KEY = "skip_reason"

# Pages are measured on a grayscale copy at most this many pixels on its longest side: enough to keep a
# single line of body text visible, small enough to cost ~1 ms a page.
_ANALYSIS_SIDE = 512


class PageQuality(TypedDict):
    """What `PageQualityFilter` measured on one image or page (`meta["page_quality"]`)."""

    #: Fraction of pixels that differ from the page's background (its median gray) by more than
    #: `ink_threshold` gray levels.
    ink_coverage: float
    #: Standard deviation of the gray levels (0-255).
    pixel_std: float
    #: Non-whitespace characters in the PDF page's text layer (`None` for images).
    text_layer_chars: int | None


def measure_page(image: Image.Image, *, ink_threshold: int, text_layer_chars: int | None = None) -> PageQuality:
    """
    Measure how much content a page image carries.

    :param image: The page or image (any mode; measured in grayscale, downscaled to 512 px on its long side).
    :param ink_threshold: Gray-level distance from the background that counts as ink (1-255).
    :param text_layer_chars: Characters of the page's text layer, when it has one.
    :returns: The measurements.
    """
    gray = image.convert("L")
    if max(gray.size) > _ANALYSIS_SIDE:
        gray.thumbnail((_ANALYSIS_SIDE, _ANALYSIS_SIDE), reducing_gap=None)
    pixels = np.asarray(gray, dtype=np.int16)
    if pixels.size == 0:
        return PageQuality(ink_coverage=0.0, pixel_std=0.0, text_layer_chars=text_layer_chars)
    background = int(np.median(pixels))
    ink = float(np.count_nonzero(np.abs(pixels - background) > ink_threshold)) / pixels.size
    return PageQuality(ink_coverage=ink, pixel_std=float(pixels.std()), text_layer_chars=text_layer_chars)


@component
class PageQualityFilter:
    """
    Routes blank, separator and near-empty pages to `skipped_documents`, so they neither take index space nor
    crowd results. Place it between the converter and the embedders.

    Each image or PDF-page document is measured cheaply (no model): the share of "ink" pixels that stand out
    from the page's background, the gray-level spread, and, for PDF pages, the length of the text layer. A
    page is skipped when its text layer has fewer than `min_text_chars` characters AND its ink coverage is
    below `min_ink_coverage`; the reason and the measured values go into `meta["skip_reason"]` and
    `meta["page_quality"]`. Text documents pass through untouched. Nothing is dropped silently:
    `len(documents) + len(skipped_documents) + len(failed_documents) == len(input)`.

    An unreadable file is a failure, not a skip: `on_error="raise"` (default) raises one
    `DocumentProcessingError` naming every failing document; `on_error="skip"` returns them in
    `failed_documents` with `meta["embedding_error"]`.
    """

    def __init__(
        self,
        *,
        min_ink_coverage: float = 0.0005,
        ink_threshold: int = 48,
        min_text_chars: int = 1,
        batch_size: int = 16,
        root_path: str | None = None,
        file_path_meta_field: str = "file_path",
        on_error: OnError = "raise",
        progress_bar: bool = True,
    ) -> None:
        """
        Create the filter.

        :param min_ink_coverage: Pages with less ink than this fraction (and no text layer) are skipped. The
            default (0.05%) keeps a page with a single line of text and skips blank pages and noisy scans of
            blank paper.
        :param ink_threshold: Gray levels (1-255) a pixel must differ from the background to count as ink;
            scanner noise stays below it.
        :param min_text_chars: A PDF page whose text layer has at least this many non-whitespace characters is
            kept whatever its pixels look like. `0` ignores text layers.
        :param batch_size: Images decoded at a time (memory is bounded by the batch, not the corpus).
        :param root_path: Directory relative file paths are resolved in (and confined to).
        :param file_path_meta_field: Meta key holding image/PDF paths.
        :param on_error: `"raise"` or `"skip"` for unreadable documents.
        :param progress_bar: Show a progress bar.
        :raises ValueError: On invalid parameters.
        """
        check_number("min_ink_coverage", min_ink_coverage, minimum=0.0, maximum=1.0)
        check_int("ink_threshold", ink_threshold, minimum=1, maximum=255)
        check_int("min_text_chars", min_text_chars, minimum=0)
        check_positive_int("batch_size", batch_size)
        validate_on_error(on_error)
        self.min_ink_coverage = float(min_ink_coverage)
        self.ink_threshold = ink_threshold
        self.min_text_chars = min_text_chars
        self.batch_size = batch_size
        self.root_path = root_path
        self.file_path_meta_field = file_path_meta_field
        self.on_error = on_error
        self.progress_bar = progress_bar

    def _skip_reason(self, quality: PageQuality) -> str | None:
        chars = quality["text_layer_chars"]
        if self.min_text_chars > 0 and chars is not None and chars >= self.min_text_chars:
            return None
        if quality["ink_coverage"] >= self.min_ink_coverage:
            return None
        text_note = "no text layer" if chars is None else f"{chars} text-layer characters"
        return (
            f"low-content page: ink coverage {quality['ink_coverage']:.4%} < min_ink_coverage "
            f"{self.min_ink_coverage:.4%}, {text_note}"
        )

    @component.output_types(documents=list[Document], skipped_documents=list[Document], failed_documents=list[Document])
    def run(self, documents: list[Document]) -> dict[str, list[Document]]:
        """
        Measure every image and page document and route the low-content ones to `skipped_documents`.

        :param documents: Documents from a converter (text, image and page documents may be mixed).
        :returns: `documents` (kept, in input order, image/page ones with `meta["page_quality"]`),
            `skipped_documents` (with `meta["skip_reason"]` and `meta["page_quality"]`) and
            `failed_documents` (with `on_error="skip"`, with `meta["embedding_error"]`).
        :raises TypeError: When `documents` is not a list of Documents.
        :raises DocumentProcessingError: With `on_error="raise"`, naming every unreadable document.
        """
        check_documents_input("PageQualityFilter", documents)
        root = Path(self.root_path) if self.root_path is not None else None
        plan = plan_documents(
            documents, file_path_meta_field=self.file_path_meta_field, root_path=root, probe_pixels=False
        )
        failures = dict(plan.failures)
        measured: dict[int, PageQuality] = {}
        visual = plan.visual_indices()
        with tqdm(total=len(visual), desc="Checking page quality", disable=not self.progress_bar) as bar:
            for positions, images, failed in iter_image_batches(plan, visual, self.batch_size):
                failures.update(failed)
                for i, image in zip(positions, images, strict=True):
                    location = plan.locations[i]
                    try:
                        chars = pdf_page_text_length(location) if location.is_pdf else None
                    except MediaError as e:
                        failures[i] = str(e)
                        continue
                    measured[i] = measure_page(image, ink_threshold=self.ink_threshold, text_layer_chars=chars)
                bar.update(len(positions) + len(failed))
        if self.on_error == "raise":
            raise_if_failed("PageQualityFilter", documents, failures)
        kept: list[Document] = []
        skipped: list[Document] = []
        failed_docs: list[Document] = []
        for i, doc in enumerate(documents):
            if i in failures:
                failed_docs.append(mark_failed(doc, failures[i]))
                continue
            quality = measured.get(i)
            if quality is None:  # text
                kept.append(doc)
                continue
            meta: dict[str, Any] = {**doc.meta, PAGE_QUALITY_META_KEY: dict(quality)}
            reason = self._skip_reason(quality)
            if reason is None:
                kept.append(replace(doc, meta=meta))
            else:
                skipped.append(replace(doc, meta={**meta, SKIP_REASON_META_KEY: reason}))
        if skipped:
            logger.info(
                "PageQualityFilter skipped {n} low-content page(s) of {total}", n=len(skipped), total=len(documents)
            )
        return {"documents": kept, "skipped_documents": skipped, "failed_documents": failed_docs}

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize the component.

        :returns: The serialized component.
        """
        return default_to_dict(
            self,
            min_ink_coverage=self.min_ink_coverage,
            ink_threshold=self.ink_threshold,
            min_text_chars=self.min_text_chars,
            batch_size=self.batch_size,
            root_path=self.root_path,
            file_path_meta_field=self.file_path_meta_field,
            on_error=self.on_error,
            progress_bar=self.progress_bar,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PageQualityFilter:
        """
        Deserialize the component.

        :param data: The serialized component.
        :returns: The component.
        """
        return default_from_dict(cls, data)
