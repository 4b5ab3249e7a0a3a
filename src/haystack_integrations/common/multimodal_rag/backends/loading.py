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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar, cast

import torch
from haystack.utils import ComponentDevice, Secret
from haystack.utils.hf import deserialize_hf_model_kwargs, serialize_hf_model_kwargs

from haystack_integrations.common.multimodal_rag.errors import ModelLoadError

T = TypeVar("T")


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
    spec: LoadSpec,
    *,
    model_what: str,
    processor_what: str,
) -> tuple[Any, Any]:
    """
    Load a model and its processor the package's way, and put the model on the spec's device in eval mode.

    :param model_loader: E.g. `AutoModel.from_pretrained`.
    :param processor_loader: E.g. `AutoProcessor.from_pretrained`.
    :param spec: What to load and how.
    :param model_what: What the model is, for messages (e.g. `"ColQwen2_5 model"`).
    :param processor_what: What the processor is, for messages.
    :returns: `(model, processor)`.
    :raises ModelLoadError: When either cannot be loaded.
    """
    hf_model = load_pretrained(
        model_loader,
        spec.model,
        component=spec.component,
        what=model_what,
        local_files_only=spec.local_files_only,
        **pretrained_kwargs(token=spec.token, model_kwargs=spec.model_kwargs, for_model=True),
    )
    processor = load_pretrained(
        processor_loader,
        spec.model,
        component=spec.component,
        what=processor_what,
        local_files_only=spec.local_files_only,
        **pretrained_kwargs(token=spec.token, model_kwargs=spec.model_kwargs, for_model=False),
        **(spec.processor_kwargs or {}),
    )
    hf_model.to(spec.device)
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


@dataclass(frozen=True)
class LoadSpec:
    """
    What to load and how: the standard loading parameters every model component has.

    :param model: Model id or local path.
    :param component: Name of the component asking (for error messages).
    :param device: Torch device string.
    :param token: Hugging Face token (resolved only when loading).
    :param local_files_only: Only use local files / the cache.
    :param model_kwargs: Extra `from_pretrained` keyword arguments.
    :param processor_kwargs: Extra keyword arguments for the processor's `from_pretrained` (e.g. a visual-token
        budget: `{"max_pixels": ...}` or `{"max_num_visual_tokens": 768}`); `None` for the backend's defaults.
    """

    model: str
    component: str
    device: str
    token: Secret | None
    local_files_only: bool
    model_kwargs: dict[str, Any] | None
    processor_kwargs: dict[str, Any] | None = None

    @classmethod
    def of(cls, component: Any) -> LoadSpec:
        """
        The spec of a component with `model`, `device`, `token`, `local_files_only` and `model_kwargs` attributes.

        :param component: The component.
        :returns: The spec (the device resolved).
        """
        return cls(
            model=component.model,
            component=type(component).__name__,
            device=resolve_device(component.device),
            token=component.token,
            local_files_only=component.local_files_only,
            model_kwargs=component.model_kwargs,
            processor_kwargs=getattr(component, "processor_kwargs", None),
        )

    def cache_key(self) -> str:
        """The settings that identify a loaded model (the token and the asking component do not)."""
        return json.dumps(
            [self.model, self.device, self.local_files_only, self.model_kwargs, self.processor_kwargs],
            sort_keys=True,
            default=str,
        )


class CachedModel:
    """
    Base of the loaded-model wrappers: `get(spec)` loads a model once per process for the same settings.

    Components asking for the same model on the same device share one copy of the weights; it is freed when no
    component holds it any more (weak references). Subclasses implement `_load(spec)`.
    """

    _loaded: ClassVar[weakref.WeakValueDictionary[str, Any]]
    _loaded_lock: ClassVar[threading.Lock]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._loaded = weakref.WeakValueDictionary()
        cls._loaded_lock = threading.Lock()

    @classmethod
    def get(cls, spec: LoadSpec) -> Self:
        """
        Load the model described by `spec`, or return the one already loaded with the same settings.

        :param spec: What to load and how.
        :returns: The loaded model wrapper.
        :raises ModelLoadError: When loading fails; the message names the model and says how to fix it.
        """
        key = spec.cache_key()
        with cls._loaded_lock:
            cached = cls._loaded.get(key)
            if cached is not None:
                return cast(Self, cached)
            loaded = cls._load(spec)
            cls._loaded[key] = loaded
            return loaded

    @classmethod
    def _load(cls, spec: LoadSpec) -> Self:
        raise NotImplementedError


_FINGERPRINT_SAMPLE = 1 << 16


def checkpoint_fingerprint(model: str, *, token: Secret | None = None) -> str:
    """
    A content fingerprint of a checkpoint: the same weights give the same value wherever the folder lives.

    Hashes `config.json` (or `adapter_config.json`) and, for every `*.safetensors` file, its name, size and the
    first and last 64 KiB (the safetensors header, with every tensor's name, shape and offset, and samples of
    the data), so two different fine-tunes of one architecture differ, while moving or copying a folder, or
    loading it by Hub id instead of path, does not change the value. Reading is bounded (a few hundred KiB).

    :param model: Model id (resolved in the Hugging Face cache, never downloaded: call it after loading) or
        local directory.
    :param token: Hugging Face token.
    :returns: `"sha256:<hex>"`, or `"id:<model>"` when no file of the checkpoint can be read.
    """
    import hashlib

    folder = Path(model).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    model,
                    token=token.resolve_value() if token is not None else None,
                    local_files_only=True,
                    allow_patterns=["*.json", "*.safetensors"],
                )
            )
        except Exception:
            return f"id:{model}"
    digest = hashlib.sha256()
    for name in ("config.json", "adapter_config.json"):
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as fh:
            digest.update(fh.read(_FINGERPRINT_SAMPLE))
            if size > _FINGERPRINT_SAMPLE:
                fh.seek(max(size - _FINGERPRINT_SAMPLE, _FINGERPRINT_SAMPLE))
                digest.update(fh.read(_FINGERPRINT_SAMPLE))
    return "sha256:" + digest.hexdigest()


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
