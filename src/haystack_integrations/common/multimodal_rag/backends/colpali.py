"""The late-interaction (ColPali-family) encoder behind the ColPali embedders and ranker.

The model family is chosen from the checkpoint's configuration (`architectures`, then `model_type`), never
from a substring of its name: a ColQwen2.5 fine-tune called "my-retriever" loads as ColQwen2.5. PEFT
adapter checkpoints (like `vidore/colqwen2.5-v0.2`) are followed to their base model's configuration.
Loaded encoders are shared between components asking for the same model on the same device.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from haystack import logging
from haystack.utils import Secret
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.loading import (
    CachedModel,
    LoadSpec,
    checkpoint_fingerprint,
    describe_fix,
    load_model_and_processor,
    read_checkpoint_json,
)
from haystack_integrations.common.multimodal_rag.backends.query_graphs import QueryGraphs
from haystack_integrations.common.multimodal_rag.errors import ModelLoadError
from haystack_integrations.common.multimodal_rag.numerics.pooling import pool_tensors

logger = logging.getLogger(__name__)

# colpali-engine model class -> its processor class.
_PROCESSORS: dict[str, str] = {
    "ColPali": "ColPaliProcessor",
    "ColQwen2": "ColQwen2Processor",
    "ColQwen2_5": "ColQwen2_5_Processor",
    "ColQwen2_5Omni": "ColQwen2_5OmniProcessor",
    "ColQwen3": "ColQwen3Processor",
    "ColQwen3_5": "ColQwen3_5Processor",
    "ColIdefics3": "ColIdefics3Processor",
    "ColGemma3": "ColGemmaProcessor3",
    "ColModernVBert": "ColModernVBertProcessor",
}

# The query prefix each family's published checkpoints were TRAINED with (`None`: whatever the installed
# processor's `query_prefix` is). colpali-engine <= 0.3.12 added "Query: " in `process_queries` (v0.3.4-v0.3.10
# per processor, v0.3.11-v0.3.12 in `BaseVisualRetrieverProcessor.query_prefix`); commit 174055b ("Vbert (#339)",
# 2025-10-27, released in 0.3.13) set it to "". Every vidore checkpoint trained before that saw "Query: "
# (colpali-v1.3, colqwen2-v1.0, colqwen2.5-v0.2, colSmol), and the vidore-benchmark wrappers that produced their
# published ViDoRe scores add no prefix themselves: they relied on the processor's built-in "Query: "
# (vidore-benchmark e0885ea, src/vidore_benchmark/retrievers/colqwen2_5_retriever.py:70-71). ColModernVBert was
# added in that same commit, ColQwen3 later (3fdd490, 2026-01-03) and ColQwen3.5 later still (9be8f19, 2026-03-17,
# whose processor keeps the base class's `query_prefix = ""`, as does the training collator that prepends it:
# colpali_engine/collators/visual_retriever_collator.py:82-85), all with prefix "".
_TRAINED_QUERY_PREFIX: dict[str, str] = {
    "ColPali": "Query: ",
    "ColQwen2": "Query: ",
    "ColQwen2_5": "Query: ",
    "ColIdefics3": "Query: ",
    "ColModernVBert": "",
    "ColQwen3": "",
    "ColQwen3_5": "",
    # ColGemmaProcessor3 writes "Query: " itself, inside the Gemma 3 chat turn it wraps every text in
    # (processing_colgemma.py `process_texts`): a prefix of ours would come on top of it. The 10 `<eos>`
    # augmentation tokens stay: colpali-engine's training collator builds `query_prefix ("") + q + <eos> * 10` and
    # passes that to `process_texts` (collators/visual_retriever_collator.py:82-85), and mteb's ColGemma3Wrapper
    # encodes queries the same way (ColPaliEngineWrapper.get_text_embeddings), so the turn holds the tokens.
    "ColGemma3": "",
    # ColQwen2_5OmniProcessor still sets `query_prefix = "Query: "` (processing_colqwen_omni.py), which the training
    # collator prepends (scripts/configs/qwen2/train_colqwenomni_model.py trains vidore/colqwen-omni-v0.1 with it).
    # This family cannot be loaded with colpali-engine 0.3.18 under transformers 5.23 (see tiny_colpali.py
    # `BROKEN_FAMILIES`); the entry keeps its recipe for when it can.
    "ColQwen2_5Omni": "Query: ",
}


# Processor settings the published checkpoints were trained with, used when the user gives no `processor_kwargs`.
# colqwen2-v1.0 and colqwen2.5-v0.2 were trained with colpali-engine v0.3.4-v0.3.8, whose ColQwen2Processor
# resized every page to at most 768 visual tokens (`max_pixels = 768 * 28 * 28`, v0.3.4 processing_colqwen2.py:44-49);
# 0.3.18 reproduces that only when `max_num_visual_tokens=768` is passed (processing_colqwen2_5.py:58-60), otherwise
# the checkpoint's preprocessor config (Qwen default: up to 16384 tokens) applies.
# ColQwen3 and ColQwen3.5 were trained with `max_num_visual_tokens=768` too (scripts/configs/qwen3/
# train_colqwen3_model.py, scripts/configs/qwen3_5/train_colqwen3_5_model.py), but by colpali-engine versions whose
# `from_pretrained` writes the budget into the image processor's `size`, which the trainer saves with the checkpoint
# (ColModelTraining.save: `processor.save_pretrained`), so a checkpoint trained that way already holds it in its own
# preprocessor config (not checked against athrael-soju/colqwen3.5-4.5B-v3's files, which are not available here).
_TRAINED_PROCESSOR_KWARGS: dict[str, dict[str, Any]] = {
    "ColQwen2": {"max_num_visual_tokens": 768},
    "ColQwen2_5": {"max_num_visual_tokens": 768},
}

# ColPali queries are padded on the right, as in training (colpali_engine/collators/visual_retriever_collator.py:49-51
# forces "right" for PaliGemma; CHANGELOG "Set padding side to right ... Fixes #12"). The other processors set "left"
# themselves (e.g. processing_colqwen2_5.py:43, processing_colidefics3.py:42).
_QUERY_PADDING_SIDE: dict[str, str] = {"ColPali": "right"}

# Families whose query vectors change when the query is padded, so a CUDA graph of a padded query (query_graphs.py)
# would not give the plain forward's vectors. ColPali: right padding moves the valid tokens' outputs of the tiny
# PaliGemma checkpoint by up to 0.23 (unit vectors; every other family: < 1e-7 in float32), as in its training
# batches, where queries are right-padded (see above); a single query is encoded unpadded, like colpali-engine's.
_NO_QUERY_GRAPHS = frozenset({"ColPali"})
_QUERY_GRAPHS_LOCK = threading.Lock()  # makes each encoder's QueryGraphs once

#: Number of query augmentation tokens appended to every query (colpali-engine `process_queries`: `token * 10`,
#: the same in every version since 0.3.0).
QUERY_AUGMENTATION_TOKENS = 10

#: Default bound on the tokens of the query TEXT (prefix and augmentation tokens come on top). ViDoRe queries are
#: one sentence; colpali-engine <= 0.3.10 cut ColPali queries at 50 tokens in total; a much longer "query" is almost
#: always a pasted document, whose cost (and MaxSim sum) grows with its length.
DEFAULT_MAX_QUERY_TOKENS = 256


def check_processor_kwargs(processor_kwargs: object) -> None:
    """
    Validate a `processor_kwargs` parameter.

    :param processor_kwargs: The value.
    :raises TypeError: When it is neither a dict nor `None`.
    """
    if processor_kwargs is not None and not isinstance(processor_kwargs, dict):
        msg = f"processor_kwargs must be a dict or None, got {type(processor_kwargs).__name__}"
        raise TypeError(msg)


@dataclass(frozen=True)
class ColPaliFamily:
    """
    A colpali-engine model family.

    :param model_class: Name of the model class in `colpali_engine.models` (e.g. `"ColQwen2_5"`).
    :param processor_class: Name of its processor class.
    :param model_type: The transformers `model_type` it is built on.
    """

    model_class: str
    processor_class: str
    model_type: str

    @property
    def trained_query_prefix(self) -> str | None:
        """The query prefix the family's published checkpoints were trained with; `None` when not known."""
        return _TRAINED_QUERY_PREFIX.get(self.model_class)

    @property
    def default_processor_kwargs(self) -> dict[str, Any] | None:
        """Processor settings of the training recipe (e.g. the 768 visual-token budget of ColQwen2/2.5), or `None`."""
        kwargs = _TRAINED_PROCESSOR_KWARGS.get(self.model_class)
        return dict(kwargs) if kwargs is not None else None

    @property
    def query_padding_side(self) -> str | None:
        """The padding side of query batches in training, when it differs from the processor's own."""
        return _QUERY_PADDING_SIDE.get(self.model_class)


