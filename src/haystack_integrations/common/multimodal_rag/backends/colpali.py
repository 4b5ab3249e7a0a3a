"""The late-interaction (ColPali-family) encoder behind the ColPali embedders and ranker.

The model family is chosen from the checkpoint's configuration (`architectures`, then `model_type`), never
from a substring of its name: a ColQwen2.5 fine-tune called "my-retriever" loads as ColQwen2.5. PEFT
adapter checkpoints (like `vidore/colqwen2.5-v0.2`) are followed to their base model's configuration.
Loaded encoders are shared between components asking for the same model on the same device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from haystack.utils import Secret
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.loading import (
    CachedModel,
    LoadSpec,
    describe_fix,
    load_model_and_processor,
    read_checkpoint_json,
)
from haystack_integrations.common.multimodal_rag.errors import ModelLoadError

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


class LateInteractionEncoder(CachedModel):
    """
    A loaded ColPali-family model: queries and page images into multi-vectors (one vector per token).

    Use `LateInteractionEncoder.get(LoadSpec(...))` to load (or reuse) one.
    """

    def __init__(self, model: Any, processor: Any, *, device: str, model_id: str, family: ColPaliFamily) -> None:
        """
        Wrap a loaded model and processor.

        :param model: A colpali-engine model.
        :param processor: Its processor.
        :param device: Torch device string.
        :param model_id: Id or path it was loaded from.
        :param family: Its family.
        """
        self.model = model
        self.processor = processor
        self.device = device
        self.model_id = model_id
        self.family = family
        self.dim = int(getattr(model, "dim", 128))

    @classmethod
    def _load(cls, spec: LoadSpec) -> LateInteractionEncoder:
        import colpali_engine.models as col_models

        family = detect_family(
            spec.model, token=spec.token, local_files_only=spec.local_files_only, component=spec.component
        )
        hf_model, processor = load_model_and_processor(
            getattr(col_models, family.model_class).from_pretrained,
            getattr(col_models, family.processor_class).from_pretrained,
            spec,
            model_what=f"{family.model_class} model",
            processor_what=f"{family.processor_class} processor",
        )
        return cls(hf_model, processor, device=spec.device, model_id=spec.model, family=family)

    def _forward(self, batch: Any) -> list[np.ndarray]:
        inputs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        embeddings = self.model(**inputs)  # (batch, seq, dim), padding rows zeroed by the model
        mask = inputs["attention_mask"].bool()
        return [embeddings[i][mask[i]].float().cpu().numpy() for i in range(embeddings.shape[0])]

    @torch.inference_mode()
    def embed_queries(self, texts: list[str]) -> list[np.ndarray]:
        """
        Encode queries with the model's query processing (prefix and augmentation tokens included).

        :param texts: The queries.
        :returns: One `float32` array `(n_tokens, dim)` per query, padding removed.
        """
        if not texts:
            return []
        return self._forward(self.processor.process_queries(texts=texts))

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image], *, pool_factor: int | None = None) -> list[np.ndarray]:
        """
        Encode page images.

        :param images: RGB images.
        :param pool_factor: Optional hierarchical token pooling factor (colpali-engine's pooler): about
            `n_vectors / pool_factor` vectors are kept per page.
        :returns: One `float32` array `(n_vectors, dim)` per image, padding removed.
        """
        if not images:
            return []
        vectors = self._forward(self.processor.process_images(images))
        if pool_factor is None or pool_factor <= 1:
            return vectors
        return pool_multivectors(vectors, pool_factor)


def pool_multivectors(vectors: list[np.ndarray], pool_factor: int) -> list[np.ndarray]:
    """
    Hierarchical token pooling of page multi-vectors (colpali-engine's `HierarchicalTokenPooler`).

    :param vectors: `(n_vectors, dim)` arrays.
    :param pool_factor: Keep about `n_vectors / pool_factor` vectors per page (at least 1).
    :returns: The pooled arrays, `float32`, L2-normalised rows.
    """
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    pooler = HierarchicalTokenPooler()
    out: list[np.ndarray] = []
    for array in vectors:
        if array.shape[0] < 2:
            out.append(array)
            continue
        pooled = pooler.pool_embeddings([torch.from_numpy(array)], pool_factor=pool_factor)
        out.append(np.asarray(pooled[0].float().numpy(), dtype=np.float32))
    return out
