"""The CLIP-family dual encoder behind the three multimodal dense embedders.

Any checkpoint that transformers loads with `AutoModel` + `AutoProcessor` and that has
`get_text_features` / `get_image_features` works (CLIP, SigLIP, SigLIP 2, ...). Loaded encoders are
shared between components that ask for the same model on the same device, so a text embedder and a
document embedder in one process hold one copy of the weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.loading import (
    CachedModel,
    LoadSpec,
    load_model_and_processor,
    model_dtype,
)
from haystack_integrations.common.multimodal_rag.errors import ModelLoadError

_TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose `pooler_output` is the projected embedding; 4.x a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None and isinstance(output, (tuple, list)):
        pooled = output[1] if len(output) > 1 else output[0]
    if not isinstance(pooled, torch.Tensor):
        msg = f"unexpected output of the encoder's feature method: {type(output).__name__}"
        raise TypeError(msg)
    return pooled


class DenseEncoder(CachedModel):
    """
    A loaded dual encoder: text tower and vision tower into one vector space.

    Use `DenseEncoder.get(LoadSpec(...))` to load (or reuse) one.
    """

    def __init__(self, model: Any, processor: Any, device: str, model_id: str) -> None:
        """
        Wrap a loaded model and processor.

        :param model: A model with `get_text_features` and `get_image_features`.
        :param processor: Its processor (tokenizer + image processor).
        :param device: Torch device string the model lives on.
        :param model_id: The id or path it was loaded from (for messages).
        """
        self.model = model
        self.processor = processor
        self.device = device
        self.model_id = model_id
        self.tokenizer: Any = getattr(processor, "tokenizer", None)
        self.image_processor: Any = getattr(processor, "image_processor", None)
        if self.tokenizer is None or self.image_processor is None:
            msg = f"the processor of '{model_id}' lacks a tokenizer or an image processor; a dual encoder needs both"
            raise ModelLoadError(msg)
        self.dtype = model_dtype(model)
        self.max_length = self._text_max_length()

    @classmethod
    def _load(cls, spec: LoadSpec) -> DenseEncoder:
        from transformers import AutoModel, AutoProcessor

        hf_model, processor = load_model_and_processor(
            AutoModel.from_pretrained,
            AutoProcessor.from_pretrained,
            spec,
            model_what="model",
            processor_what="processor",
        )
        if not (hasattr(hf_model, "get_text_features") and hasattr(hf_model, "get_image_features")):
            msg = (
                f"{spec.component}: '{spec.model}' loads as {type(hf_model).__name__}, which has no "
                "get_text_features/get_image_features: use a CLIP-family dual encoder (CLIP, SigLIP, SigLIP 2)."
            )
            raise ModelLoadError(msg)
        return cls(hf_model, processor, spec.device, spec.model)

    def _text_max_length(self) -> int:
        candidates = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            candidates.append(tok_max)
        config = getattr(self.model, "config", None)
        text_config = getattr(config, "text_config", None)
        pos = getattr(text_config, "max_position_embeddings", None)
        if isinstance(pos, int) and pos > 0:
            candidates.append(pos)
        return min(candidates) if candidates else 64

    @torch.inference_mode()
    def embed_texts(self, texts: list[str], *, normalize: bool) -> np.ndarray:
        """
        Embed texts with the text tower.

        Texts are padded to a fixed length (as CLIP/SigLIP were trained), so a text's embedding does not
        depend on the other texts in its batch.

        :param texts: The texts.
        :param normalize: L2-normalise each embedding.
        :returns: `float32` array of shape `(len(texts), dim)`.
        """
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        inputs = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        kwargs = {k: inputs[k].to(self.device) for k in _TEXT_INPUT_KEYS if k in inputs}
        features = _pooled(self.model.get_text_features(**kwargs))
        return self._finish(features, normalize)

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image], *, normalize: bool) -> np.ndarray:
        """
        Embed images with the vision tower.

        :param images: RGB images.
        :param normalize: L2-normalise each embedding.
        :returns: `float32` array of shape `(len(images), dim)`.
        """
        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        inputs = self.image_processor(images=images, return_tensors="pt")
        kwargs: dict[str, Any] = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            kwargs[key] = value
        features = _pooled(self.model.get_image_features(**kwargs))
        return self._finish(features, normalize)

    @staticmethod
    def _finish(features: torch.Tensor, normalize: bool) -> np.ndarray:
        features = features.float()
        if normalize:
            features = torch.nn.functional.normalize(features, p=2, dim=-1)
        return features.cpu().numpy()