def _families_by_model_type() -> dict[str, ColPaliFamily]:
    import colpali_engine.models as col_models

    families: dict[str, ColPaliFamily] = {}
    for class_name, processor_name in _PROCESSORS.items():
        model_cls = getattr(col_models, class_name, None)
        if model_cls is None or not hasattr(col_models, processor_name):
            continue  # not in this colpali-engine version
        model_type = getattr(getattr(model_cls, "config_class", None), "model_type", None)
        if model_type:
            families[model_type] = ColPaliFamily(class_name, processor_name, model_type)
    return families


def family_from_config(config: dict[str, Any], *, model: str) -> ColPaliFamily:
    """
    Pick the colpali-engine family of a checkpoint from its `config.json`.

    :param config: The parsed `config.json`.
    :param model: Model id, for messages.
    :returns: The family.
    :raises ModelLoadError: When the checkpoint is not of a family colpali-engine supports.
    """
    families = _families_by_model_type()
    by_class = {family.model_class: family for family in families.values()}
    for architecture in config.get("architectures") or []:
        if architecture in by_class:
            return by_class[architecture]
    model_type = config.get("model_type")
    if model_type in families:
        return families[model_type]
    supported = ", ".join(f"{f.model_class} ({t})" for t, f in sorted(families.items()))
    msg = (
        f"'{model}' is not a ColPali-family checkpoint colpali-engine can load "
        f"(architectures={config.get('architectures')}, model_type={model_type!r}). Supported: {supported}."
    )
    raise ModelLoadError(msg)


