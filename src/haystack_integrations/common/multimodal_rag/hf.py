"""Model loading shared by every component that runs a Hugging Face model in-process.

One function turns any loading failure into a message that names the model and says how to fix it;
one function builds the keyword arguments every `from_pretrained` call gets (token, offline flag,
safetensors only, no remote code unless asked for).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from haystack.utils import ComponentDevice, Secret
from haystack.utils.hf import deserialize_hf_model_kwargs, serialize_hf_model_kwargs

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A model or processor could not be loaded; the message says which and how to fix it."""


def default_token() -> Secret:
    """A fresh copy of the default Hugging Face token secret (`HF_API_TOKEN` or `HF_TOKEN`, optional)."""
    return Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False)


def resolve_device(device: ComponentDevice | None) -> str:
    """
    Resolve a Haystack device into a torch device string.

    :param device: The configured device, or `None` for the best available one.
    :returns: A torch device string such as `"cpu"` or `"cuda:0"`.
    """
    return ComponentDevice.resolve_device(device).to_torch_str()


def pretrained_kwargs(*, token: Secret | None, model_kwargs: dict[str, Any] | None, for_model: bool) -> dict[str, Any]:
    """
    Keyword arguments for `from_pretrained`: token, safetensors only, no remote code unless asked for.

    For a model, every `model_kwargs` entry is passed and overrides the defaults (a user may opt into
    `trust_remote_code=True`); for a processor only `trust_remote_code` is taken from `model_kwargs`.

    :param token: Hugging Face token secret; resolved here, never earlier.
    :param model_kwargs: Extra keyword arguments from the component.
    :param for_model: True for the model, False for its processor/tokenizer.
    :returns: The keyword arguments (without `local_files_only`, which `load_pretrained` adds).
    """
    kwargs: dict[str, Any] = {
        "token": token.resolve_value() if token is not None else None,
        "trust_remote_code": False,
    }
    extra = copy.deepcopy(model_kwargs or {})
    deserialize_hf_model_kwargs(extra)
    if for_model:
        kwargs["use_safetensors"] = True
        kwargs.update(extra)
    elif "trust_remote_code" in extra:
        kwargs["trust_remote_code"] = extra["trust_remote_code"]
    return kwargs


