from __future__ import annotations

import threading
from typing import Any

import torch
from haystack import component, default_from_dict, default_to_dict, logging
from haystack.dataclasses import ChatMessage, ComponentInfo, StreamingCallbackT, StreamingChunk
from haystack.utils import ComponentDevice, Secret, deserialize_callable, serialize_callable

from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec, serialize_loading_params
from haystack_integrations.common.multimodal_rag.backends.vlm import (
    QWEN2_VL_MAX_PIXELS,
    ImagePart,
    VisionLanguageModel,
    VLMLoadSpec,
    drop_images,
    to_hf_messages,
)

logger = logging.getLogger(__name__)

_DEFAULT_GENERATION_KWARGS: dict[str, Any] = {"max_new_tokens": 512}


@component
class LocalVLMChatGenerator:
    """
    Runs a vision-language model in-process with transformers, and really passes the images to it.

    Haystack's `ImageContent` parts of the user messages are decoded and given to the model's processor with
    the text rendered by the model's own chat template (`AutoModelForImageTextToText` + `AutoProcessor`), so
    a fully local multimodal RAG needs no external server. Works with any Haystack prompt that carries
    images, e.g. `MultimodalChatPromptBuilder`'s messages.

    Images are decoded by the package's one pixel loader (Pillow's decompression-bomb limit stays on) and get a
    bounded visual-token budget: with `processor_kwargs=None`, a Qwen-VL style processor allowing more than
    `1280*28*28` pixels per image (at most 1280 visual tokens, Qwen's recommended upper bound) is loaded with that
    limit, so a 12-megapixel photo is not ~15k tokens; fixed-resolution processors are left as they are.
    An image the processor refuses (e.g. a 1600x6 banner: Qwen-VL processors refuse aspect ratios over 200) is
    dropped from the prompt with a warning naming its message and part; the reply's `meta["dropped_images"]`
    lists them. Other images and the text still reach the model.

    Streaming goes through Haystack's `streaming_callback` (one `StreamingChunk` per decoded piece of text).

    ### Usage example
    ```python
    from haystack.dataclasses import ChatMessage, ImageContent
    from haystack_integrations.components.generators.local_vlm import LocalVLMChatGenerator

    generator = LocalVLMChatGenerator(model="Qwen/Qwen2.5-VL-3B-Instruct", generation_kwargs={"max_new_tokens": 128})
    message = ChatMessage.from_user(content_parts=["What does this chart show?",
                                                   ImageContent.from_file_path("chart.png")])
    print(generator.run(messages=[message])["replies"][0].text)
    ```
    """

    def __init__(
        self,
        model: str = "Qwen/Qwen2.5-VL-3B-Instruct",
        *,
        device: ComponentDevice | None = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        generation_kwargs: dict[str, Any] | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        streaming_callback: StreamingCallbackT | None = None,
    ) -> None:
        """
        Create the generator. Nothing is loaded until `warm_up()`.

        :param model: Hugging Face id or local path of an image-text-to-text chat model.
        :param device: Device to run on; `None` picks the best available.
        :param token: Hugging Face token, for gated or private models.
        :param generation_kwargs: Arguments for `model.generate` (default `{"max_new_tokens": 512}`).
        :param local_files_only: Only use a local path or the local Hugging Face cache.
        :param model_kwargs: Extra keyword arguments for `from_pretrained` (e.g. `{"dtype": "bfloat16"}`).
        :param processor_kwargs: Keyword arguments for the processor's `from_pretrained`, e.g.
            `{"max_pixels": 1003520, "min_pixels": 200704}` for Qwen-VL models. `None`: the checkpoint's processor
            with at most `1280*28*28` pixels (1280 visual tokens) per image for Qwen-VL style processors.
        :param streaming_callback: Called with a `StreamingChunk` for each piece of generated text.
        """
        self.model = model
        self.device = device
        self.token = token
        self.generation_kwargs = generation_kwargs
        self.local_files_only = local_files_only
        self.model_kwargs = model_kwargs
        self.processor_kwargs = processor_kwargs
        self.streaming_callback = streaming_callback
        self._vlm: VisionLanguageModel | None = None
        self._warm_lock = threading.Lock()

    def warm_up(self) -> None:
        """
        Load the model and processor (idempotent).

        :raises ModelLoadError: When the model cannot be loaded.
        """
        with self._warm_lock:
            if self._vlm is None:
                base = LoadSpec.of(self)
                self._vlm = VisionLanguageModel.get(
                    VLMLoadSpec(**vars(base), max_pixels=QWEN2_VL_MAX_PIXELS if self.processor_kwargs is None else None)
                )

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            **serialize_loading_params(self),
            generation_kwargs=self.generation_kwargs,
            processor_kwargs=self.processor_kwargs,
            streaming_callback=serialize_callable(self.streaming_callback) if self.streaming_callback else None,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocalVLMChatGenerator:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        params = dict(data.get("init_parameters", {}))
        data = {**data, "init_parameters": params}
        if params.get("streaming_callback"):
            params["streaming_callback"] = deserialize_callable(params["streaming_callback"])
        return default_from_dict(cls, data)

    def _streamer(self, callback: StreamingCallbackT) -> Any:
        from transformers import TextStreamer

        assert self._vlm is not None
        info = ComponentInfo.from_component(self)
        state = {"index": 0}

        class _CallbackStreamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:  # noqa: ARG002
                if text:
                    callback(StreamingChunk(content=text, component_info=info, index=0, start=state["index"] == 0))
                    state["index"] += 1

        return _CallbackStreamer(self._vlm.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def _encode(
        self, hf_messages: list[dict[str, Any]], images: list[ImagePart]
    ) -> tuple[dict[str, Any], list[ImagePart], list[ImagePart]]:
        """Encode the conversation; on a processor refusal, drop the images it refuses (with a warning) and retry."""
        assert self._vlm is not None
        vlm = self._vlm
        try:
            return vlm.encode([vlm.prompt_text(hf_messages)], [[p.image for p in images]]), images, []
        except ValueError as e:
            if not images:
                raise
            error = e
        problems = {id(p): vlm.image_problem(p.image) for p in images}
        dropped = [p for p in images if problems[id(p)] is not None]
        if not dropped:
            raise error  # the processor failed for another reason than one image
        kept = [p for p in images if problems[id(p)] is None]
        logger.warning(
            "{component}: {count} image(s) the model's processor refuses were left out of the prompt: {details}",
            component=type(self).__name__,
            count=len(dropped),
            details="; ".join(f"{p.label} ({p.image.width}x{p.image.height}): {problems[id(p)]}" for p in dropped),
        )
        messages = drop_images(hf_messages, dropped)
        return vlm.encode([vlm.prompt_text(messages)], [[p.image for p in kept]]), kept, dropped

    @component.output_types(replies=list[ChatMessage])
    def run(
        self,
        messages: list[ChatMessage],
        generation_kwargs: dict[str, Any] | None = None,
        streaming_callback: StreamingCallbackT | None = None,
    ) -> dict[str, list[ChatMessage]]:
        """
        Generate a reply to a conversation whose messages may carry images.

        :param messages: The conversation; `ImageContent` parts are passed to the model as pixels.
        :param generation_kwargs: Overrides merged into the init `generation_kwargs` for this call.
        :param streaming_callback: Overrides the init `streaming_callback` for this call.
        :returns: `{"replies": [ChatMessage]}`: one assistant message with `meta` holding the model id,
            `finish_reason` (`"stop"` or `"length"`) and token `usage`.
        :raises ValueError: On unsupported message parts (tool calls) or images that cannot be decoded
            (`MediaError`, which names the message and part). Images the processor refuses are dropped, not raised.
        """
        name = type(self).__name__
        hf_messages, images = to_hf_messages(messages, component=name)
        self.warm_up()
        assert self._vlm is not None
        vlm = self._vlm
        kwargs = {**_DEFAULT_GENERATION_KWARGS, **(self.generation_kwargs or {}), **(generation_kwargs or {})}
        callback = streaming_callback if streaming_callback is not None else self.streaming_callback
        if callback is not None:
            kwargs["streamer"] = self._streamer(callback)
        inputs, kept, dropped = self._encode(hf_messages, images)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            output = vlm.model.generate(**inputs, **kwargs)
        new_tokens = output[0, prompt_tokens:]
        text = vlm.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        max_new = kwargs.get("max_new_tokens")
        finish = "length" if max_new is not None and len(new_tokens) >= int(max_new) else "stop"
        meta = {
            "model": vlm.model_id,
            "finish_reason": finish,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(new_tokens),
                "total_tokens": prompt_tokens + len(new_tokens),
            },
            "images": len(kept),
        }
        if dropped:
            meta["dropped_images"] = [p.label for p in dropped]
        return {"replies": [ChatMessage.from_assistant(text, meta=meta)]}
