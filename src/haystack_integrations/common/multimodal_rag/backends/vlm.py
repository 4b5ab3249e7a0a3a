"""In-process vision-language models: loading and Haystack ChatMessage -> transformers chat conversion.

Shared by `LocalVLMChatGenerator` (generation) and `VisionLanguageRanker` (one forward pass per candidate),
so both load models, devices and images the same way. Any checkpoint that transformers loads with
`AutoModelForImageTextToText` + `AutoProcessor` and that has a chat template works (Qwen2-VL, Qwen2.5-VL,
Idefics3/SmolVLM, LLaVA-style models, ...).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from haystack.dataclasses import ChatMessage, ChatRole, ImageContent
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.loading import (
    CachedModel,
    LoadSpec,
    load_model_and_processor,
    model_dtype,
)
from haystack_integrations.common.multimodal_rag.errors import ModelLoadError


class VisionLanguageModel(CachedModel):
    """A loaded image-text-to-text model with its processor. Use `VisionLanguageModel.get(LoadSpec(...))`."""

    def __init__(self, model: Any, processor: Any, *, device: str, model_id: str) -> None:
        """
        Wrap a loaded model and processor.

        :param model: An `AutoModelForImageTextToText` model.
        :param processor: Its processor.
        :param device: Torch device string.
        :param model_id: Id or path it was loaded from.
        """
        self.model = model
        self.processor = processor
        self.tokenizer: Any = getattr(processor, "tokenizer", processor)
        self.device = device
        self.model_id = model_id
        self.dtype = model_dtype(model)

    @classmethod
    def _load(cls, spec: LoadSpec) -> VisionLanguageModel:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        hf_model, processor = load_model_and_processor(
            AutoModelForImageTextToText.from_pretrained,
            AutoProcessor.from_pretrained,
            spec,
            model_what="vision-language model",
            processor_what="processor",
        )
        if not getattr(processor, "chat_template", None) and not getattr(
            getattr(processor, "tokenizer", None), "chat_template", None
        ):
            msg = f"{spec.component}: '{spec.model}' has no chat template; use an instruction-tuned (chat) checkpoint"
            raise ModelLoadError(msg)
        return cls(hf_model, processor, device=spec.device, model_id=spec.model)

    def prompt_text(self, hf_messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """
        Render messages with the model's chat template.

        :param hf_messages: Messages in transformers' chat format (see `to_hf_messages`).
        :param add_generation_prompt: Append the assistant turn's opening.
        :returns: The prompt text.
        """
        return str(
            self.processor.apply_chat_template(hf_messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        )

    def encode(self, texts: list[str], images: list[list[Image.Image]], *, padding_side: str | None = None) -> Any:
        """
        Tokenize prompts and preprocess their images into model inputs on the model's device.

        :param texts: One rendered prompt per sample.
        :param images: The images of each sample, in the order their placeholders appear.
        :param padding_side: `"left"` aligns every sample's last token at the end (for scoring the next token).
        :returns: A dict with `input_ids`, `attention_mask` and (when there are images) pixel inputs.
        """
        flat = [img for sample in images for img in sample]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if padding_side is not None:
            kwargs["padding_side"] = padding_side
        if flat:
            kwargs["images"] = flat
        inputs = self.processor(**kwargs)
        moved = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            moved[key] = value
        return moved


def decode_image_content(image: ImageContent, *, label: str) -> Image.Image:
    """
    Decode a Haystack `ImageContent` into an RGB PIL image.

    :param image: The image part.
    :param label: Where it came from, for messages.
    :returns: The image.
    :raises ValueError: When the base64 data is not a readable image.
    """
    try:
        data = base64.b64decode(image.base64_image)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:
        msg = f"{label}: the image cannot be decoded ({type(e).__name__}: {e})"
        raise ValueError(msg) from e


def to_hf_messages(messages: list[ChatMessage], *, component: str) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """
    Convert Haystack chat messages into transformers' chat format, collecting the images in order.

    Text parts become `{"type": "text", "text": ...}`, `ImageContent` parts `{"type": "image"}` (the image
    itself is returned in the second list, in the order the placeholders appear).

    :param messages: Haystack `ChatMessage`s (system, user, assistant).
    :param component: Component name, for messages.
    :returns: `(hf_messages, images)`.
    :raises ValueError: On tool calls/results or an image that cannot be decoded.
    """
    if not messages:
        msg = f"{component} received no messages"
        raise ValueError(msg)
    hf_messages: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for m_index, message in enumerate(messages):
        if message.role not in (ChatRole.SYSTEM, ChatRole.USER, ChatRole.ASSISTANT):
            msg = f"{component} supports system, user and assistant messages, not {message.role.value!r}"
            raise ValueError(msg)
        parts: list[dict[str, Any]] = []
        # `to_dict()` is the public, ordered view of a message's parts.
        for p_index, part in enumerate(message.to_dict()["content"]):
            if "text" in part:
                parts.append({"type": "text", "text": part["text"]})
            elif "image" in part:
                image = ImageContent.from_dict({**part["image"], "validation": False})
                images.append(decode_image_content(image, label=f"{component}: message {m_index}, part {p_index}"))
                parts.append({"type": "image"})
            else:
                kind = next(iter(part), "unknown")
                msg = f"{component} does not support {kind!r} message parts (message {m_index})"
                raise ValueError(msg)
        hf_messages.append({"role": message.role.value, "content": parts})
    return hf_messages, images
