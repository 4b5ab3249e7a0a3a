from __future__ import annotations

from typing import Any

from haystack import component, default_from_dict, default_to_dict
from haystack.utils import ComponentDevice, Secret

from haystack_integrations.common.multimodal_rag.backends.colpali import (
    DEFAULT_MAX_QUERY_TOKENS,
    LateInteractionEncoder,
    check_processor_kwargs,
)
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec, serialize_loading_params
from haystack_integrations.common.multimodal_rag.validation import check_query


@component
class ColPaliTextEmbedder:
    """
    Encodes a query into a ColPali multi-vector: one 128-d vector per query token.

    Queries are encoded as the checkpoint was trained: `query_prefix + query + 10 augmentation tokens`, with the
    training recipe's padding side. By default the prefix is the family's trained one: `"Query: "` for ColPali,
    ColQwen2, ColQwen2.5 and ColIdefics3/ColSmol (colpali-engine <= 0.3.12 added it, and the published ViDoRe
    scores were computed with it; colpali-engine >= 0.3.13 no longer does), `""` for ColQwen3, ColQwen3.5,
    ColModernVBert and ColGemma3 (whose processor writes `"Query: "` into its chat turn itself).
    Query texts longer than 256 tokens are cut to their first 256 tokens, with a warning. The output name and
    shape, `multivector_embedding` as `list[list[float]]`, follow Haystack 3.5's multi-vector conventions.

    ### Usage example
    ```python
    from haystack_integrations.components.embedders.colpali import ColPaliTextEmbedder

    embedder = ColPaliTextEmbedder(model="vidore/colqwen2.5-v0.2")
    vectors = embedder.run(text="Which quarter had the highest revenue?")["multivector_embedding"]
    print(len(vectors), len(vectors[0]))  # n_tokens, 128
    ```
    """

    def __init__(
        self,
        model: str = "vidore/colqwen2.5-v0.2",
        *,
        device: ComponentDevice | None = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        query_prefix: str | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        """
        Create the embedder. Nothing is loaded until `warm_up()`.

        :param model: Hugging Face id or local path of a ColPali-family checkpoint.
        :param device: Device to run on; `None` picks the best available.
        :param token: Hugging Face token, for gated or private models.
        :param local_files_only: Only use a local path or the local Hugging Face cache.
        :param model_kwargs: Extra keyword arguments for the model's `from_pretrained`.
        :param processor_kwargs: Extra keyword arguments for the processor's `from_pretrained`; `None` uses the
            training recipe's settings (give the same value as the document embedder so both share one model).
        :param query_prefix: Text put before each query; `None` uses the family's trained prefix (see above),
            `""` none.
        :param cuda_graphs: On a GPU, encode the query by replaying a CUDA graph of the model's forward, captured
            once per padded query length (ColQwen2.5-3B-shaped on an H100: ~4x faster). Results equal the plain
            forward's up to bf16 rounding; a model whose forward cannot be captured is encoded without one.
        :raises TypeError: If `query_prefix` is neither a string nor `None`, or `processor_kwargs` not a dict.
        """
        check_processor_kwargs(processor_kwargs)
        if query_prefix is not None and not isinstance(query_prefix, str):
            msg = f"query_prefix must be a string or None, got {type(query_prefix).__name__}"
            raise TypeError(msg)
        self.model = model
        self.device = device
        self.token = token
        self.local_files_only = local_files_only
        self.model_kwargs = model_kwargs
        self.processor_kwargs = processor_kwargs
        self.query_prefix = query_prefix
        self.cuda_graphs = cuda_graphs
        self._encoder: LateInteractionEncoder | None = None

    def warm_up(self) -> None:
        """
        Load the model and processor (idempotent).

        :raises ModelLoadError: When the model cannot be loaded.
        """
        if self._encoder is None:
            self._encoder = LateInteractionEncoder.get(LoadSpec.of(self))

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            **serialize_loading_params(self),
            processor_kwargs=self.processor_kwargs,
            query_prefix=self.query_prefix,
            cuda_graphs=self.cuda_graphs,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ColPaliTextEmbedder:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    @component.output_types(multivector_embedding=list[list[float]])
    def run(self, text: str) -> dict[str, list[list[float]]]:
        """
        Encode one query.

        :param text: The query.
        :returns: `{"multivector_embedding": list[list[float]]}`, one vector per query token (prefix and
            augmentation tokens included).
        :raises TypeError: If `text` is not a string.
        :raises ValueError: If `text` is empty or only whitespace.
        """
        check_query(type(self).__name__, text)
        self.warm_up()
        assert self._encoder is not None
        vectors = self._encoder.embed_queries(
            [text],
            query_prefix=self.query_prefix,
            max_query_tokens=DEFAULT_MAX_QUERY_TOKENS,
            cuda_graphs=self.cuda_graphs,
        )[0]
        return {"multivector_embedding": vectors.tolist()}
