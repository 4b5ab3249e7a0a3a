from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict
from haystack.dataclasses import ByteStream, ImageContent
from haystack.document_stores.types import DocumentStore
from haystack.utils import ComponentDevice, Secret

from haystack_integrations.common.multimodal_rag.backends.dense import DenseEmbedderBase
from haystack_integrations.common.multimodal_rag.backends.loading import serialize_loading_params
from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs.media import (
    VISUAL_MODALITIES,
    classify,
    load_image,
    locate,
    looks_like_media_path,
)


def _looks_like_query_text(image: Any) -> bool:
    """
    Whether a file name the loader reported missing reads like a text query sent to the image embedder by mistake:
    a string with no folder, no image/PDF extension ('IMG 0001.jpg' is a file name) and spaces or no extension.
    """
    if not isinstance(image, str) or "/" in image or "\\" in image or looks_like_media_path(image):
        return False
    text = image.strip()
    return bool(text) and (any(ch.isspace() for ch in text) or not Path(text).suffix)


@component
class MultimodalImageEmbedder(DenseEmbedderBase):
    """
    Embeds one query image (query-by-image) with the vision tower of a CLIP-family dual encoder.

    The image may be a file path, a `ByteStream` or a Haystack `ImageContent`; a single-page PDF is
    rendered. The vector lives in the same space as `MultimodalDocumentEmbedder`'s documents.
    Given the index's `document_store`, it refuses (once, not per query) an index built with another model.

    ### Usage example
    ```python
    from haystack_integrations.components.embedders.multimodal import MultimodalImageEmbedder

    embedder = MultimodalImageEmbedder(model="google/siglip-so400m-patch14-384")
    vector = embedder.run(image="photos/query.jpg")["embedding"]
    ```
    """

    def __init__(
        self,
        model: str = "google/siglip-so400m-patch14-384",
        *,
        root_path: str | None = None,
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
        :param root_path: Directory that relative image paths are resolved in; paths escaping it are refused.
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
        self.root_path = root_path

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            **serialize_loading_params(self),
            root_path=self.root_path,
            normalize_embeddings=self.normalize_embeddings,
            document_store=self.document_store,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultimodalImageEmbedder:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    @staticmethod
    def _as_document(image: ImageContent | ByteStream | str | Path) -> Document:
        if isinstance(image, ImageContent):
            data = base64.b64decode(image.base64_image)
            return Document(blob=ByteStream(data=data, mime_type=image.mime_type))
        if isinstance(image, ByteStream):
            return Document(blob=image)
        if isinstance(image, (str, Path)):
            return Document(meta={"file_path": str(image)})
        msg = (
            "MultimodalImageEmbedder expects an image as a file path, a ByteStream or an ImageContent, "
            f"got {type(image).__name__}"
        )
        raise TypeError(msg)

    @component.output_types(embedding=list[float])
    def run(self, image: ImageContent | ByteStream | str) -> dict[str, list[float]]:
        """
        Embed one image.

        :param image: A file path, a `ByteStream` or an `ImageContent`.
        :returns: `{"embedding": list[float]}`.
        :raises TypeError: On an unsupported input type.
        :raises MediaError: When the image cannot be read (missing, corrupt, outside `root_path`, too large); a
            string that names no file and reads like a text query says to use `MultimodalTextEmbedder`.
        """
        doc = self._as_document(image)
        try:
            modality = classify(doc)
            if modality not in VISUAL_MODALITIES:
                msg = "the input is not an image"
                raise MediaError(msg)
            source = locate(doc, modality, root_path=self.root_path)
            picture = load_image(source)
        except MediaError as e:
            msg = f"{type(self).__name__}: cannot embed the query image: {e}"
            if "does not exist" in str(e) and _looks_like_query_text(image):
                msg = (
                    f"{type(self).__name__} embeds an image, and {image!r} is not an image file (no such file): "
                    "to embed a text query, use MultimodalTextEmbedder"
                )
            raise MediaError(msg) from e
        self.warm_up()
        assert self._encoder is not None
        try:
            vector = self._encoder.embed_images([picture], normalize=self.normalize_embeddings)[0]
        finally:
            picture.close()
        return {"embedding": vector.tolist()}
