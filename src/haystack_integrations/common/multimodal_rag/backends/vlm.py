"""In-process vision-language models: loading and Haystack ChatMessage -> transformers chat conversion.

Shared by `LocalVLMChatGenerator` (generation) and `VisionLanguageRanker` (one forward pass per candidate),
so both load models, devices and images the same way. Any checkpoint that transformers loads with
`AutoModelForImageTextToText` + `AutoProcessor` and that has a chat template works (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Idefics3/SmolVLM, LLaVA-style models, ...), and so do PEFT adapters on one of them whose processor
lives in the base model's repository (like `lightonai/MonoQwen2-VL-v0.1`).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from haystack import logging
from haystack.dataclasses import ChatMessage, ChatRole, ImageContent
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.acceleration import with_device_defaults
from haystack_integrations.common.multimodal_rag.backends.loading import (
    CachedModel,
    LoadSpec,
    describe_fix,
    load_pretrained,
    model_dtype,
    place_model,
    pretrained_kwargs,
    read_checkpoint_json,
)
from haystack_integrations.common.multimodal_rag.errors import MediaError, ModelLoadError

# The shared pixel loader's decode path: decompression-bomb limit, EXIF orientation, transparency onto white.
from haystack_integrations.common.multimodal_rag.inputs.media import decode_image_bytes

logger = logging.getLogger(__name__)

#: Qwen's recommended upper bound on visual tokens per image: "such as a token count range of 256-1280, to
#: balance speed and memory usage ... max_pixels = 1280*28*28" (Qwen2-VL-*-Instruct model card; QwenLM/Qwen2.5-VL
#: README.md:150-154 @f0af2996). One visual token is a 28x28 patch after the 2x2 merge. The checkpoints' own
#: preprocessor_config allows 12845056 pixels (16384 tokens), which turns a 12-megapixel photo into ~15k tokens.
QWEN2_VL_MAX_PIXELS = 1280 * 28 * 28


@dataclass(frozen=True)
class VLMLoadSpec(LoadSpec):
    """
    A `LoadSpec` with the two settings only vision-language models have.

    :param processor: Where the processor comes from (`None`: the model's own, or the base model of a PEFT adapter
        that ships no processor files).
    :param max_pixels: Visual-token budget applied when `processor_kwargs` is `None`: a dynamic-resolution
        (Qwen-VL style) image processor whose `max_pixels` is larger is re-loaded with this value; it never raises a
        checkpoint's own limit and leaves fixed-resolution processors alone. `None`: the checkpoint's own setting.
    """

    processor: str | None = None
    max_pixels: int | None = None

    def cache_key(self) -> str:
        """The settings that identify a loaded model (the base ones plus the processor and the pixel budget)."""
        return json.dumps([super().cache_key(), self.processor, self.max_pixels])


def _local_dir(model: str) -> Path | None:
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def _has_full_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def adapter_base(spec: LoadSpec) -> str | None:
    """
    The base model of a PEFT adapter checkpoint (from its `adapter_config.json`), or `None` when it is not one.

    :param spec: What to load.
    :returns: `base_model_name_or_path`, or `None`.
    :raises ModelLoadError: When the adapter configuration cannot be read.
    """
    try:
        adapter = read_checkpoint_json(
            spec.model, "adapter_config.json", token=spec.token, local_files_only=spec.local_files_only
        )
    except Exception as e:
        msg = (
            f"{spec.component} could not read the configuration of '{spec.model}': {type(e).__name__}: {e}. "
            f"{describe_fix(spec.model, spec.local_files_only)}"
        )
        raise ModelLoadError(msg) from e
    if adapter is None:
        return None
    base = adapter.get("base_model_name_or_path")
    return str(base) if base else None


def resolve_processor_source(spec: VLMLoadSpec) -> str:
    """
    Where the processor of `spec` is loaded from.

    `spec.processor` when given; else the model itself, unless the model is a PEFT adapter without processor
    files: then its base model (MonoQwen2-VL-v0.1 ships no processor; its card loads it from
    `Qwen/Qwen2-VL-2B-Instruct`, https://huggingface.co/lightonai/MonoQwen2-VL-v0.1 README "Usage").

    :param spec: What to load.
    :returns: A model id or path.
    :raises ModelLoadError: When a configuration file cannot be read.
    """
    if spec.processor is not None:
        return spec.processor
    base = adapter_base(spec)
    if base is None:
        return spec.model
    for name in ("preprocessor_config.json", "processor_config.json"):
        try:
            own = read_checkpoint_json(spec.model, name, token=spec.token, local_files_only=spec.local_files_only)
        except Exception:
            own = None
        if own is not None:
            return spec.model
    return base


def _load_model(spec: VLMLoadSpec) -> Any:
    from transformers import AutoModelForImageTextToText

    kwargs = pretrained_kwargs(token=spec.token, model_kwargs=spec.model_kwargs, for_model=True)
    local = _local_dir(spec.model)
    base = adapter_base(spec) if local is not None and not _has_full_weights(local) else None
    if base is None:
        # Hub ids of adapters are followed to their base by transformers itself (auto_factory.py, PEFT integration).
        return load_pretrained(
            AutoModelForImageTextToText.from_pretrained,
            spec.model,
            component=spec.component,
            what="vision-language model",
            local_files_only=spec.local_files_only,
            **kwargs,
        )
    # A local adapter folder that also holds config.json (MonoQwen2-VL-v0.1's layout: adapter weights + the base's
    # config.json) is taken by transformers for a complete model and fails with "no file named model.safetensors"
    # (auto_factory.py only follows the adapter when the folder has no config.json). Load the base, then the
    # adapter, as the MonoQwen card suggests without peft's wrapper ("model.load_adapter on the original model").
    model = load_pretrained(
        AutoModelForImageTextToText.from_pretrained,
        base,
        component=spec.component,
        what=f"base model (of the adapter '{spec.model}')",
        local_files_only=spec.local_files_only,
        **kwargs,
    )
    try:
        model.load_adapter(str(local))
    except Exception as e:
        msg = (
            f"{spec.component} could not load the PEFT adapter '{spec.model}' onto '{base}': "
            f"{type(e).__name__}: {e}. Is `peft` installed (pip install peft)?"
        )
        raise ModelLoadError(msg) from e
    return model


def _dynamic_size(processor: Any) -> tuple[int, int] | None:
    """`(min_pixels, max_pixels)` of a Qwen-VL style (dynamic-resolution) image processor, `None` for others."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or getattr(image_processor, "merge_size", None) is None:
        return None
    size = getattr(image_processor, "size", None)
    shortest = getattr(size, "shortest_edge", None)
    longest = getattr(size, "longest_edge", None)
    if not isinstance(shortest, int) or not isinstance(longest, int):
        return None
    return shortest, longest


def _load_processor(spec: VLMLoadSpec) -> Any:
    from transformers import AutoProcessor

    source = resolve_processor_source(spec)
    what = "processor" if source == spec.model else f"processor (from '{source}')"
    kwargs = pretrained_kwargs(token=spec.token, model_kwargs=spec.model_kwargs, for_model=False)

    def load(**extra: Any) -> Any:
        return load_pretrained(
            AutoProcessor.from_pretrained,
            source,
            component=spec.component,
            what=what,
            local_files_only=spec.local_files_only,
            **kwargs,
            **extra,
        )

    user = dict(spec.processor_kwargs or {})
    pixels = {key: user.pop(key) for key in ("min_pixels", "max_pixels") if key in user}
    processor = load(**user)
    own = _dynamic_size(processor)
    if own is None:
        # A fixed-resolution processor: pixel settings are passed on as given (transformers ignores unknown ones).
        return load(**user, **pixels) if pixels else processor
    min_pixels, max_pixels = own
    if spec.processor_kwargs is None and spec.max_pixels is not None:
        pixels = {"max_pixels": min(max_pixels, spec.max_pixels)}  # never raise the checkpoint's own limit
    unchanged = (
        pixels.get("min_pixels", min_pixels) == min_pixels and pixels.get("max_pixels", max_pixels) == max_pixels
    )
    if "size" in user or unchanged:
        return processor
    # `size={"shortest_edge", "longest_edge"}` is what `min_pixels`/`max_pixels` map to (transformers
    # image_processing_qwen2_vl.py `__init__`); given as min/max_pixels, transformers 5.23 also replays them at
    # every call with a FutureWarning. The Qwen2.5-VL README (lines 414-430) sets the budget at from_pretrained.
    size = {
        "shortest_edge": int(pixels.get("min_pixels", min(min_pixels, pixels.get("max_pixels", max_pixels)))),
        "longest_edge": int(pixels.get("max_pixels", max_pixels)),
    }
    return load(**user, size=size)


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
        # A fast (Rust) tokenizer changes its own padding/truncation state at every call and fails when two
        # threads use it at once ("Already borrowed"); the ranker preprocesses on a background thread.
        self._processor_lock = threading.RLock()

    @classmethod
    def _load(cls, spec: LoadSpec) -> VisionLanguageModel:
        vlm_spec = spec if isinstance(spec, VLMLoadSpec) else VLMLoadSpec(**vars(spec))
        hf_model = _load_model(cast(VLMLoadSpec, with_device_defaults(vlm_spec)))
        processor = _load_processor(vlm_spec)
        if not getattr(processor, "chat_template", None) and not getattr(
            getattr(processor, "tokenizer", None), "chat_template", None
        ):
            msg = f"{spec.component}: '{spec.model}' has no chat template; use an instruction-tuned (chat) checkpoint"
            raise ModelLoadError(msg)
        place_model(hf_model, spec.device, requested_attention=(vlm_spec.model_kwargs or {}).get("attn_implementation"))
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

    def preprocess(
        self, texts: list[str], images: list[list[Image.Image]], *, padding_side: str | None = None
    ) -> dict[str, Any]:
        """
        Tokenize prompts and preprocess their images into model inputs, still on the host (CPU work only).

        Safe to call from a background thread while the model runs (the processor is used by one thread at a
        time). Floating inputs are cast to the model's dtype here, on the CPU, and on a CUDA model every tensor is
        put in pinned memory, so `to_device` is a truly asynchronous copy (a copy from pageable memory, or one
        that converts the dtype on the way, makes the host wait).

        :param texts: One rendered prompt per sample.
        :param images: The images of each sample, in the order their placeholders appear.
        :param padding_side: `"left"` aligns every sample's last token at the end (for scoring the next token).
        :returns: A dict with `input_ids`, `attention_mask` and (when there are images) pixel inputs.
        :raises ValueError: When the processor refuses an input (e.g. Qwen's "absolute aspect ratio must be
            smaller than 200").
        """
        flat = [img for sample in images for img in sample]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if padding_side is not None:
            kwargs["padding_side"] = padding_side
        if flat:
            kwargs["images"] = flat
        with self._processor_lock:
            inputs = self.processor(**kwargs)
        pin = self.device.startswith("cuda") and torch.cuda.is_available()
        prepared: dict[str, Any] = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() and value.dtype != self.dtype:
                    value = value.to(self.dtype)
                if pin:
                    value = value.pin_memory()
            prepared[key] = value
        return prepared

    def to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """
        Move `preprocess` output to the model's device (asynchronously on CUDA: the inputs are pinned).

        :param inputs: The output of `preprocess`.
        :returns: The same keys, tensors on the model's device.
        """
        non_blocking = self.device.startswith("cuda")
        return {
            key: value.to(self.device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
            for key, value in inputs.items()
        }

    def encode(self, texts: list[str], images: list[list[Image.Image]], *, padding_side: str | None = None) -> Any:
        """
        Tokenize prompts and preprocess their images into model inputs on the model's device: `preprocess` (same
        parameters, same errors) then `to_device`.

        :returns: `preprocess`'s dict, tensors on the model's device.
        """
        return self.to_device(self.preprocess(texts, images, padding_side=padding_side))

    def image_problem(self, image: Image.Image) -> str | None:
        """
        Why the processor refuses an image on its own (e.g. an aspect ratio over 200 for Qwen-VL), or `None`.

        Only called after a batch failed, to find the culprit.

        :param image: The image.
        :returns: The processor's reason, or `None` when it accepts the image.
        """
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is None:
            return None
        try:
            with self._processor_lock:
                image_processor(images=[image], return_tensors="pt")
        except (ValueError, RuntimeError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    def truncate(self, text: str, max_tokens: int) -> tuple[str, int | None]:
        """
        Cut a text to at most `max_tokens` tokens of the model's tokenizer, cheaply for huge inputs.

        The text is first cut to `max_tokens * 32` characters (far more than `max_tokens` tokens take in a BPE
        vocabulary), so a megabyte of text is never tokenized whole.

        :param text: The text.
        :param max_tokens: The budget.
        :returns: `(text, None)` when it fits, else `(truncated_text, original_length_in_characters)`.
        """
        head = text[: max_tokens * _CHARS_PER_TOKEN_BOUND]
        # Tokenize at most one token past the budget: that is enough to know whether the text fits.
        with self._processor_lock:
            encoded = self.tokenizer(head, add_special_tokens=False, truncation=True, max_length=max_tokens + 1)
            ids = encoded["input_ids"]
            if len(ids) <= max_tokens:
                return (text, None) if len(head) == len(text) else (head, len(text))
            return str(self.tokenizer.decode(ids[:max_tokens])), len(text)


#: Upper bound on characters per token used to pre-cut huge texts before tokenizing (Qwen2's BPE tokens are
#: rarely longer than ~16 characters; runs of spaces can be longer, which only makes the cut more generous).
_CHARS_PER_TOKEN_BOUND = 32


def decode_image_content(image: ImageContent, *, label: str) -> Image.Image:
    """
    Decode a Haystack `ImageContent` into an RGB PIL image through the shared pixel loader.

    The loader keeps Pillow's decompression-bomb limit on (an image over `PIL.Image.MAX_IMAGE_PIXELS` is an error)
    and applies the package's pixel rules, so the generator sees pixels exactly as the rankers and embedders do.

    :param image: The image part.
    :param label: Where it came from, for messages.
    :returns: The image.
    :raises MediaError: (a `ValueError`) When the base64 data is not a readable image or is a decompression bomb.
    """
    try:
        data = base64.b64decode(image.base64_image)
    except (binascii.Error, ValueError) as e:
        msg = f"{label}: the image cannot be decoded (invalid base64: {e})"
        raise MediaError(msg) from e
    try:
        return decode_image_bytes(data, label="in the ImageContent")
    except MediaError as e:
        msg = f"{label}: the image cannot be decoded ({e})"
        raise MediaError(msg) from e


@dataclass(frozen=True)
class ImagePart:
    """
    An image of a conversation, where it sits and its pixels.

    :param message_index: Index of its message.
    :param part_index: Index of the part within the message.
    :param image: The decoded pixels.
    """

    message_index: int
    part_index: int
    image: Image.Image

    @property
    def label(self) -> str:
        """Human-readable position, for messages."""
        return f"message {self.message_index}, part {self.part_index}"


def to_hf_messages(messages: list[ChatMessage], *, component: str) -> tuple[list[dict[str, Any]], list[ImagePart]]:
    """
    Convert Haystack chat messages into transformers' chat format, collecting the images in order.

    Text parts become `{"type": "text", "text": ...}`, `ImageContent` parts `{"type": "image"}` (the image
    itself is returned in the second list, in the order the placeholders appear).

    :param messages: Haystack `ChatMessage`s (system, user, assistant).
    :param component: Component name, for messages.
    :returns: `(hf_messages, images)`.
    :raises ValueError: On tool calls/results or an image that cannot be decoded (`MediaError`).
    """
    if not messages:
        msg = f"{component} received no messages"
        raise ValueError(msg)
    hf_messages: list[dict[str, Any]] = []
    images: list[ImagePart] = []
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
                label = f"{component}: message {m_index}, part {p_index}"
                images.append(ImagePart(m_index, p_index, decode_image_content(image, label=label)))
                parts.append({"type": "image"})
            else:
                kind = next(iter(part), "unknown")
                msg = f"{component} does not support {kind!r} message parts (message {m_index})"
                raise ValueError(msg)
        hf_messages.append({"role": message.role.value, "content": parts})
    return hf_messages, images


def drop_images(hf_messages: list[dict[str, Any]], dropped: list[ImagePart]) -> list[dict[str, Any]]:
    """
    A copy of `hf_messages` without the image placeholders of `dropped`.

    :param hf_messages: Messages from `to_hf_messages`.
    :param dropped: Image parts to remove.
    :returns: The new messages (the input is not modified).
    """
    positions = {(p.message_index, p.part_index) for p in dropped}
    out = []
    for m_index, message in enumerate(hf_messages):
        content = [part for p_index, part in enumerate(message["content"]) if (m_index, p_index) not in positions]
        out.append({**message, "content": content})
    return out
