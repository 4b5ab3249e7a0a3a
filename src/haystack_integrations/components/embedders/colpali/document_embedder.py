from __future__ import annotations

from dataclasses import replace
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.utils import ComponentDevice, Secret
from tqdm import tqdm

from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec, serialize_loading_params
from haystack_integrations.common.multimodal_rag.inputs.failures import check_documents_input, validate_on_error
from haystack_integrations.common.multimodal_rag.inputs.media import MODALITY_META_KEY
from haystack_integrations.common.multimodal_rag.inputs.planning import (
    iter_image_batches,
    plan_documents,
    raise_if_failed,
    split_outputs,
)
from haystack_integrations.common.multimodal_rag.validation import check_positive_int
from haystack_integrations.document_stores.multivector.protocol import (
    MultiVectorStore,
    check_store_compatible,
    with_store_from_dict,
)

logger = logging.getLogger(__name__)

MULTIVECTOR_COUNT_META_KEY = "multivector_count"


@component
class ColPaliDocumentEmbedder:
    """
    Computes the ColPali multi-vector of every image and PDF-page document ONCE, at indexing time, and stores it.

    Each page becomes ~1000 vectors of 128 dimensions (one per image patch), written to `multivector_store`
    under the document id; `ColPaliRanker` later scores queries against them with MaxSim without encoding
    any page at query time. Documents are passed on with `meta["multivector_count"]`; text-only documents
    pass through untouched. Source rules and bad-input handling are those of `MultimodalDocumentEmbedder`.

    The model family (ColPali, ColQwen2, ColQwen2.5, ColIdefics3/ColSmol, ...) is read from the checkpoint's
    configuration.

    ### Usage example
    ```python
    from haystack import Document
    from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder
    from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore

    store = InMemoryMultiVectorStore()
    embedder = ColPaliDocumentEmbedder(model="vidore/colqwen2.5-v0.2", multivector_store=store)
    embedder.run(documents=[Document(meta={"file_path": "report.pdf", "page_number": 1})])
    print(store.count())  # 1
    ```
    """

    def __init__(
        self,
        model: str = "vidore/colqwen2.5-v0.2",
        *,
        multivector_store: MultiVectorStore,
        file_path_meta_field: str = "file_path",
        root_path: str | None = None,
        device: ComponentDevice | None = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        batch_size: int = 4,
        pool_factor: int | None = None,
        progress_bar: bool = True,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        on_error: str = "raise",
    ) -> None:
        """
        Create the embedder. Nothing is loaded until `warm_up()`.

        :param model: Hugging Face id or local path of a ColPali-family checkpoint.
        :param multivector_store: Where page multi-vectors are written (`InMemoryMultiVectorStore`,
            `SQLiteMultiVectorStore`, `QdrantMultiVectorStore`).
        :param file_path_meta_field: Meta key holding the path of a document's image or PDF.
        :param root_path: Directory that relative file paths are resolved in; paths escaping it are refused.
        :param device: Device to run on; `None` picks the best available.
        :param token: Hugging Face token, for gated or private models.
        :param batch_size: Pages per forward pass.
        :param pool_factor: Optional hierarchical token pooling: store ~`pool_factor` times fewer vectors.
        :param progress_bar: Show a progress bar.
        :param local_files_only: Only use a local path or the local Hugging Face cache.
        :param model_kwargs: Extra keyword arguments for the model's `from_pretrained`
            (e.g. `{"dtype": "bfloat16", "attn_implementation": "sdpa"}`).
        :param on_error: `"raise"` (one error naming every bad document) or `"skip"` (return them in
            `failed_documents`).
        :raises ValueError: On invalid parameters.
        """
        check_positive_int("batch_size", batch_size)
        if pool_factor is not None:
            check_positive_int("pool_factor", pool_factor)
        validate_on_error(on_error)
        if multivector_store is None:
            msg = "ColPaliDocumentEmbedder needs a multivector_store to write page multi-vectors to"
            raise ValueError(msg)
        self.model = model
        self.multivector_store = multivector_store
        self.file_path_meta_field = file_path_meta_field
        self.root_path = root_path
        self.device = device
        self.token = token
        self.batch_size = batch_size
        self.pool_factor = pool_factor
        self.progress_bar = progress_bar
        self.local_files_only = local_files_only
        self.model_kwargs = model_kwargs
        self.on_error = on_error
        self._encoder: LateInteractionEncoder | None = None

    def warm_up(self) -> None:
        """
        Load the model and check that the store fits it (idempotent).

        :raises ModelLoadError: When the model cannot be loaded.
        :raises MultiVectorStoreError: When the store holds another width or another model's vectors.
        """
        if self._encoder is None:
            encoder = LateInteractionEncoder.get(LoadSpec.of(self))
            check_store_compatible(
                self.multivector_store, dim=encoder.dim, model=self.model, component=type(self).__name__
            )
            self._encoder = encoder

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component (and its store's settings) to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            **serialize_loading_params(self),
            multivector_store=self.multivector_store.to_dict(),
            file_path_meta_field=self.file_path_meta_field,
            root_path=self.root_path,
            batch_size=self.batch_size,
            pool_factor=self.pool_factor,
            progress_bar=self.progress_bar,
            on_error=self.on_error,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ColPaliDocumentEmbedder:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, with_store_from_dict(data))

    @component.output_types(documents=list[Document], failed_documents=list[Document])
    def run(self, documents: list[Document]) -> dict[str, list[Document]]:
        """
        Encode image and PDF-page documents and write their multi-vectors to the store.

        :param documents: The documents; they are not modified.
        :returns: A dictionary with:
            - `documents`: every document that did not fail, in input order; image/page documents carry
              `meta["multivector_count"]`, text documents are passed on untouched.
            - `failed_documents`: with `on_error="skip"`, the documents that could not be encoded, each with
              `meta["embedding_error"]`.
        :raises DocumentProcessingError: With `on_error="raise"`, when any document cannot be encoded (raised
            before anything is written).
        """
        component_name = type(self).__name__
        check_documents_input(component_name, documents)
        if not documents:
            return {"documents": [], "failed_documents": []}
        self.warm_up()
        assert self._encoder is not None
        encoder = self._encoder

        # Every image is decoded once up front (cheap next to the model) so that, with on_error="raise", no bad
        # file is discovered after earlier batches were written to the store.
        plan = plan_documents(
            documents, file_path_meta_field=self.file_path_meta_field, root_path=self.root_path, probe_pixels=True
        )
        failures = dict(plan.failures)
        if self.on_error == "raise":
            raise_if_failed(component_name, documents, failures)

        counts: dict[int, int] = {}
        visual = plan.visual_indices()
        with tqdm(
            total=len(visual), disable=not self.progress_bar, desc=f"{component_name} ({encoder.model_id})", unit="page"
        ) as bar:
            for positions, images, failed in iter_image_batches(plan, visual, self.batch_size):
                if failed and self.on_error == "raise":
                    raise_if_failed(component_name, documents, failed)
                failures.update(failed)
                if images:
                    vectors = encoder.embed_images(images, pool_factor=self.pool_factor)
                    batch = {documents[i].id: v for i, v in zip(positions, vectors, strict=True)}
                    self.multivector_store.write(batch)
                    counts.update({i: int(v.shape[0]) for i, v in zip(positions, vectors, strict=True)})
                for image in images:
                    image.close()
                bar.update(len(positions) + len(failed))

        def make_output(i: int, doc: Document) -> Document:
            if i not in counts:
                return doc  # text: untouched
            meta = {**doc.meta, MULTIVECTOR_COUNT_META_KEY: counts[i]}
            modality = plan.modalities[i]
            if modality is not None:
                meta.setdefault(MODALITY_META_KEY, modality)
            return replace(doc, meta=meta)

        return split_outputs(documents, failures, make_output)
