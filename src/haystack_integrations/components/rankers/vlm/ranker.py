from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import torch
from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.utils import ComponentDevice, Secret
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec, serialize_loading_params
from haystack_integrations.common.multimodal_rag.backends.vlm import VisionLanguageModel
from haystack_integrations.common.multimodal_rag.errors import MediaError, ModelLoadError
from haystack_integrations.common.multimodal_rag.inputs.media import VISUAL_MODALITIES, load_document_image, modality_of
from haystack_integrations.common.multimodal_rag.numerics.ranking import (
    CROSS_ENCODER_SCORE_META_KEY,
    DENSE_SCORE_META_KEY,
    check_top_k_and_threshold,
    score_sort_key,
)
from haystack_integrations.common.multimodal_rag.validation import (
    batched,
    check_image_size,
    check_positive_int,
    check_query,
    compile_template,
)

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = (
    "Judge whether the {{ 'image' if is_image else 'document' }} above is relevant to the search query."
    "{% if not is_image %}\nDocument: {{ content }}{% elif content %}\nText on the page: {{ content }}{% endif %}"
    "\nQuery: {{ query }}\nAnswer with yes or no only."
)


@component
class VisionLanguageRanker:
    """
    A multimodal cross-encoder: a vision-language model looks at the query and each candidate together.

    Every judged candidate goes through ONE forward pass (no generation) with a prompt asking whether it is
    relevant to the query; the score is the probability of `positive_token` against `negative_token` at the
    answer position, `P(yes) / (P(yes) + P(no))`, in [0, 1]. Image and PDF-page documents are shown as images,
    text documents as text in the same prompt, so mixed candidate lists are scored on one scale. Candidates are
    batched (`batch_size`) and only the logits of the answer position are computed.

    Cost is bounded: only the best `max_candidates` by incoming score are judged (one forward pass each); the
    rest follow them in their incoming order. Judged documents get `meta["cross_encoder_score"]` and `score`;
    the incoming score is kept in `meta["dense_score"]` unless an earlier ranker already set it. A candidate whose
    image cannot be read keeps its score (a warning names it) and is placed with the unjudged ones; nothing is
    dropped except by `top_k` and `score_threshold` (which applies to judged documents; unjudged ones have no
    probability and are left out when a threshold is set).

    The prompt is a Jinja2 template (sandboxed) with `query`, `content`, `is_image` and `meta`, because each
    reranker checkpoint expects its own wording; the image, if any, comes before the text.

    ### Usage example
    ```python
    from haystack_integrations.components.rankers.vlm import VisionLanguageRanker

    ranker = VisionLanguageRanker(model="Qwen/Qwen2-VL-2B-Instruct", max_candidates=32, top_k=5)
    result = ranker.run(query="blue and gold Byzantine devotional mosaic", documents=candidates)
    ```
    """

    def __init__(
        self,
        model: str = "Qwen/Qwen2-VL-2B-Instruct",
        *,
        prompt_template: str | None = None,
        positive_token: str = "yes",
        negative_token: str = "no",
        top_k: int = 10,
        score_threshold: float | None = None,
        max_candidates: int = 32,
        batch_size: int = 4,
        image_size: tuple[int, int] | list[int] | None = None,
        file_path_meta_field: str = "file_path",
        root_path: str | None = None,
        device: ComponentDevice | None = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Create the ranker. Nothing is loaded until `warm_up()`.

        :param model: Hugging Face id or local path of an image-text-to-text chat model (or a pointwise
            reranker checkpoint built on one).
        :param prompt_template: Jinja2 template of the question; `None` uses a yes/no relevance prompt.
        :param positive_token: The token that means "relevant" (must be one token of the vocabulary).
        :param negative_token: The token that means "not relevant".
        :param top_k: How many documents to return.
        :param score_threshold: Drop judged documents whose probability is below this value.
        :param max_candidates: Most candidates judged per query (the best by incoming score).
        :param batch_size: Candidates per forward pass.
        :param image_size: `(width, height)` box images are shrunk to fit before the model sees them.
        :param file_path_meta_field: Meta key holding the path of a candidate's image or PDF.
        :param root_path: Directory that relative file paths are resolved in; paths escaping it are refused.
        :param device: Device to run on; `None` picks the best available.
        :param token: Hugging Face token, for gated or private models.
        :param local_files_only: Only use a local path or the local Hugging Face cache.
        :param model_kwargs: Extra keyword arguments for `from_pretrained` (e.g. `{"dtype": "bfloat16"}`).
        :raises ValueError: On invalid parameters or a template with a syntax error.
        """
        check_top_k_and_threshold(top_k, score_threshold)
        check_positive_int("max_candidates", max_candidates)
        check_positive_int("batch_size", batch_size)
        if not positive_token or not negative_token or positive_token == negative_token:
            msg = "positive_token and negative_token must be two different, non-empty tokens"
            raise ValueError(msg)
        self.image_size = check_image_size(image_size)
        self._template = compile_template(prompt_template, DEFAULT_PROMPT_TEMPLATE, parameter="prompt_template")
        self.model = model
        self.prompt_template = prompt_template
        self.positive_token = positive_token
        self.negative_token = negative_token
        self.top_k = top_k
        self.score_threshold = score_threshold
        self.max_candidates = max_candidates
        self.batch_size = batch_size
        self.file_path_meta_field = file_path_meta_field
        self.root_path = root_path
        self.device = device
        self.token = token
        self.local_files_only = local_files_only
        self.model_kwargs = model_kwargs
        self._vlm: VisionLanguageModel | None = None
        self._token_ids: tuple[int, int] | None = None
        self._warm_lock = threading.Lock()

    def _resolve_token(self, vlm: VisionLanguageModel, token: str, role: str) -> int:
        tokenizer = vlm.tokenizer
        vocab = tokenizer.get_vocab()
        if token in vocab:
            return int(vocab[token])
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) == 1:
            return int(ids[0])
        pieces = tokenizer.convert_ids_to_tokens(ids)
        msg = (
            f"{type(self).__name__}: {role} {token!r} is not a single token in the vocabulary of '{self.model}' "
            f"(it splits into {pieces}); choose a token the model answers with, e.g. 'yes'/'no' or 'Yes'/'No'"
        )
        raise ModelLoadError(msg)

    def warm_up(self) -> None:
        """
        Load the model and resolve the positive/negative token ids (idempotent).

        :raises ModelLoadError: When the model cannot be loaded or a token is not in its vocabulary.
        """
        with self._warm_lock:
            if self._vlm is None:
                vlm = VisionLanguageModel.get(LoadSpec.of(self))
                self._token_ids = (
                    self._resolve_token(vlm, self.positive_token, "positive_token"),
                    self._resolve_token(vlm, self.negative_token, "negative_token"),
                )
                self._vlm = vlm

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            **serialize_loading_params(self),
            prompt_template=self.prompt_template,
            positive_token=self.positive_token,
            negative_token=self.negative_token,
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            max_candidates=self.max_candidates,
            batch_size=self.batch_size,
            image_size=list(self.image_size) if self.image_size is not None else None,
            file_path_meta_field=self.file_path_meta_field,
            root_path=self.root_path,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionLanguageRanker:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    def _prepare(self, query: str, doc: Document) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """The chat messages and images of one candidate (raises MediaError for unreadable images)."""
        modality = modality_of(doc, file_path_meta_field=self.file_path_meta_field)
        images: list[Image.Image] = []
        parts: list[dict[str, Any]] = []
        is_image = modality in VISUAL_MODALITIES
        if is_image:
            images.append(
                load_document_image(
                    doc,
                    modality,
                    file_path_meta_field=self.file_path_meta_field,
                    root_path=self.root_path,
                    fit=self.image_size,
                )
            )
            parts.append({"type": "image"})
        text = self._template.render(query=query, content=doc.content or "", is_image=is_image, meta=doc.meta)
        parts.append({"type": "text", "text": text})
        return [{"role": "user", "content": parts}], images

    @torch.inference_mode()
    def _score_batch(self, prompts: list[str], images: list[list[Image.Image]]) -> list[float]:
        assert self._vlm is not None
        assert self._token_ids is not None
        inputs = self._vlm.encode(prompts, images, padding_side="left")
        logits = self._vlm.model(**inputs, logits_to_keep=1).logits[:, -1, :]
        pair = logits[:, list(self._token_ids)].float()
        return torch.softmax(pair, dim=-1)[:, 0].cpu().tolist()

    @component.output_types(documents=list[Document])
    def run(
        self,
        query: str,
        documents: list[Document],
        top_k: int | None = None,
        score_threshold: float | None = None,
    ) -> dict[str, list[Document]]:
        """
        Judge the best `max_candidates` candidates and re-rank them.

        :param query: The query.
        :param documents: The candidates; not modified.
        :param top_k: Overrides the init `top_k` for this call (0 returns nothing).
        :param score_threshold: Overrides the init `score_threshold` for this call.
        :returns: `{"documents": [...]}`: judged documents by probability, then the unjudged ones in incoming order.
        :raises ValueError: On an empty query or an invalid `top_k`.
        """
        name = type(self).__name__
        check_query(name, query)
        top_k = self.top_k if top_k is None else top_k
        score_threshold = self.score_threshold if score_threshold is None else score_threshold
        check_top_k_and_threshold(top_k, score_threshold)
        if not documents or top_k == 0:
            return {"documents": []}
        self.warm_up()
        assert self._vlm is not None

        ordered = sorted(documents, key=score_sort_key)
        window, rest = ordered[: self.max_candidates], ordered[self.max_candidates :]
        prepared: list[tuple[Document, str, list[Image.Image]]] = []
        unreadable: list[Document] = []
        problems: list[str] = []
        for doc in window:
            try:
                messages, images = self._prepare(query, doc)
            except MediaError as e:
                unreadable.append(doc)
                problems.append(f"'{doc.id}': {e}")
                continue
            prepared.append((doc, self._vlm.prompt_text(messages), images))
        if problems:
            logger.warning(
                "{component}: {count} candidate(s) could not be shown to the model and keep their incoming score: "
                "{details}",
                component=name,
                count=len(problems),
                details="; ".join(problems),
            )

        judged: list[Document] = []
        for chunk in batched(prepared, self.batch_size):
            probabilities = self._score_batch([p for _, p, _ in chunk], [imgs for _, _, imgs in chunk])
            for (doc, _, images), probability in zip(chunk, probabilities, strict=True):
                for image in images:
                    image.close()
                meta = {**doc.meta, CROSS_ENCODER_SCORE_META_KEY: probability}
                meta.setdefault(DENSE_SCORE_META_KEY, doc.score)
                judged.append(replace(doc, score=probability, meta=meta))
        judged.sort(key=score_sort_key)
        if score_threshold is not None:
            ranked = [d for d in judged if d.score is not None and d.score >= score_threshold]
        else:
            unjudged = sorted(unreadable + rest, key=score_sort_key)
            ranked = judged + [replace(d, meta={DENSE_SCORE_META_KEY: d.score, **d.meta}) for d in unjudged]
        return {"documents": ranked[:top_k]}
