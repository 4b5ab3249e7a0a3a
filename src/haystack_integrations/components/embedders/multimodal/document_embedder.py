from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.document_stores.types import DocumentStore
from haystack.utils import ComponentDevice, Secret
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.dense import DenseEmbedderBase, PendingEmbeddings
from haystack_integrations.common.multimodal_rag.backends.loading import serialize_loading_params
from haystack_integrations.common.multimodal_rag.index_guard import model_record
from haystack_integrations.common.multimodal_rag.inputs.failures import validate_on_error
from haystack_integrations.common.multimodal_rag.inputs.indexing import IndexingRun
from haystack_integrations.common.multimodal_rag.inputs.media import MODALITY_META_KEY
from haystack_integrations.common.multimodal_rag.validation import batched, check_positive_int

logger = logging.getLogger(__name__)

_SOURCE_TYPE = {"text": "text", "image": "image", "page": "page"}


@component
class MultimodalDocumentEmbedder(DenseEmbedderBase):
    """
    Embeds text, image and PDF-page documents into ONE vector space with a CLIP-family dual encoder.

    Text documents go through the text tower; image documents (an image `blob`, or `meta["file_path"]`
    pointing at an image) and PDF-page documents (`meta["file_path"]` pointing at a PDF, page chosen by
    `meta["page_number"]`, 1-based) go through the vision tower. A text query embedded with
    `MultimodalTextEmbedder` and the same model can then retrieve images and pages.

    Each output document gets `embedding`, `meta["modality"]` (`"text"`, `"image"` or `"page"`),
    `meta["embedding_source"]` and the record of the model that embedded it: `meta["embedding_model"]` (id or
    path), `meta["embedding_model_fingerprint"]` (content fingerprint of the checkpoint),
    `meta["embedding_dimension"]` and `meta["embedding_normalized"]`. Documents are batched per modality; images
    are decoded one batch at a time, so memory is bounded by `batch_size`, not by the corpus.

    The text tower reads a bounded number of tokens (64 for SigLIP / SigLIP 2, 77 for CLIP); longer texts are
    truncated, and a warning names the documents that were. Split long texts first (Haystack's
    `DocumentSplitter`, as the shipped `indexing.yaml` does).

    Embedding-model guard: given the index's `document_store`, `warm_up()` refuses (with
    `EmbeddingModelMismatchError`, naming both models) to embed for an index that already holds vectors of
    another model. The check runs once per store.

    Bad input (missing, corrupt or zero-byte files, truncated PDFs, pages beyond the PDF, paths outside
    `root_path`, decompression bombs, unsupported MIME types, documents with neither text nor image):
    with `on_error="raise"` one error names every failing document id and reason before anything is
    returned; with `on_error="skip"` the failures come back in `failed_documents` with
    `meta["embedding_error"]`.

    ### Usage example
    ```python
    from haystack import Document
    from haystack_integrations.components.embedders.multimodal import MultimodalDocumentEmbedder

    embedder = MultimodalDocumentEmbedder(model="google/siglip-so400m-patch14-384")
    result = embedder.run(documents=[
        Document(content="Quarterly revenue grew 12%"),
        Document(meta={"file_path": "charts/revenue.png"}),
        Document(meta={"file_path": "reports/annual.pdf", "page_number": 3}),
    ])
    print([d.meta["modality"] for d in result["documents"]])  # ['text', 'image', 'page']
    ```
    """

    _GUARD_ROLE = "write"

    def __init__(
        self,
        model: str = "google/siglip-so400m-patch14-384",
        *,
        file_path_meta_field: str = "file_path",
        root_path: str | None = None,
        device: ComponentDevice | None = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        batch_size: int = 16,
        progress_bar: bool = True,
        normalize_embeddings: bool = True,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        on_error: str = "raise",
        document_store: DocumentStore | None = None,
    ) -> None:
        """
        Create the embedder. Nothing is loaded until `warm_up()`.

        :param model: Hugging Face model id or local path of a CLIP-family dual encoder (CLIP, SigLIP, SigLIP 2).
        :param file_path_meta_field: Meta key holding the path of a document's image or PDF.
        :param root_path: Directory that relative file paths are resolved in; paths escaping it are refused.
        :param device: Device to run on; `None` picks the best available.
        :param token: Hugging Face token, for gated or private models.
        :param batch_size: Documents per forward pass (per modality).
        :param progress_bar: Show a progress bar.
        :param normalize_embeddings: L2-normalise embeddings (use cosine or dot-product retrieval).
        :param local_files_only: Only use a local path or the local Hugging Face cache.
        :param model_kwargs: Extra keyword arguments for `AutoModel.from_pretrained` (e.g. `{"dtype": "float32"}`).
            Without a `dtype`: bfloat16 on CUDA (float16 if the checkpoint records it), float32 on the CPU unless
            the checkpoint records bfloat16 and the CPU computes bfloat16 natively.
        :param on_error: `"raise"` (one error naming every bad document) or `"skip"` (return them in
            `failed_documents`). Bad inputs include a document id that repeats within one batch (a store would
            keep only one of them): the later duplicates fail, naming the id.
        :param document_store: The document store this embedder's documents are written to (the writer's). When
            given, `warm_up()` refuses an index that holds vectors of another model. `None` disables the check.
        :raises ValueError: On an invalid `batch_size` or `on_error`.
        """
        check_positive_int("batch_size", batch_size)
        validate_on_error(on_error)
        self._init_dense(model, device, token, normalize_embeddings, local_files_only, model_kwargs, document_store)
        self.file_path_meta_field = file_path_meta_field
        self.root_path = root_path
        self.batch_size = batch_size
        self.progress_bar = progress_bar
        self.on_error = on_error

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            **serialize_loading_params(self),
            file_path_meta_field=self.file_path_meta_field,
            root_path=self.root_path,
            batch_size=self.batch_size,
            progress_bar=self.progress_bar,
            normalize_embeddings=self.normalize_embeddings,
            on_error=self.on_error,
            document_store=self.document_store,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultimodalDocumentEmbedder:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    @component.output_types(documents=list[Document], failed_documents=list[Document])
    def run(self, documents: list[Document]) -> dict[str, list[Document]]:
        """
        Embed text, image and PDF-page documents.

        :param documents: The documents; they are not modified.
        :returns: A dictionary with:
            - `documents`: the embedded documents, in input order, with `embedding`, `meta["modality"]` and
              `meta["embedding_source"]` and the embedding-model record (`meta["embedding_model"]`,
              `meta["embedding_model_fingerprint"]`, `meta["embedding_dimension"]`, `meta["embedding_normalized"]`).
            - `failed_documents`: with `on_error="skip"`, the documents that could not be embedded, each
              with `meta["embedding_error"]`; always empty with `on_error="raise"`.
        :raises TypeError: If `documents` is not a list of Documents.
        :raises DocumentProcessingError: With `on_error="raise"`, when any document cannot be embedded.
        :raises ModelLoadError: When the model cannot be loaded.
        :raises EmbeddingModelMismatchError: When `document_store` holds vectors of another model.
        """
        component_name = type(self).__name__
        # Headers and integrity are checked up front; pixels are decoded once, in their batch. A file that only
        # fails when decoded (e.g. a truncated JPEG) joins the same single error: nothing is returned before it.
        run = IndexingRun.start(self, documents)
        if run is None:
            return {"documents": [], "failed_documents": []}
        self.warm_up()
        assert self._encoder is not None
        encoder = self._encoder
        plan = run.plan
        record = model_record(encoder.identity(), normalized=self.normalize_embeddings)
        truncated: list[tuple[str, int]] = []

        def doomed() -> bool:
            # With on_error="raise" and a failure known, the rest is only decoded, to name every bad file.
            return bool(run.failures) and self.on_error == "raise"

        embeddings: dict[int, np.ndarray] = {}
        # Batches queued on the GPU whose embeddings are not back yet: at most two, so the next forward is queued
        # while one runs (the GPU does not wait for the host between batches) and inputs stay bounded.
        pending: deque[tuple[list[int], PendingEmbeddings]] = deque()

        def collect(keep: int) -> None:
            while len(pending) > keep:
                positions, result = pending.popleft()
                embeddings.update(zip(positions, result.result(), strict=True))

        def prepare(_positions: list[int], images: list[Image.Image]) -> dict[str, Any] | None:
            # The image processor runs in the background thread, beside the model's work on the previous batch.
            return encoder.image_inputs(images) if images and not doomed() else None

        def embed_images(
            positions: list[int], _images: list[Image.Image], _failed: dict[int, str], inputs: dict[str, Any] | None
        ) -> dict[int, str]:
            if inputs is not None and not doomed():
                pending.append((positions, encoder.start_embedding(inputs, normalize=self.normalize_embeddings)))
                collect(keep=1)
            return {}

        text_indices = plan.indices("text")
        visual_indices = plan.visual_indices()
        with run.progress(
            len(text_indices) + len(visual_indices), encoder.model_id, "doc", enabled=self.progress_bar
        ) as bar:
            for chunk in batched(text_indices, self.batch_size):
                if doomed():
                    break
                texts = [documents[i].content or "" for i in chunk]
                for i, count in zip(chunk, encoder.token_counts(texts), strict=True):
                    if count > encoder.max_length:
                        truncated.append((documents[i].id, count))
                vectors = encoder.embed_texts(texts, normalize=self.normalize_embeddings)
                embeddings.update(zip(chunk, vectors, strict=True))
                bar.update(len(chunk))
            run.embed_image_batches(visual_indices, self.batch_size, embed_images, prepare=prepare, progress_bar=bar)
            collect(keep=0)
        run.raise_if_failed()
        if truncated:
            shown = ", ".join(f"'{doc_id}' ({count} tokens)" for doc_id, count in truncated[:10])
            more = f" and {len(truncated) - 10} more" if len(truncated) > 10 else ""
            logger.warning(
                "{component}: {count} text document(s) are longer than the {max_length} tokens the text tower of "
                "'{model}' reads and were truncated (only their beginning is embedded): {ids}{more}. Split long "
                "texts first, e.g. with Haystack's DocumentSplitter as examples/pipelines/indexing.yaml does.",
                component=component_name,
                count=len(truncated),
                max_length=encoder.max_length,
                model=encoder.model_id,
                ids=shown,
                more=more,
            )

        def make_output(i: int, doc: Document) -> Document:
            modality = plan.modalities[i]
            assert modality is not None
            source = plan.sources.get(i)
            meta = {
                **doc.meta,
                MODALITY_META_KEY: modality,
                "embedding_source": {
                    "type": _SOURCE_TYPE[modality],
                    "file_path_meta_field": self.file_path_meta_field
                    if source is not None and source.path is not None
                    else None,
                },
                **record,
            }
            return replace(doc, embedding=embeddings[i].tolist(), meta=meta)

        result = run.outputs(make_output)
        if result["failed_documents"]:
            logger.warning(
                "{component} skipped {count} document(s) that could not be embedded; see their "
                "meta['embedding_error'] in 'failed_documents'",
                component=component_name,
                count=len(result["failed_documents"]),
            )
        return result