def detect_family(model: str, *, token: Secret | None, local_files_only: bool, component: str) -> ColPaliFamily:
    """
    Read a checkpoint's configuration (following a PEFT adapter to its base) and pick its family.

    :param model: Model id or local path.
    :param token: Hugging Face token.
    :param local_files_only: Only use local files / the cache.
    :param component: Component name, for messages.
    :returns: The family.
    :raises ModelLoadError: When the configuration cannot be read or names no supported family.
    """
    try:
        config = read_checkpoint_json(model, "config.json", token=token, local_files_only=local_files_only)
        if config is None:
            adapter = read_checkpoint_json(model, "adapter_config.json", token=token, local_files_only=local_files_only)
            base = (adapter or {}).get("base_model_name_or_path")
            if base:
                config = read_checkpoint_json(base, "config.json", token=token, local_files_only=local_files_only)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        msg = f"{component} could not read the configuration of '{model}': {e}. {describe_fix(model, local_files_only)}"
        raise ModelLoadError(msg) from e
    if config is None:
        msg = (
            f"{component}: '{model}' has no config.json (nor a PEFT adapter_config.json naming a base model). "
            f"{describe_fix(model, local_files_only)}"
        )
        raise ModelLoadError(msg)
    return family_from_config(config, model=model)


def _load_colpali_model(model_cls: Any, family: ColPaliFamily) -> Any:
    """`from_pretrained` of a colpali-engine model class, with the fixes a checkpoint needs to be usable."""

    def load(model: str, **kwargs: Any) -> Any:
        hf_model = model_cls.from_pretrained(model, **kwargs)
        if family.model_class == "ColPali":
            _retie_paligemma_lm_head(hf_model)
        return hf_model

    return load


