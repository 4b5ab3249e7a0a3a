from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.utils import ComponentDevice, Secret
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder, check_processor_kwargs
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec, serialize_loading_params
from haystack_integrations.common.multimodal_rag.inputs.failures import OnError, validate_on_error
from haystack_integrations.common.multimodal_rag.inputs.indexing import IndexingRun
from haystack_integrations.common.multimodal_rag.inputs.media import MODALITY_META_KEY
from haystack_integrations.common.multimodal_rag.inputs.planning import iter_image_batches, raise_if_failed
from haystack_integrations.common.multimodal_rag.validation import check_positive_int
from haystack_integrations.document_stores.multivector.protocol import (
    MultiVectorStore,
    check_store_compatible,
    with_store_from_dict,
)

logger = logging.getLogger(__name__)

MULTIVECTOR_COUNT_META_KEY = "multivector_count"

#: The `Document` field Haystack 3.5 added for multi-vector embeddings.
MULTIVECTOR_FIELD = "multivector_embedding"


def document_has_multivector_field() -> bool:
    """Whether the installed Haystack's `Document` has a `multivector_embedding` field (Haystack >= 3.5)."""
    return any(f.name == MULTIVECTOR_FIELD for f in dataclasses.fields(Document))


@component
class ColPaliDocumentEmbedder:
    """
    Computes the ColPali multi-vector of every image and PDF-page document ONCE, at indexing time, and stores it.

    Each page becomes ~1000 vectors of 128 dimensions (one per image patch), written to `multivector_store`
    under the document id; `ColPaliRanker` later scores queries against them with MaxSim without encoding
    any page at query time. Documents are passed on with `meta["multivector_count"]`; text-only documents
    pass through untouched. Source rules and bad-input handling are those of `MultimodalDocumentEmbedder`.

    The model family (ColPali, ColQwen2, ColQwen2.5, ColQwen3, ColQwen3.5, ColGemma3, ColIdefics3/ColSmol,
    ColModernVBert) is read from the checkpoint's configuration; pages are processed as the checkpoint was trained
    (e.g. ColQwen2/2.5: at most 768 visual tokens per page unless `processor_kwargs` says otherwise).

    Bad inputs: unreadable files, pages the model's processor refuses (e.g. a 1600x6 banner: Qwen processors refuse
    aspect ratios above 200) and repeated document ids are named failures. With `on_error="raise"` every
    document is checked (decoded, and its size checked against the processor's rules) before any model work, so
    nothing is written when any document fails; batches are then written as they are encoded (memory bounded by the
    batch, and an interrupted run keeps what it wrote).

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
        processor_kwargs: dict[str, Any] | None = None,
        fill_multivector_embedding: bool = False,
        on_error: OnError = "raise",
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
        :param processor_kwargs: Extra keyword arguments for the processor's `from_pretrained`, e.g. a visual-token
            budget `{"max_num_visual_tokens": 768}` (ColQwen2/2.5). `None` uses the training recipe's settings
            (ColQwen2/2.5: 768 visual tokens per page; other families: the checkpoint's processor config).
        :param fill_multivector_embedding: Also set `Document.multivector_embedding` (`list[list[float]]`) on the
            output documents, for stores that keep multi-vectors in the document (needs Haystack >= 3.5).
        :param on_error: `"raise"` (one error naming every bad document; nothing is written) or `"skip"` (return
            them in `failed_documents`).
        :raises TypeError: If `processor_kwargs` is neither a dict nor `None`.
        :raises ValueError: On invalid parameters, or `fill_multivector_embedding=True` with a Haystack whose
            `Document` has no `multivector_embedding` field.
        """
        check_positive_int("batch_size", batch_size)
        if pool_factor is not None:
            check_positive_int("pool_factor", pool_factor)
        validate_on_error(on_error)
        check_processor_kwargs(processor_kwargs)
        if fill_multivector_embedding and not document_has_multivector_field():
            import haystack

            msg = (
                "ColPaliDocumentEmbedder(fill_multivector_embedding=True) needs a Haystack whose Document has a "
                f"'{MULTIVECTOR_FIELD}' field (Haystack >= 3.5); the installed Haystack {haystack.__version__} has "
                "none. Upgrade Haystack or leave fill_multivector_embedding=False (the vectors are in the store)."
            )
            raise ValueError(msg)
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
        self.processor_kwargs = processor_kwargs
        self.fill_multivector_embedding = fill_multivector_embedding
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
                self.multivector_store,
                dim=encoder.dim,
                model=self.model,
                # The checkpoint's content identity: a moved or copied model folder still fits its index.
                fingerprint=encoder.fingerprint,
                component=type(self).__name__,
                # Recorded in the store so a ranker pools pages it encodes on the fly the same way.
                pool_factor=self.pool_factor if self.pool_factor is not None else 1,
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
            processor_kwargs=self.processor_kwargs,
            fill_multivector_embedding=self.fill_multivector_embedding,
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
              `meta["multivector_count"]` (and `multivector_embedding` with `fill_multivector_embedding=True`),
              text documents are passed on untouched.
            - `failed_documents`: with `on_error="skip"`, the documents that could not be encoded (unreadable,
              refused by the processor, or a repeated id), each with `meta["embedding_error"]`.
        :raises DocumentProcessingError: With `on_error="raise"`, when any document cannot be encoded; nothing is
            written to the store then.
        """
        run = IndexingRun.start(self, documents)
        if run is None:
            return {"documents": [], "failed_documents": []}
        # With on_error="raise", repeated ids and unreadable files are named before the model is loaded.
        run.raise_if_failed()
        self.warm_up()
        assert self._encoder is not None
        encoder = self._encoder
        plan = run.plan
        visual = plan.visual_indices()
        if self.on_error == "raise":
            # Every image is decoded and checked against the processor's size rules up front, one batch at a time,
            # so that no bad document is discovered after earlier batches were written.
            run.failures.update(self._validate(encoder, documents, plan, visual))
            run.raise_if_failed()

        counts: dict[int, int] = {}
        filled: dict[int, list[list[float]]] = {}  # only with fill_multivector_embedding=True

        def prepare(
            positions: list[int], images: list[Image.Image]
        ) -> tuple[_ProcessedBatch, list[int], dict[int, str]]:
            # The processor runs in the background thread, beside the model's work on the previous batch.
            batch, kept_positions, refused = self._process(encoder, documents, positions, images)
            return _ProcessedBatch(encoder.pinned(batch.inputs), batch.kept), kept_positions, refused

        def write_batch(
            _positions: list[int],
            images: list[Image.Image],
            failed: dict[int, str],
            processed: tuple[_ProcessedBatch, list[int], dict[int, str]],
        ) -> dict[int, str]:
            batch, positions, refused = processed
            if self.on_error == "raise" and (failed or refused):
                raise_if_failed(run.component, documents, {**failed, **refused})
            if positions:
                kept = [images[k] for k in batch.kept]
                vectors = encoder.embed_images(kept, pool_factor=self.pool_factor, batch=batch.inputs)
                self.multivector_store.write({documents[i].id: v for i, v in zip(positions, vectors, strict=True)})
                counts.update({i: int(v.shape[0]) for i, v in zip(positions, vectors, strict=True)})
                if self.fill_multivector_embedding:
                    filled.update({i: v.tolist() for i, v in zip(positions, vectors, strict=True)})
            return refused

        with run.progress(len(visual), encoder.model_id, "page", enabled=self.progress_bar) as bar:
            run.embed_image_batches(visual, self.batch_size, write_batch, prepare=prepare, progress_bar=bar)

        def make_output(i: int, doc: Document) -> Document:
            if i not in counts:
                return doc  # text: untouched
            meta = {**doc.meta, MULTIVECTOR_COUNT_META_KEY: counts[i]}
            modality = plan.modalities[i]
            if modality is not None:
                meta.setdefault(MODALITY_META_KEY, modality)
            if self.fill_multivector_embedding:
                fields: dict[str, Any] = {"meta": meta, MULTIVECTOR_FIELD: filled[i]}
                return replace(doc, **fields)
            return replace(doc, meta=meta)

        return run.outputs(make_output)

    def _validate(
        self, encoder: LateInteractionEncoder, documents: list[Document], plan: Any, visual: list[int]
    ) -> dict[int, str]:
        """Decode every visual document (batch by batch) and check it against the processor's size rules."""
        failures: dict[int, str] = {}
        for positions, images, failed in iter_image_batches(plan, visual, self.batch_size):
            failures.update(failed)
            for i, image in zip(positions, images, strict=True):
                try:
                    encoder.check_image(image)
                except ValueError as e:
                    failures[i] = _refusal(encoder, documents[i], image, e)
                finally:
                    image.close()
        return failures

    @staticmethod
    def _process(
        encoder: LateInteractionEncoder, documents: list[Document], positions: list[int], images: list[Any]
    ) -> tuple[_ProcessedBatch, list[int], dict[int, str]]:
        """
        Run the processor on a batch; when it refuses the batch, find the images it refuses, one by one.

        :returns: The processed batch of the accepted images, their positions, and the reason per refused position.
        """
        if not images:
            return _ProcessedBatch(None, []), [], {}
        try:
            return _ProcessedBatch(encoder.process_images(images), list(range(len(images)))), positions, {}
        except Exception:  # the processor's errors are not typed (ValueError, TypeError, ...): find the culprit
            pass
        kept: list[int] = []
        refused: dict[int, str] = {}
        for k, (i, image) in enumerate(zip(positions, images, strict=True)):
            try:
                encoder.process_images([image])
                kept.append(k)
            except Exception as e:  # any refusal becomes this document's named failure
                refused[i] = _refusal(encoder, documents[i], image, e)
        if not kept:
            return _ProcessedBatch(None, []), [], refused
        inputs = encoder.process_images([images[k] for k in kept])
        return _ProcessedBatch(inputs, kept), [positions[k] for k in kept], refused


def _refusal(encoder: LateInteractionEncoder, document: Document, image: Any, error: Exception) -> str:
    return (
        f"{encoder.family.processor_class} refused the {image.width}x{image.height} image of document "
        f"'{document.id}': {type(error).__name__}: {error}"
    )


@dataclasses.dataclass
class _ProcessedBatch:
    """A processor batch and the indices (into the loaded images) of the images it holds."""

    inputs: Any
    kept: list[int]
