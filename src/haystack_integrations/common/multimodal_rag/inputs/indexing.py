"""The indexing loop that `MultimodalDocumentEmbedder` and `ColPaliDocumentEmbedder` share.

Both embedders take a batch of documents through the same steps: check the input, plan it (classify, locate
and header-check every document; a later repeat of an id is a failure), stream the image/page documents' pixels
batch by batch (each image decoded once, in its batch, and closed after it), and split the result into
`documents` / `failed_documents`. What each does with a batch of images differs and stays in the component:
the dense embedder embeds them (and, once a failure is known with `on_error="raise"`, only decodes the rest to
name every bad file); the ColPali embedder checks every page before it writes anything, then writes batch by
batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from haystack import Document
from PIL import Image
from tqdm import tqdm

from haystack_integrations.common.multimodal_rag.inputs.failures import check_documents_input, duplicate_id_failures
from haystack_integrations.common.multimodal_rag.inputs.planning import (
    DocumentPlan,
    iter_prepared_batches,
    plan_documents,
    raise_if_failed,
    split_outputs,
)

#: Embeds one decoded batch: `(positions, images, failed, prepared)` -> reason per further failed position (e.g. an
#: image the model's processor refuses). `failed` holds the positions of the batch whose file could not be decoded;
#: `prepared` is what the run's `BatchPreparer` returned for the batch (`None` without one).
BatchEmbedder = Callable[[list[int], list[Image.Image], dict[int, str], Any], dict[int, str]]
#: Prepares one decoded batch in the background thread: `(positions, images)` -> what `BatchEmbedder` receives.
BatchPreparer = Callable[[list[int], list[Image.Image]], Any]


class IndexingComponent(Protocol):
    """What `IndexingRun.start` reads from a document embedder (read-only, so `Literal` values fit)."""

    @property
    def file_path_meta_field(self) -> str: ...

    @property
    def root_path(self) -> str | None: ...

    @property
    def on_error(self) -> str: ...


@dataclass
class IndexingRun:
    """
    One `run()` of a document embedder: the input, its plan, and every failure known so far.

    :param component: Component name, for messages.
    :param documents: The input documents (never modified).
    :param plan: What each document is and where its pixels are.
    :param on_error: `"raise"` or `"skip"`.
    :param failures: Reason per failed position (the plan's failures, then those found while embedding).
    """

    component: str
    documents: list[Document]
    plan: DocumentPlan
    on_error: str
    failures: dict[int, str]

    @classmethod
    def start(cls, embedder: IndexingComponent, documents: object) -> IndexingRun | None:
        """
        Check the input and plan it. Pixels are not decoded here (only headers and integrity are checked).

        :param embedder: The document embedder; its class name, `file_path_meta_field`, `root_path` and
            `on_error` are used.
        :param documents: What the component received.
        :returns: The run, or `None` for an empty input (nothing to do).
        :raises TypeError: If `documents` is not a list of Documents.
        """
        component = type(embedder).__name__
        check_documents_input(component, documents)
        assert isinstance(documents, list)
        if not documents:
            return None
        plan = plan_documents(
            documents,
            file_path_meta_field=embedder.file_path_meta_field,
            root_path=embedder.root_path,
            probe_pixels=False,
        )
        # A store keeps one entry per id: a later repeat is a failure (a document that is also broken keeps the
        # reason it is broken).
        for i, reason in duplicate_id_failures(documents).items():
            plan.failures.setdefault(i, reason)
        return cls(component, documents, plan, embedder.on_error, dict(plan.failures))

    def raise_if_failed(self) -> None:
        """
        With `on_error="raise"`, raise one error naming every failure known so far (if there is any).

        :raises DocumentProcessingError: When `on_error="raise"` and a document failed.
        """
        if self.on_error == "raise":
            raise_if_failed(self.component, self.documents, self.failures)

    def progress(self, total: int, model_id: str, unit: str, *, enabled: bool) -> tqdm:
        """
        The progress bar of this run.

        :param total: Number of items.
        :param model_id: The model, shown in the description.
        :param unit: The unit shown ("doc", "page").
        :param enabled: Show the bar (the component's `progress_bar`).
        :returns: A `tqdm` bar (a context manager).
        """
        return tqdm(total=total, disable=not enabled, desc=f"{self.component} ({model_id})", unit=unit)

    def embed_image_batches(
        self,
        indices: Sequence[int],
        batch_size: int,
        embed: BatchEmbedder,
        *,
        prepare: BatchPreparer | None = None,
        progress_bar: tqdm | None = None,
    ) -> None:
        """
        Decode the images of `indices` one batch at a time (the next one in the background), hand each to `embed`.

        Decoding failures join `failures` before `embed` is called; the reasons `embed` returns join it after.
        Every image is closed after its batch, also when `embed` raises.

        :param indices: Positions of the documents to decode (image/page documents that have not failed).
        :param batch_size: Images per batch.
        :param embed: Called once per batch, also for a batch in which nothing decoded (`images` empty), with
            what `prepare` returned for the batch (`None` without `prepare`).
        :param prepare: Runs in the background thread after decoding (e.g. the model's processor), so that the
            caller's thread only runs the model: `(positions, images)` -> anything `embed` needs.
        :param progress_bar: Advanced by the size of each batch.
        """

        def nothing(_positions: list[int], _images: list[Image.Image]) -> None:
            return None

        batches = iter_prepared_batches(self.plan, indices, batch_size, prepare or nothing)
        for positions, images, failed, prepared in batches:
            self.failures.update(failed)
            try:
                refused = embed(positions, images, failed, prepared)
            finally:
                for image in images:
                    image.close()
            self.failures.update(refused)
            if progress_bar is not None:
                progress_bar.update(len(positions) + len(failed))

    def outputs(self, make_output: Callable[[int, Document], Document]) -> dict[str, list[Document]]:
        """
        Build `documents` (in input order) and `failed_documents` (each with `meta["embedding_error"]`).

        :param make_output: Builds the output document of a position that did not fail.
        :returns: `{"documents": [...], "failed_documents": [...]}`.
        """
        return split_outputs(self.documents, self.failures, make_output)
