from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, get_args

import torch
from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.utils import ComponentDevice, Secret
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec, serialize_loading_params
from haystack_integrations.common.multimodal_rag.backends.vlm import (
    QWEN2_VL_MAX_PIXELS,
    VisionLanguageModel,
    VLMLoadSpec,
)
from haystack_integrations.common.multimodal_rag.errors import MediaError, ModelLoadError
from haystack_integrations.common.multimodal_rag.inputs.failures import check_documents_input
from haystack_integrations.common.multimodal_rag.inputs.media import (
    VISUAL_MODALITIES,
    decode_pool,
    load_document_image,
    modality_of,
)
from haystack_integrations.common.multimodal_rag.inputs.prefetch import prefetch
from haystack_integrations.common.multimodal_rag.numerics.ranking import (
    CROSS_ENCODER_SCORE_META_KEY,
    DENSE_SCORE_META_KEY,
    call_top_k_and_threshold,
    check_top_k_and_threshold,
    rescored,
    score_sort_key,
)
from haystack_integrations.common.multimodal_rag.validation import (
    check_image_size,
    check_positive_int,
    check_query,
    compile_template,
)

logger = logging.getLogger(__name__)

RerankRecipe = Literal["monoqwen", "qwen3_vl_reranker", "zero_shot_yes_no"]
RECIPES: tuple[str, ...] = get_args(RerankRecipe)

# --- lightonai/MonoQwen2-VL-v0.1 ------------------------------------------------------------------------------
# The model card's usage (https://huggingface.co/lightonai/MonoQwen2-VL-v0.1, README @4bbbdf2): one user turn with
# the image FIRST, then this prompt; `apply_chat_template(..., add_generation_prompt=True)` (the Qwen2-VL template
# adds its default system turn); score = softmax over the logits of the tokens "True" and "False" at the last
# position, P(True). Its processor is Qwen/Qwen2-VL-2B-Instruct's (the adapter repo ships none).
MONOQWEN_PROMPT_TEMPLATE = (
    "Assert the relevance of the previous image document to the following query, "
    "answer True or False. The query is: {{ query }}"
)

# --- Qwen3-VL-Reranker ------------------------------------------------------------------------------------------
# QwenLM/Qwen3-VL-Embedding @8ce3aab, src/models/qwen3_vl_reranker.py: system message (line 338), default
# instruction (line 85), user parts '<Instruct>: ' + instruction, '<Query>:', the query, '\n<Document>:', the
# document's images then texts (lines 348-375); answer tokens "yes"/"no" (lines 114-115), score
# sigmoid(logit_yes - logit_no) (lines 120-137); at most 1800 visual tokens of 32x32 pixels (MAX_PIXELS, line 25).
QWEN3_RERANKER_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
QWEN3_RERANKER_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
QWEN3_VL_MAX_PIXELS = 1800 * 32 * 32

# --- zero-shot judge (any instruction-tuned VLM) ----------------------------------------------------------------
ZERO_SHOT_PROMPT_TEMPLATE = (
    "Judge whether the {{ 'image' if is_image else 'document' }} above is relevant to the search query."
    "{% if not is_image %}\nDocument: {{ content }}{% elif content %}\nText on the page: {{ content }}{% endif %}"
    "\nQuery: {{ query }}\nAnswer with yes or no only."
)


@dataclass(frozen=True)
class _Recipe:
    positive: str
    negative: str
    prompt_template: str | None
    max_pixels: int
    sum_case_variants: bool


_RECIPES: dict[str, _Recipe] = {
    "monoqwen": _Recipe("True", "False", MONOQWEN_PROMPT_TEMPLATE, QWEN2_VL_MAX_PIXELS, sum_case_variants=False),
    "qwen3_vl_reranker": _Recipe("yes", "no", None, QWEN3_VL_MAX_PIXELS, sum_case_variants=False),
    "zero_shot_yes_no": _Recipe("yes", "no", ZERO_SHOT_PROMPT_TEMPLATE, QWEN2_VL_MAX_PIXELS, sum_case_variants=True),
}