def _keep_pixel_budget_in_size(processor: Any) -> None:
    """
    Hold a Qwen-VL image processor's pixel budget in `size` only, not also in `min_pixels` / `max_pixels`.

    colpali-engine's ColQwen2/2.5 `from_pretrained(max_num_visual_tokens=...)` sets both `max_pixels` and
    `size["longest_edge"]` (processing_colqwen2.py:59-60), and checkpoints' preprocessor configs carry `min_pixels`
    / `max_pixels`. transformers 5 replays such attributes as call arguments at every `process_images`, with a
    FutureWarning that passing them per call is deprecated and will be removed (image_processing_qwen2_vl.py
    `_standardize_kwargs`); `size` is the supported spelling and already holds the same values, so the pixels of
    every page are unchanged.
    """
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    if image_processor is None or size is None:
        return
    for attribute, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        value = getattr(image_processor, attribute, None)
        if value is None:
            continue
        try:
            size[key] = int(value)
        except (TypeError, ValueError):  # a processor with another kind of `size`: leave it as loaded
            return
        setattr(image_processor, attribute, None)


def _retie_paligemma_lm_head(hf_model: Any) -> None:
    """
    Tie ColPali's (unused) PaliGemma lm_head to the input embeddings, so it is not left on the meta device.

    Under transformers 5, `ColPali.from_pretrained` (colpali-engine 0.3.18) skips materialising
    `model.lm_head.weight` because it is a tied key (TF/modeling_utils.py:4862), then calls `ColPali.tie_weights`,
    which colpali-engine overrides to tie only the inner `GemmaModel` (modeling_colpali.py:98-99), which has no
    head: the weight stays on `meta` and `.to(device)` raises "Cannot copy out of meta tensor". Checkpoints have no
    lm_head key (it is tied; `vidore/colpali-v1.3` included). Pointing the head at the embedding matrix, as the
    config's `tie_word_embeddings` says, costs no memory. Must run before `.to(device)`.
    """
    inner = getattr(hf_model, "model", None)
    lm_head = getattr(inner, "lm_head", None)
    if inner is None or lm_head is None or not getattr(lm_head.weight, "is_meta", False):
        return
    lm_head.weight = inner.get_input_embeddings().weight


