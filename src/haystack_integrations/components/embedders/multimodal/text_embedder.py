from __future__ import annotations

from typing import Any

from haystack import component, default_from_dict, default_to_dict, logging
from haystack.document_stores.types import DocumentStore
from haystack.utils import ComponentDevice, Secret

from haystack_integrations.common.multimodal_rag.backends.dense import DenseEmbedderBase
from haystack_integrations.common.multimodal_rag.backends.loading import serialize_loading_params
from haystack_integrations.common.multimodal_rag.validation import check_query

logger = logging.getLogger(__name__)


@component
class MultimodalTextEmbedder(DenseEmbedderBase):
    """
    Embeds a query string with the text tower of a CLIP-family dual encoder.

    Use it with `MultimodalDocumentEmbedder` and the same model: the query vector lives in the same space
    as the text, image and PDF-page documents, so a text query retrieves images.

    The text tower reads a bounded number of tokens (64 for SigLIP / SigLIP 2, 77 for CLIP): a longer query is
    truncated, with a warning. Given the index's `document_store`, it refuses (once, not per query) an index
    built with another model.

    ### Usage example
    ```python
    from haystack_integrations.components.embedders.multimodal import MultimodalTextEmbedder

    embedder = MultimodalTextEmbedder(model="google/siglip-so400m-patch14-384")
    print(len(embedder.run(text="a bar chart of revenue by quarter")["embedding"]))  # 1152
    ```
    """

    def __init__(
        self,
        model: str = "google/siglip-so400m-patch14-384",
        *,
        device: ComponentDevice | None = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        normalize_embeddings: bool = True,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        document_store: DocumentStore | None = None,
    ) -> None:
        """
        Create the embedder. Nothing is loaded until `warm_up()`.

        :param model: Hugging Face model id or local path of a CLIP-family dual encoder.
        :param device: Device to run on; `None` picks the best available.
        :param token: Hugging Face token, for gated or private models.
        :param normalize_embeddings: L2-normalise the embedding.
        :param local_files_only: Only use a local path or the local Hugging Face cache.
        :param model_kwargs: Extra keyword arguments for `AutoModel.from_pretrained`.
        :param document_store: The document store the retriever searches. When given, the embedder checks once
            (at `warm_up()`, or at the first run that finds documents) that the index was built with the same
            model, and otherwise fails with `EmbeddingModelMismatchError` naming both models. `None` disables
            the check.
        """
        self._init_dense(model, device, token, normalize_embeddings, local_files_only, model_kwargs, document_store)

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            **serialize_loading_params(self),
            normalize_embeddings=self.normalize_embeddings,
            document_store=self.document_store,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultimodalTextEmbedder:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    @component.output_types(embedding=list[float])
    def run(self, text: str) -> dict[str, list[float]]:
        """
        Embed one string.

        :param text: The query.
        :returns: `{"embedding": list[float]}`.
        :raises TypeError: If `text` is not a string.
        :raises ValueError: If `text` is empty or only whitespace.
        :raises EmbeddingModelMismatchError: When `document_store` holds vectors of another model.
        """
        check_query(type(self).__name__, text)
        self.warm_up()
        assert self._encoder is not None
        count = self._encoder.token_counts([text])[0]
        if count > self._encoder.max_length:
            logger.warning(
                "{component}: the query has {count} tokens; the text tower of '{model}' reads {max_length}, so only "
                "its beginning is embedded.",
                component=type(self).__name__,
                count=count,
                model=self._encoder.model_id,
                max_length=self._encoder.max_length,
            )
        vector = self._encoder.embed_texts([text], normalize=self.normalize_embeddings)[0]
        return {"embedding": vector.tolist()}