def _case_variants(token: str) -> list[str]:
    variants: list[str] = []
    for v in (token, token.lower(), token.capitalize(), token.upper()):
        if v not in variants:
            variants.append(v)
    return variants


#: `batch_size=None` on a CUDA device: a Qwen2-VL-2B candidate costs ~500 visual tokens at 768x512, so 16 of
#: them fill a forward pass well (see the README's performance section); on other devices 4, the old default.
CUDA_BATCH_SIZE = 16
CPU_BATCH_SIZE = 4
#: A query's first batch holds at most this many candidates: the model starts on them while the host decodes and
#: preprocesses the next batch, instead of waiting for a whole first batch (on the H100 the host needs ~0.2 s to
#: prepare 16 Qwen2-VL candidates, the GPU ~0.2 s to judge them).
FIRST_BATCH_SIZE = 4


_Candidate = tuple[Document, str, list[Image.Image]]
#: Gives a candidate's `(is_image, images)`, waiting for its decode; raises its MediaError.
_Load = Callable[[], tuple[bool, list[Image.Image]]]


@dataclass
class _EncodedBatch:
    """One batch the processor accepted: its documents and their model inputs, still on the host."""

    documents: list[Document]
    inputs: dict[str, Any]


@component
class VisionLanguageRanker:
    """
    A multimodal cross-encoder: a vision-language model looks at the query and each candidate together.

    Every judged candidate goes through ONE forward pass (no generation) laid out as its reranker checkpoint was
    trained (`recipe`); the score is the probability of the "relevant" answer token against the "not relevant"
    one at the answer position, in [0, 1]. Image and PDF-page documents are shown as images, text documents as
    text in the same prompt. Candidates are batched (`batch_size`), only the answer position's logits are
    computed, and the scores of all batches come back to the host in one transfer.

    Recipes (`recipe`):

    - `"monoqwen"` (default, with `lightonai/MonoQwen2-VL-v0.1`, a LoRA reranker on Qwen2-VL-2B-Instruct trained
      on the ColPali train set): the model card's prompt ("Assert the relevance of the previous image document
      to the following query, answer True or False. The query is: ..."), the image before the text, answer tokens
      `True`/`False`. The adapter ships no processor: it comes from its base model (`processor=None` finds it).
      MonoQwen was trained on page images only; a text candidate is shown as its text (then a newline) in place
      of the image, which is outside its training data.
    - `"qwen3_vl_reranker"` (Qwen3-VL-Reranker checkpoints): the reranker's system message, then
      `<Instruct>: {instruction}<Query>:{query}\n<Document>:` and the document (image, then text), answer tokens
      `yes`/`no`.
    - `"zero_shot_yes_no"` (any instruction-tuned VLM, e.g. `Qwen/Qwen2-VL-2B-Instruct`): a yes/no relevance
      question (`prompt_template`), the probabilities of the answer word's case variants that are single tokens
      summed (`yes`+`Yes`+`YES` against `no`+`No`+`NO`).

    Cost is bounded: only `max_candidates` candidates are judged, the best by incoming score within each modality,
    taken round-robin over the modalities (text, image, page) because their incoming scores are on different scales;
    the rest follow them in their incoming order. The query is cut to `max_query_tokens` and a text candidate to
    `max_text_tokens` tokens (a warning names what was cut), and images get a visual-token budget
    (`processor_kwargs`). Judged documents get `meta["cross_encoder_score"]` and `score`; the incoming score is kept
    in `meta["dense_score"]` unless an earlier ranker already set it. A candidate whose image cannot be read or that
    the processor refuses (e.g. a 1600x6 banner: Qwen-VL processors refuse aspect ratios over 200) keeps its
    incoming score, is placed with the unjudged ones, and a warning names it; one bad candidate never fails the
    query. Nothing is dropped except by `top_k` (default `None`: all, so that a mixed text/image list reaches
    `ModalityScoreCalibrator` whole) and `score_threshold` (which applies to judged documents; unjudged ones have no
    probability and are left out when a threshold is set).

    ### Usage example
    ```python
    from haystack_integrations.components.rankers.vlm import VisionLanguageRanker

    ranker = VisionLanguageRanker(max_candidates=32)  # lightonai/MonoQwen2-VL-v0.1, its recipe
    result = ranker.run(query="blue and gold Byzantine devotional mosaic", documents=candidates)
    ```
    """

    def __init__(
        self,
        model: str = "lightonai/MonoQwen2-VL-v0.1",
        *,
        recipe: RerankRecipe = "monoqwen",
        processor: str | None = None,
        prompt_template: str | None = None,
        instruction: str | None = None,
        positive_token: str | None = None,
        negative_token: str | None = None,
        top_k: int | None = None,
        score_threshold: float | None = None,
        max_candidates: int = 32,
        batch_size: int | None = None,
        max_query_tokens: int = 256,
        max_text_tokens: int = 1024,
        image_size: tuple[int, int] | list[int] | None = None,
        file_path_meta_field: str = "file_path",
        root_path: str | None = None,
        device: ComponentDevice | None = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Create the ranker. Nothing is loaded until `warm_up()`.

        :param model: Hugging Face id or local path of a reranker checkpoint or an image-text-to-text chat model
            (a PEFT adapter on one is followed to its base model).
        :param recipe: How prompts are laid out and scored: `"monoqwen"`, `"qwen3_vl_reranker"` or
            `"zero_shot_yes_no"` (see the class docstring). Use the recipe the checkpoint was trained with.
        :param processor: Id or path to load the processor from. `None`: the model's own; for a PEFT adapter
            without processor files (like MonoQwen2-VL-v0.1), its base model (`base_model_name_or_path`).
        :param prompt_template: Jinja2 template of the question (variables `query`, `content`, `is_image`,
            `meta`); `None` uses the recipe's (MonoQwen's exact prompt, or the zero-shot yes/no question). Not
            used by `"qwen3_vl_reranker"`, whose layout is fixed: change its `instruction` instead.
        :param instruction: The `<Instruct>` text of `"qwen3_vl_reranker"` (default: "Given a search query,
            retrieve relevant candidates that answer the query.").
        :param positive_token: The token that means "relevant" (a single token of the vocabulary); `None`: the
            recipe's (`True` for monoqwen, `yes` otherwise).
        :param negative_token: The token that means "not relevant"; `None`: the recipe's (`False` or `no`).
        :param top_k: How many documents to return; `None` returns all (recommended before
            `ModalityScoreCalibrator`: text and image scores are not on one scale until it calibrates them).
        :param score_threshold: Drop judged documents whose probability is below this value.
        :param max_candidates: Most candidates judged per query (the best by incoming score within each modality,
            shared round-robin between the modalities of a mixed list).
        :param batch_size: Candidates per forward pass. `None` (default): `CUDA_BATCH_SIZE` (16) when the model
            runs on a CUDA GPU, `CPU_BATCH_SIZE` (4) elsewhere. Larger batches keep a GPU busier (fewer forward
            passes, each with a fixed host cost); activation memory grows with the batch (about 16 x 1280 visual
            tokens at the default pixel budget), so lower it on a small GPU. A query's first batch holds at most
            `FIRST_BATCH_SIZE` (4) candidates, so that the model starts while the host prepares the next.
        :param max_query_tokens: The query is cut to this many tokens (with a warning).
        :param max_text_tokens: A text candidate's content is cut to this many tokens (with a warning).
        :param image_size: `(width, height)` box images are shrunk to fit before the processor sees them.
        :param file_path_meta_field: Meta key holding the path of a candidate's image or PDF.
        :param root_path: Directory that relative file paths are resolved in; paths escaping it are refused.
        :param device: Device to run on; `None` picks the best available.
        :param token: Hugging Face token, for gated or private models.
        :param local_files_only: Only use a local path or the local Hugging Face cache.
        :param model_kwargs: Extra keyword arguments for `from_pretrained` (e.g. `{"dtype": "bfloat16"}`).
        :param processor_kwargs: Keyword arguments for the processor's `from_pretrained` (e.g.
            `{"max_pixels": 602112}`). `None`: the recipe's visual-token budget for Qwen-VL style processors:
            at most `1280*28*28` pixels (1280 tokens, Qwen's recommended upper bound) for monoqwen and zero-shot,
            `1800*32*32` (Qwen3-VL-Reranker's own MAX_PIXELS) for qwen3_vl_reranker; a checkpoint's own smaller
            limit is kept.
        :raises ValueError: On invalid parameters or a template with a syntax error.
        """
        if recipe not in RECIPES:
            msg = f"recipe must be one of {RECIPES}, got {recipe!r}"
            raise ValueError(msg)
        check_top_k_and_threshold(top_k, score_threshold)
        check_positive_int("max_candidates", max_candidates)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        check_positive_int("max_query_tokens", max_query_tokens)
        check_positive_int("max_text_tokens", max_text_tokens)
        spec = _RECIPES[recipe]
        positive = spec.positive if positive_token is None else positive_token
        negative = spec.negative if negative_token is None else negative_token
        if not positive or not negative or positive == negative:
            msg = "positive_token and negative_token must be two different, non-empty tokens"
            raise ValueError(msg)
        if recipe == "qwen3_vl_reranker" and prompt_template is not None:
            msg = "recipe 'qwen3_vl_reranker' has a fixed layout: set `instruction` instead of `prompt_template`"
            raise ValueError(msg)
        if recipe != "qwen3_vl_reranker" and instruction is not None:
            msg = f"`instruction` is used by recipe 'qwen3_vl_reranker' only, not {recipe!r}"
            raise ValueError(msg)
        self.image_size = check_image_size(image_size)
        self._template = (
            compile_template(prompt_template, spec.prompt_template, parameter="prompt_template")
            if spec.prompt_template is not None
            else None
        )
        self.model = model
        self.recipe = recipe
        self.processor = processor
        self.prompt_template = prompt_template
        self.instruction = instruction
        self.positive_token = positive_token
        self.negative_token = negative_token
        self.top_k = top_k
        self.score_threshold = score_threshold
        self.max_candidates = max_candidates
        self.batch_size = batch_size
        self.max_query_tokens = max_query_tokens
        self.max_text_tokens = max_text_tokens
        self.file_path_meta_field = file_path_meta_field
        self.root_path = root_path
        self.device = device
        self.token = token
        self.local_files_only = local_files_only
        self.model_kwargs = model_kwargs
        self.processor_kwargs = processor_kwargs
        self._answer_words = (positive, negative)
        self._vlm: VisionLanguageModel | None = None
        self._answer_ids: tuple[list[int], list[int]] | None = None
        self._answer_index: torch.Tensor | None = None
        self._warm_lock = threading.Lock()

    def _single_token_id(self, vlm: VisionLanguageModel, token: str) -> int | None:
        tokenizer = vlm.tokenizer
        vocab = tokenizer.get_vocab()
        if token in vocab:
            return int(vocab[token])
        ids = tokenizer.encode(token, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None

    def _resolve_answer(self, vlm: VisionLanguageModel, token: str, role: str) -> list[int]:
        token_id = self._single_token_id(vlm, token)
        if token_id is None:
            pieces = vlm.tokenizer.convert_ids_to_tokens(vlm.tokenizer.encode(token, add_special_tokens=False))
            msg = (
                f"{type(self).__name__}: {role} {token!r} is not a single token in the vocabulary of '{self.model}' "
                f"(it splits into {pieces}); choose a token the model answers with, e.g. 'yes'/'no' or 'True'/'False'"
            )
            raise ModelLoadError(msg)
        ids = [token_id]
        if _RECIPES[self.recipe].sum_case_variants:
            # Research notes (Qwen2 vocabulary): yes 9693, Yes 9454, YES 14004; no 2152, No 2753, NO 8996. An
            # instruct model may answer in any case; only variants that are one token can be read at one position.
            for variant in _case_variants(token)[1:]:
                variant_id = self._single_token_id(vlm, variant)
                if variant_id is not None and variant_id not in ids:
                    ids.append(variant_id)
        return ids

    def warm_up(self) -> None:
        """
        Load the model (and its processor) and resolve the answer token ids (idempotent).

        :raises ModelLoadError: When the model or processor cannot be loaded or an answer token is not in its
            vocabulary.
        """
        with self._warm_lock:
            if self._vlm is None:
                base = LoadSpec.of(self)
                budget = _RECIPES[self.recipe].max_pixels if self.processor_kwargs is None else None
                vlm = VisionLanguageModel.get(VLMLoadSpec(**vars(base), processor=self.processor, max_pixels=budget))
                positive, negative = self._answer_words
                self._answer_ids = (
                    self._resolve_answer(vlm, positive, "positive_token"),
                    self._resolve_answer(vlm, negative, "negative_token"),
                )
                # Made once on the model's device, so scoring a batch copies nothing from the host.
                self._answer_index = torch.tensor(self._answer_ids[0] + self._answer_ids[1], device=vlm.device)
                self._vlm = vlm

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            **serialize_loading_params(self),
            recipe=self.recipe,
            processor=self.processor,
            prompt_template=self.prompt_template,
            instruction=self.instruction,
            positive_token=self.positive_token,
            negative_token=self.negative_token,
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            max_candidates=self.max_candidates,
            batch_size=self.batch_size,
            max_query_tokens=self.max_query_tokens,
            max_text_tokens=self.max_text_tokens,
            image_size=list(self.image_size) if self.image_size is not None else None,
            file_path_meta_field=self.file_path_meta_field,
            root_path=self.root_path,
            processor_kwargs=self.processor_kwargs,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionLanguageRanker:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    def messages_for(self, query: str, content: str, *, is_image: bool, meta: dict[str, Any]) -> list[dict[str, Any]]:
        """
        The chat messages of one candidate, laid out by the recipe (an image part stands for the candidate's image).

        :param query: The (already truncated) query.
        :param content: The candidate's (already truncated) text; for images, their text content, if any.
        :param is_image: Whether the candidate is shown as an image.
        :param meta: The candidate's meta (for custom templates).
        :returns: Messages in transformers' chat format.
        """
        if self.recipe == "qwen3_vl_reranker":
            # qwen3_vl_reranker.py lines 348-375: instruction, query block, document block (images, then texts;
            # an empty block is "NULL", line 263).
            instruction = QWEN3_RERANKER_INSTRUCTION if self.instruction is None else self.instruction
            document: list[dict[str, Any]] = [{"type": "image"}] if is_image else []
            if content.strip():
                document.append({"type": "text", "text": content})
            if not document:
                document.append({"type": "text", "text": "NULL"})
            return [
                {"role": "system", "content": [{"type": "text", "text": QWEN3_RERANKER_SYSTEM}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "<Instruct>: " + instruction},
                        {"type": "text", "text": "<Query>:"},
                        {"type": "text", "text": query},
                        {"type": "text", "text": "\n<Document>:"},
                        *document,
                    ],
                },
            ]
        assert self._template is not None
        text = self._template.render(query=query, content=content, is_image=is_image, meta=meta)
        if self.recipe == "monoqwen":
            # The card's layout: image, then the prompt. A text candidate takes the image's place.
            first = {"type": "image"} if is_image else {"type": "text", "text": content + "\n"}
            return [{"role": "user", "content": [first, {"type": "text", "text": text}]}]
        parts: list[dict[str, Any]] = [{"type": "image"}] if is_image else []
        parts.append({"type": "text", "text": text})
        return [{"role": "user", "content": parts}]

    def _effective_batch_size(self) -> int:
        """`batch_size`, or for `None` the default of the device the model is on."""
        if self.batch_size is not None:
            return self.batch_size
        assert self._vlm is not None
        return CUDA_BATCH_SIZE if str(self._vlm.device).startswith("cuda") else CPU_BATCH_SIZE

    def _load_images(self, doc: Document) -> tuple[bool, list[Image.Image]]:
        """Whether a candidate is shown as an image, and its images (raises MediaError when unreadable)."""
        modality = modality_of(doc, file_path_meta_field=self.file_path_meta_field)
        if modality not in VISUAL_MODALITIES:
            return False, []
        image = load_document_image(
            doc,
            modality,
            file_path_meta_field=self.file_path_meta_field,
            root_path=self.root_path,
            fit=self.image_size,
        )
        return True, [image]

    def _start_loading(self, window: list[Document]) -> tuple[list[_Load], list[Future]]:
        """
        Start decoding the image candidates of `window` on the package's decode pool (`media.decode_pool`).

        :returns: One callable per candidate giving `_load_images`' result (waiting for its decode; re-raising its
            MediaError), and the futures of the decodes (for clean-up).
        """

        def visual(doc: Document) -> bool:
            try:
                return modality_of(doc, file_path_meta_field=self.file_path_meta_field) in VISUAL_MODALITIES
            except MediaError:
                return False  # raised again (and reported) when it is loaded

        futures: list[Future] = []
        loads: list[_Load] = []
        for doc in window:
            if visual(doc):
                future = decode_pool().submit(self._load_images, doc)
                futures.append(future)
                loads.append(future.result)
            else:
                loads.append(partial(self._load_images, doc))
        return loads, futures

    def _prompt(self, query: str, doc: Document, *, is_image: bool, truncated: list[str]) -> str:
        """The rendered prompt of one candidate (its text cut to `max_text_tokens`)."""
        assert self._vlm is not None
        content, original = self._vlm.truncate(doc.content or "", self.max_text_tokens)
        if original is not None:
            truncated.append(f"'{doc.id}' ({original} characters)")
        messages = self.messages_for(query, content, is_image=is_image, meta=doc.meta)
        return self._vlm.prompt_text(messages)

    def _encode_chunk(self, chunk: list[_Candidate], refused: list[tuple[Document, str]]) -> _EncodedBatch | None:
        """
        Preprocess a batch on the host; when the processor refuses it, find the candidates it refuses (named in
        `refused`) and preprocess the rest. `None` when it refuses them all.
        """
        assert self._vlm is not None
        try:
            inputs = self._vlm.preprocess([p for _, p, _ in chunk], [i for _, _, i in chunk], padding_side="left")
            return _EncodedBatch([d for d, _, _ in chunk], inputs)
        except ValueError:
            pass
        kept: list[_Candidate] = []
        for doc, prompt, images in chunk:
            problem = next((p for p in (self._vlm.image_problem(img) for img in images) if p is not None), None)
            if problem is None:
                try:
                    self._vlm.preprocess([prompt], [images], padding_side="left")
                except ValueError as e:
                    problem = f"{type(e).__name__}: {e}"
            if problem is None:
                kept.append((doc, prompt, images))
            else:
                size = f" ({images[0].width}x{images[0].height})" if images else ""
                refused.append((doc, f"the model's processor refuses it{size}: {problem}"))
        if not kept:
            return None
        inputs = self._vlm.preprocess([p for _, p, _ in kept], [i for _, _, i in kept], padding_side="left")
        return _EncodedBatch([d for d, _, _ in kept], inputs)

    def _encoded_batches(
        self,
        query: str,
        window: list[Document],
        loads: list[_Load],
        batch_size: int,
        *,
        unreadable: list[tuple[Document, str]],
        refused: list[tuple[Document, str]],
        truncated: list[str],
    ) -> Iterator[_EncodedBatch]:
        """
        The judged candidates' model inputs, batch after batch, in window order (the producer of the pipeline).

        All tokenizer and processor work of a query happens here (in one thread, the prefetch thread): the
        candidate's decoded image is awaited, its prompt rendered, and every `batch_size` readable candidates are
        preprocessed (the first batch: at most `FIRST_BATCH_SIZE`). Each batch's images are closed once their
        pixels are in the inputs.
        """
        pending: list[_Candidate] = []
        limit = min(batch_size, FIRST_BATCH_SIZE)

        def flush() -> _EncodedBatch | None:
            batch = self._encode_chunk(pending, refused)
            for _, _, images in pending:
                for image in images:
                    image.close()
            pending.clear()
            return batch

        for doc, load in zip(window, loads, strict=True):
            try:
                is_image, images = load()
            except MediaError as e:
                unreadable.append((doc, str(e)))
                continue
            pending.append((doc, self._prompt(query, doc, is_image=is_image, truncated=truncated), images))
            if len(pending) == limit:
                batch = flush()
                limit = batch_size
                if batch is not None:
                    yield batch
        if pending:
            batch = flush()
            if batch is not None:
                yield batch

    @torch.inference_mode()
    def _score_inputs(self, inputs: dict[str, Any]) -> torch.Tensor:
        """P(relevant) of each sample of a preprocessed batch, left on the model's device (no host sync)."""
        assert self._vlm is not None
        assert self._answer_ids is not None
        assert self._answer_index is not None
        n_positive = len(self._answer_ids[0])
        logits = self._vlm.model(**self._vlm.to_device(inputs), logits_to_keep=1).logits[:, -1, :]
        selected = logits.index_select(-1, self._answer_index.to(logits.device)).float()
        # log P(any positive variant) - log P(any negative variant); with one token each this is the card's
        # softmax([True, False])[0] (MonoQwen) / sigmoid(yes - no) (Qwen3-VL-Reranker).
        margin = torch.logsumexp(selected[:, :n_positive], -1) - torch.logsumexp(selected[:, n_positive:], -1)
        return torch.sigmoid(margin)

    def _select_for_judging(self, documents: list[Document]) -> tuple[list[Document], list[Document]]:
        """
        Split the candidates into the `max_candidates` to judge and the rest, without comparing across modalities.

        Incoming scores of different modalities are on different scales (SigLIP cosines for text, MaxSim for
        pages), so the window is filled round-robin over the modalities, each taken in its own score order; a
        single-modality list gives the best `max_candidates` by score, as before.
        """
        groups: dict[str, list[Document]] = {}
        for doc in sorted(documents, key=score_sort_key):
            try:
                modality = modality_of(doc, file_path_meta_field=self.file_path_meta_field)
            except MediaError:
                modality = "unknown"  # reported when it is prepared
            groups.setdefault(modality, []).append(doc)
        queues = list(groups.values())
        window: list[Document] = []
        depth = 0
        while len(window) < self.max_candidates and any(depth < len(q) for q in queues):
            for queue in queues:
                if depth < len(queue) and len(window) < self.max_candidates:
                    window.append(queue[depth])
            depth += 1
        chosen = {id(d) for d in window}
        rest = [d for d in sorted(documents, key=score_sort_key) if id(d) not in chosen]
        return window, rest

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

        :param query: The query (cut to `max_query_tokens` tokens, with a warning).
        :param documents: The candidates; not modified.
        :param top_k: Overrides the init `top_k` for this call (0 returns nothing).
        :param score_threshold: Overrides the init `score_threshold` for this call.
        :returns: `{"documents": [...]}`: judged documents by probability, then the unjudged ones (not judged for
            `max_candidates`, unreadable, or refused by the processor) in incoming order.
        :raises ValueError: On an empty query or an invalid `top_k`.
        :raises TypeError: When `documents` is not a list (or tuple) of Documents.
        """
        name = type(self).__name__
        check_query(name, query)
        check_documents_input(name, documents, allow_tuple=True)
        top_k, score_threshold = call_top_k_and_threshold(self, top_k, score_threshold)
        if not documents or top_k == 0:
            return {"documents": []}
        self.warm_up()
        assert self._vlm is not None

        query, query_chars = self._vlm.truncate(query, self.max_query_tokens)
        if query_chars is not None:
            logger.warning(
                "{component}: the query ({chars} characters) was cut to max_query_tokens={limit} tokens",
                component=name,
                chars=query_chars,
                limit=self.max_query_tokens,
            )
        window, rest = self._select_for_judging(documents)
        unreadable: list[tuple[Document, str]] = []
        refused: list[tuple[Document, str]] = []
        truncated: list[str] = []
        scored_docs: list[Document] = []
        scores: list[torch.Tensor] = []
        # Images are decoded concurrently; the processor prepares batch i+1 on a background thread while the model
        # runs batch i (depth 1: at most three batches of inputs are alive).
        loads, futures = self._start_loading(window)
        try:
            batches = self._encoded_batches(
                query,
                window,
                loads,
                self._effective_batch_size(),
                unreadable=unreadable,
                refused=refused,
                truncated=truncated,
            )
            for batch in prefetch(batches, depth=1):
                scored_docs.extend(batch.documents)
                scores.append(self._score_inputs(batch.inputs))
        finally:
            for future in futures:  # stop decodes not started yet (the query failed part-way)
                future.cancel()
            wait(futures)
            for future in futures:  # images decoded but never preprocessed
                if not future.cancelled() and future.exception() is None:
                    for image in future.result()[1]:
                        image.close()
        if truncated:
            logger.warning(
                "{component}: the text of {count} candidate(s) was cut to max_text_tokens={limit} tokens: {details}",
                component=name,
                count=len(truncated),
                limit=self.max_text_tokens,
                details=", ".join(truncated),
            )
        # Unreadable ones first, then the refused ones, as they were found when decoding came before batching.
        unreadable.extend(refused)
        if unreadable:
            logger.warning(
                "{component}: {count} candidate(s) could not be shown to the model and keep their incoming score: "
                "{details}",
                component=name,
                count=len(unreadable),
                details="; ".join(f"'{doc.id}': {reason}" for doc, reason in unreadable),
            )
        # One device-to-host copy for the whole query.
        values: list[float] = torch.cat(scores).cpu().tolist() if scores else []
        judged: list[Document] = []
        for doc, probability in zip(scored_docs, values, strict=True):
            meta = {**doc.meta, CROSS_ENCODER_SCORE_META_KEY: probability}
            meta.setdefault(DENSE_SCORE_META_KEY, doc.score)
            judged.append(rescored(doc, probability, meta))
        judged.sort(key=score_sort_key)
        if score_threshold is not None:
            ranked = [d for d in judged if d.score is not None and d.score >= score_threshold]
        else:
            unjudged = sorted([d for d, _ in unreadable] + rest, key=score_sort_key)
            if top_k is not None:  # copied only when returned (a Document costs ~10 us to construct)
                unjudged = unjudged[: max(top_k - len(judged), 0)]
            ranked = judged + [rescored(d, d.score, {DENSE_SCORE_META_KEY: d.score, **d.meta}) for d in unjudged]
        return {"documents": ranked if top_k is None else ranked[:top_k]}