def serialize_model_kwargs(model_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """
    Make `model_kwargs` JSON/YAML serializable (torch dtypes become strings).

    :param model_kwargs: The component's model kwargs.
    :returns: A serializable copy, or `None`.
    """
    if model_kwargs is None:
        return None
    out = copy.deepcopy(model_kwargs)
    serialize_hf_model_kwargs(out)
    return out


def describe_fix(model: str, local_files_only: bool) -> str:
    """
    Advice for a model that failed to load.

    :param model: The model id or path.
    :param local_files_only: Whether loading was restricted to local files.
    :returns: One or two sentences.
    """
    if Path(model).expanduser().exists():
        return (
            f"'{model}' is a local path: check that it holds a complete checkpoint saved with save_pretrained "
            "(config.json, safetensors weights and the processor/tokenizer files)."
        )
    if local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return (
            f"Loading is restricted to local files and '{model}' is not in the Hugging Face cache: download it "
            "once with network access, or pass a local directory path as `model`."
        )
    return (
        "Check the model id and your network connection to the Hugging Face Hub (set HF_TOKEN for gated models, "
        "HF_ENDPOINT for a mirror); or download the model once and pass local_files_only=True, "
        "or pass a local directory path as `model`."
    )


def load_pretrained(
    loader: Callable[..., T], model: str, *, component: str, what: str, local_files_only: bool, **kwargs: Any
) -> T:
    """
    Call a `from_pretrained`-style loader and turn any failure into a `ModelLoadError` that says how to fix it.

    :param loader: E.g. `AutoModel.from_pretrained`.
    :param model: Model id or local path.
    :param component: Name of the calling component (for the message).
    :param what: What is being loaded, e.g. `"model"` or `"processor"`.
    :param local_files_only: Passed through and used for the advice.
    :param kwargs: More keyword arguments for the loader.
    :returns: What the loader returns.
    :raises ModelLoadError: When loading fails.
    """
    try:
        return loader(model, local_files_only=local_files_only, **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:
        msg = (
            f"{component} could not load the {what} of '{model}': {type(e).__name__}: {_first_line(e)}. "
            f"{describe_fix(model, local_files_only)}"
        )
        raise ModelLoadError(msg) from e


def load_model_and_processor(
    model_loader: Callable[..., Any],
    processor_loader: Callable[..., Any],
    model: str,
    *,
    component: str,
    model_what: str,
    processor_what: str,
    device: str,
    token: Secret | None,
    local_files_only: bool,
    model_kwargs: dict[str, Any] | None,
) -> tuple[Any, Any]:
    """
    Load a model and its processor the package's way, and put the model on `device` in eval mode.

    :param model_loader: E.g. `AutoModel.from_pretrained`.
    :param processor_loader: E.g. `AutoProcessor.from_pretrained`.
    :param model: Model id or local path.
    :param component: Component name, for messages.
    :param model_what: What the model is, for messages (e.g. `"ColQwen2_5 model"`).
    :param processor_what: What the processor is, for messages.
    :param device: Torch device string.
    :param token: Hugging Face token.
    :param local_files_only: Only use local files / the cache.
    :param model_kwargs: Extra `from_pretrained` keyword arguments.
    :returns: `(model, processor)`.
    :raises ModelLoadError: When either cannot be loaded.
    """
    hf_model = load_pretrained(
        model_loader,
        model,
        component=component,
        what=model_what,
        local_files_only=local_files_only,
        **pretrained_kwargs(token=token, model_kwargs=model_kwargs, for_model=True),
    )
    processor = load_pretrained(
        processor_loader,
        model,
        component=component,
        what=processor_what,
        local_files_only=local_files_only,
        **pretrained_kwargs(token=token, model_kwargs=model_kwargs, for_model=False),
    )
    hf_model.to(device)
    hf_model.eval()
    return hf_model, processor


def read_checkpoint_json(model: str, filename: str, *, token: Secret | None, local_files_only: bool) -> dict | None:
    """
    Read a JSON file (e.g. `config.json`, `adapter_config.json`) of a checkpoint, local or on the Hub.

    :param model: Model id or local directory.
    :param filename: File name inside the checkpoint.
    :param token: Hugging Face token.
    :param local_files_only: Use only local files / the cache.
    :returns: The parsed JSON, or `None` when the checkpoint has no such file.
    :raises Exception: Network or permission errors from the Hub client propagate.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    from transformers.utils import cached_file

    resolved = cached_file(
        model,
        filename,
        token=token.resolve_value() if token is not None else None,
        local_files_only=local_files_only,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=True,
    )
    if resolved is None:
        return None
    return json.loads(Path(resolved).read_text(encoding="utf-8"))


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    """
    The floating dtype of a model's parameters.

    :param module: The model.
    :returns: Its parameter dtype (float32 when it has no floating parameters).
    """
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


class ModelCache(Generic[T]):
    """
    Process-wide cache of loaded models, keyed by their loading settings.

    Components asking for the same model on the same device share one copy of the weights; a model is freed
    when no component holds it any more (weak references).
    """

    def __init__(self) -> None:
        """Create an empty cache."""
        self._items: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get_or_load(self, key_parts: Sequence[Any], load: Callable[[], T]) -> T:
        """
        Return the cached object for `key_parts`, or call `load()` once and cache its result.

        :param key_parts: JSON-serialisable settings that identify the object (model id, device, kwargs...).
        :param load: Builds the object.
        :returns: The object.
        """
        key = json.dumps(list(key_parts), sort_keys=True, default=str)
        with self._lock:
            cached = self._items.get(key)
            if cached is not None:
                return cached
            loaded = load()
            self._items[key] = loaded
            return loaded


def loading_kwargs(component: Any) -> dict[str, Any]:
    """
    The keyword arguments of a backend's `get(model, ...)` for a component with the standard loading parameters.

    :param component: A component with `device`, `token`, `local_files_only` and `model_kwargs` attributes.
    :returns: `component`, `device` (resolved), `token`, `local_files_only`, `model_kwargs`.
    """
    return {
        "component": type(component).__name__,
        "device": resolve_device(component.device),
        "token": component.token,
        "local_files_only": component.local_files_only,
        "model_kwargs": component.model_kwargs,
    }


def serialize_loading_params(component: Any) -> dict[str, Any]:
    """
    The serialized standard loading parameters of a component, for its `to_dict`.

    :param component: A component with `model`, `device`, `token`, `local_files_only` and `model_kwargs`.
    :returns: `model`, `device`, `token`, `local_files_only`, `model_kwargs`, ready for `default_to_dict`.
    """
    return {
        "model": component.model,
        "device": component.device.to_dict() if component.device else None,
        "token": component.token.to_dict() if component.token else None,
        "local_files_only": component.local_files_only,
        "model_kwargs": serialize_model_kwargs(component.model_kwargs),
    }