class LateInteractionEncoder(CachedModel):
    """
    A loaded ColPali-family model: queries and page images into multi-vectors (one vector per token).

    Use `LateInteractionEncoder.get(LoadSpec(...))` to load (or reuse) one. With `processor_kwargs=None` in the
    spec, the family's trained processor settings apply (`ColPaliFamily.default_processor_kwargs`).

    The API the components use:
    - `embed_queries(texts, *, query_prefix=None, max_query_tokens=DEFAULT_MAX_QUERY_TOKENS)`: query multi-vectors;
      `query_prefix=None` means the family's trained prefix (`default_query_prefix`), `""` none.
    - `embed_query_tensor(text, ...)`: one query's multi-vector left on the model's device (GPU scoring).
    - `query_inputs(texts, ...)`: the exact model inputs `embed_queries` feeds (for conformance checks).
    - `embed_images(images, *, pool_factor=None)`: page multi-vectors, pooled on the model's device.
    - `default_query_prefix`, `dim`, `family`, `fingerprint` (content identity the multi-vector stores record).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        device: str,
        model_id: str,
        family: ColPaliFamily,
        token: Secret | None = None,
    ) -> None:
        """
        Wrap a loaded model and processor.

        :param model: A colpali-engine model.
        :param processor: Its processor.
        :param device: Torch device string.
        :param model_id: Id or path it was loaded from.
        :param family: Its family.
        :param token: Hugging Face token (to find a Hub checkpoint's cached files for `fingerprint`).
        """
        self.model = model
        self.processor = processor
        self.device = device
        self.model_id = model_id
        self.family = family
        self.dim = int(getattr(model, "dim", 128))
        # Computed after loading, so a Hub checkpoint's files are in the local cache (nothing is downloaded).
        # For a PEFT adapter checkpoint (e.g. vidore/colqwen2.5-v0.2) this fingerprints the adapter's own
        # adapter_config.json and adapter weights, which is what tells two fine-tunes of one base apart.
        self.fingerprint: str = checkpoint_fingerprint(model_id, token=token)
        self._query_graphs: QueryGraphs | None = None  # made on the first query on CUDA

    @classmethod
    def _load(cls, spec: LoadSpec) -> LateInteractionEncoder:
        import colpali_engine.models as col_models

        family = detect_family(
            spec.model, token=spec.token, local_files_only=spec.local_files_only, component=spec.component
        )
        if spec.processor_kwargs is None and family.default_processor_kwargs is not None:
            spec = replace(spec, processor_kwargs=family.default_processor_kwargs)
        hf_model, processor = load_model_and_processor(
            _load_colpali_model(getattr(col_models, family.model_class), family),
            getattr(col_models, family.processor_class).from_pretrained,
            spec,
            model_what=f"{family.model_class} model",
            processor_what=f"{family.processor_class} processor",
        )
        _keep_pixel_budget_in_size(processor)
        return cls(hf_model, processor, device=spec.device, model_id=spec.model, family=family, token=spec.token)

    @property
    def default_query_prefix(self) -> str:
        """The query prefix used when none is given: the family's trained prefix, else the processor's own."""
        trained = self.family.trained_query_prefix
        if trained is not None:
            return trained
        return str(getattr(self.processor, "query_prefix", ""))

    def _forward(self, batch: Any) -> list[torch.Tensor]:
        embeddings, mask = self._forward_padded(batch)
        return [embeddings[i][mask[i]] for i in range(embeddings.shape[0])]

    def _embed(self, batch: Any) -> torch.Tensor:
        """The model's `(batch, seq, dim)` output for a processor batch (padding rows zeroed by the model)."""
        return self._forward_padded(batch)[0]

    def _forward_padded(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """`(batch, seq, dim)` embeddings (padding rows zeroed by the model) and the boolean mask, on the device."""
        non_blocking = self.device.startswith("cuda")
        inputs = {
            k: (v.to(self.device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()
            if k != "labels"
        }
        return self._call_model(inputs), inputs["attention_mask"].bool()

    def _call_model(self, inputs: dict[str, Any]) -> torch.Tensor:
        if self.family.model_class == "ColPali":
            # ColPali runs the full PaliGemmaForConditionalGeneration and discards its logits (modeling_colpali.py:
            # 65-66); `logits_to_keep=1` projects only the last position instead of (batch, seq, 257216) logits.
            # The embeddings are unchanged (they come from hidden_states[-1]). "labels" (PaliGemmaProcessor adds
            # them) would only add a loss over those logits.
            inputs = {**inputs, "logits_to_keep": 1}
        return self.model(**inputs)

    def _graph_query(self, batch: Any, cuda_graphs: bool) -> torch.Tensor | None:
        """One query's `(n_tokens, dim)` rows from a CUDA graph replay, or `None` where no graph applies."""
        if not cuda_graphs or not self.device.startswith("cuda") or self.family.model_class in _NO_QUERY_GRAPHS:
            return None
        graphs = self._query_graphs
        if graphs is None:
            # One per encoder, also when its first queries come from two threads at once (each would capture into
            # its own and keep the other's graphs from being used).
            with _QUERY_GRAPHS_LOCK:
                if self._query_graphs is None:
                    pad_token_id = getattr(self.processor.tokenizer, "pad_token_id", None)
                    self._query_graphs = QueryGraphs(
                        self._call_model,
                        device=self.device,
                        pad_values={"input_ids": int(pad_token_id or 0)},
                        name=self.model_id,
                    )
                graphs = self._query_graphs
        return graphs.run(batch)

    def _truncate_query(self, text: str, max_query_tokens: int) -> str:
        tokenizer = self.processor.tokenizer
        try:
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            n_tokens = len(offsets)
            cut = None if n_tokens <= max_query_tokens else text[: offsets[max_query_tokens - 1][1]]
        except NotImplementedError:  # a slow (Python) tokenizer has no offsets: decode the kept ids instead
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            n_tokens = len(ids)
            cut = None if n_tokens <= max_query_tokens else tokenizer.decode(ids[:max_query_tokens])
        if cut is None:
            return text
        logger.warning(
            "Query of {n_tokens} tokens truncated to its first {limit} tokens (max_query_tokens={limit}) for {model}.",
            n_tokens=n_tokens,
            limit=max_query_tokens,
            model=self.model_id,
        )
        return cut

    def query_inputs(
        self, texts: list[str], *, query_prefix: str | None = None, max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS
    ) -> Any:
        """
        The model inputs for queries: `query_prefix + text + augmentation_token * 10`, tokenized as in training.

        :param texts: The queries.
        :param query_prefix: Text put before each query; `None` for `default_query_prefix`, `""` for none.
        :param max_query_tokens: The query text is cut to this many tokens (with a warning) before the prefix and
            the augmentation tokens are added.
        :returns: The processor's batch (`input_ids`, `attention_mask`, ...).
        """
        prefix = self.default_query_prefix if query_prefix is None else query_prefix
        suffix = self.processor.query_augmentation_token * QUERY_AUGMENTATION_TOKENS
        prompts = [prefix + self._truncate_query(text, max_query_tokens) + suffix for text in texts]
        padding_side = self.family.query_padding_side
        if padding_side is not None and self.processor.tokenizer.padding_side != padding_side:
            tokenizer = copy.copy(self.processor.tokenizer)  # never change the shared processor's state
            tokenizer.padding_side = padding_side
            processor = copy.copy(self.processor)
            processor.tokenizer = tokenizer
            return processor.process_texts(prompts)
        return self.processor.process_texts(prompts)

    @torch.inference_mode()
    def embed_queries(
        self,
        texts: list[str],
        *,
        query_prefix: str | None = None,
        max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
        cuda_graphs: bool = True,
    ) -> list[np.ndarray]:
        """
        Encode queries as the checkpoint was trained: prefix, query, 10 augmentation tokens.

        :param texts: The queries.
        :param query_prefix: Text put before each query; `None` for the family's trained prefix
            (`default_query_prefix`: `"Query: "` for ColPali, ColQwen2, ColQwen2.5, ColIdefics3), `""` for none.
        :param max_query_tokens: Longer query texts are cut to this many tokens, with a warning.
        :param cuda_graphs: On CUDA, encode a single query by replaying a CUDA graph of the forward (see
            `query_graphs`: ~4x faster for a 3B model on an H100; equal up to bf16 rounding).
        :returns: One `float32` array `(n_tokens, dim)` per query, padding removed.
        """
        if not texts:
            return []
        batch = self.query_inputs(texts, query_prefix=query_prefix, max_query_tokens=max_query_tokens)
        replayed = self._graph_query(batch, cuda_graphs) if len(texts) == 1 else None
        if replayed is not None:
            return [replayed.float().cpu().numpy()]
        return [v.float().cpu().numpy() for v in self._forward(batch)]

    @torch.inference_mode()
    def embed_query_tensor(
        self,
        text: str,
        *,
        query_prefix: str | None = None,
        max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
        cuda_graphs: bool = True,
    ) -> torch.Tensor:
        """
        Encode one query like `embed_queries`, but leave it on the model's device (no host copy or sync).

        :param text: The query.
        :param query_prefix: As for `embed_queries`.
        :param max_query_tokens: As for `embed_queries`.
        :param cuda_graphs: As for `embed_queries`.
        :returns: `(n_tokens, dim)` tensor in the model's dtype on the model's device, padding removed.
        """
        batch = self.query_inputs([text], query_prefix=query_prefix, max_query_tokens=max_query_tokens)
        replayed = self._graph_query(batch, cuda_graphs)
        if replayed is not None:
            return replayed
        embeddings, _ = self._forward_padded(batch)
        keep = batch["attention_mask"][0].bool()  # the host copy of the mask: selecting rows needs no sync
        if bool(keep.all()):
            return embeddings[0]
        return embeddings[0].index_select(0, keep.nonzero().squeeze(1).to(embeddings.device, non_blocking=True))

    def check_image(self, image: Image.Image) -> None:
        """
        Raise the error the processor would raise for this image's size, without processing its pixels.

        Of the colpali-engine processors only the Qwen family refuses images by size: transformers' `smart_resize`
        raises for an aspect ratio above 200 (TF/models/qwen2_vl/image_processing_qwen2_vl.py:75-78; Qwen2.5-VL
        and Qwen3-VL use the same image processor). PaliGemma resizes every image to a fixed square and Idefics3
        tiles any size (checked with 1600x6, 6x1600, 1x1 and 5000x3 images). The check calls that same function with
        the processor's own settings, so it refuses exactly what the processor refuses.

        :param image: The image.
        :raises ValueError: When the processor would refuse it.
        """
        image_processor = getattr(self.processor, "image_processor", None)
        patch_size = getattr(image_processor, "patch_size", None)
        merge_size = getattr(image_processor, "merge_size", None)
        size = getattr(image_processor, "size", None)
        if patch_size is None or merge_size is None or size is None:
            return
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        smart_resize(
            image.height,
            image.width,
            factor=int(patch_size) * int(merge_size),
            min_pixels=size["shortest_edge"],
            max_pixels=size["longest_edge"],
        )

    def process_images(self, images: list[Image.Image]) -> Any:
        """
        The processor's page batch for `images`.

        :param images: RGB images.
        :returns: The batch.
        :raises ValueError: When the processor refuses an image (e.g. Qwen: aspect ratio above 200).
        """
        return self.processor.process_images(images)

    def pinned(self, batch: Any) -> Any:
        """
        `batch` with its tensors in page-locked memory when the model is on CUDA (so the copy to the GPU does not
        wait for the host), else `batch` itself.

        :param batch: A processor batch (`process_images`), or `None`.
        :returns: The batch.
        """
        if batch is None or not (self.device.startswith("cuda") and torch.cuda.is_available()):
            return batch
        for key, value in list(batch.items()):
            if isinstance(value, torch.Tensor):
                batch[key] = value.pin_memory()
        return batch

    @torch.inference_mode()
    def embed_images(
        self, images: list[Image.Image], *, pool_factor: int | None = None, batch: Any | None = None
    ) -> list[np.ndarray]:
        """
        Encode page images.

        :param images: RGB images.
        :param pool_factor: Optional hierarchical token pooling factor (colpali-engine's pooler, run on the
            model's device): `max(n_vectors // pool_factor, 1)` vectors are kept per page.
        :param batch: The processor batch of `images` when already computed (`process_images`).
        :returns: One `float32` array `(n_vectors, dim)` per image, padding removed.
        :raises ValueError: When the processor refuses an image.
        """
        if not images:
            return []
        batch = batch if batch is not None else self.processor.process_images(images)
        if pool_factor is not None and pool_factor > 1:
            pooled = pool_tensors(self._forward(batch), pool_factor)
            host = torch.cat([v.float() for v in pooled]).cpu()  # one device-to-host copy for the batch
            return [part.numpy() for part in host.split([v.shape[0] for v in pooled])]
        # One device-to-host copy for the batch; the padding rows are dropped on the host (no per-page sync).
        embeddings = self._embed(batch).float().cpu()
        mask = batch["attention_mask"].bool().cpu()
        return [embeddings[i][mask[i]].numpy() for i in range(embeddings.shape[0])]
