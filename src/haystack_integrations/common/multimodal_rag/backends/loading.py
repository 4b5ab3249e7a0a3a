"""Model loading shared by every component that runs a Hugging Face model in-process.

One function turns any loading failure into a message that names the model and says how to fix it;
one function builds the keyword arguments every `from_pretrained` call gets (token, offline flag,
safetensors only, no remote code unless asked for); one pre-flight check (`preflight`) makes the first load
fail fast, in one line, when the model path does not exist or the Hugging Face Hub does not answer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar, cast

import torch
from haystack import logging
from haystack.utils import ComponentDevice, Secret
from haystack.utils.hf import deserialize_hf_model_kwargs, serialize_hf_model_kwargs

from haystack_integrations.common.multimodal_rag.errors import ModelLoadError

logger = logging.getLogger(__name__)

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
    if local_files_only or hub_offline():
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
    from haystack_integrations.common.multimodal_rag.backends.acceleration import with_device_defaults

    requested_attention = (spec.model_kwargs or {}).get("attn_implementation")
    spec = with_device_defaults(spec)
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
    place_model(hf_model, spec.device, requested_attention=requested_attention)
    return hf_model, processor


def place_model(hf_model: Any, device: str, *, requested_attention: str | None) -> None:
    """
    Put a loaded model on `device` in eval mode with the package's vision-tower speed-ups (every loader's last step).

    Varlen vision attention where it applies (`attention.py`; not when the user set `attn_implementation`),
    contiguous SigLIP patch embeddings (`acceleration.py`), then the move, then the fused kernels built and checked
    for the model's widths on its device (`fused_ops.py`).

    :param hf_model: The loaded transformers model.
    :param device: Its device, e.g. `"cuda:0"`.
    :param requested_attention: The `attn_implementation` the user asked for in `model_kwargs`, if any.
    """
    from haystack_integrations.common.multimodal_rag.backends import fused_ops
    from haystack_integrations.common.multimodal_rag.backends.acceleration import contiguous_vision_embeddings
    from haystack_integrations.common.multimodal_rag.backends.attention import use_varlen_vision_attention

    use_varlen_vision_attention(hf_model, device=device, requested=requested_attention)
    contiguous_vision_embeddings(hf_model)
    hf_model.to(device)
    hf_model.eval()
    fused_ops.prepare(hf_model)


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


def hub_offline() -> bool:
    """
    Whether Hugging Face Hub access is switched off (`HF_HUB_OFFLINE`, read now or when `huggingface_hub` loaded).

    :returns: True in offline mode.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    return bool(constants.HF_HUB_OFFLINE)


def looks_like_local_path(model: str) -> bool:
    """
    Whether a `model` string can only be a directory, never a Hugging Face Hub id.

    Hub ids are `name` or `namespace/name` (`huggingface_hub.utils.validate_repo_id`): a string that is absolute,
    starts with `.` or `~`, holds a backslash or more than one `/` cannot be one.

    :param model: The configured model.
    :returns: True when it can only be a local path.
    """
    return model.startswith((".", "~")) or Path(model).is_absolute() or "\\" in model or model.count("/") > 1


# One verdict per Hub endpoint, reused for a few minutes: a pipeline with three models waits for one probe.
_HUB_VERDICT_TTL_S = 300.0
_hub_verdicts: dict[str, tuple[float, str | None]] = {}
_hub_lock = threading.Lock()


def hub_unreachable() -> tuple[str, float, str | None]:
    """
    Probe the Hugging Face Hub endpoint once, with a short timeout.

    Needed because a load from the Hub can wait without any timeout: transformers resolves the revision with
    `HfApi.model_info(...)`, whose shared `httpx` client has `timeout=None` (huggingface_hub `utils/_http.py`,
    `default_client_factory`), so an endpoint that accepts connections and never answers hangs the load for
    good; and an endpoint that refuses connections gets five retries per file. One `HEAD` request with
    `HF_HUB_ETAG_TIMEOUT` (10 s unless set) through huggingface_hub's own session (so a user's proxy or client
    factory applies) answers the question "is the Hub there?" before any of that starts. Any HTTP answer,
    errors included, counts as reachable; only a network error or a timeout does not.

    :returns: `(endpoint, timeout_s, reason)`; `reason` is `None` when the endpoint answered.
    """
    from huggingface_hub import constants, get_session

    endpoint = constants.ENDPOINT
    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    with _hub_lock:
        verdict = _hub_verdicts.get(endpoint)
        if verdict is not None and time.monotonic() - verdict[0] < _HUB_VERDICT_TTL_S:
            return endpoint, timeout, verdict[1]
        reason: str | None = None
        try:
            get_session().head(endpoint + "/", timeout=timeout, follow_redirects=False)
        except Exception as e:
            reason = f"{type(e).__name__}: {_first_line(e)}"
        _hub_verdicts[endpoint] = (time.monotonic(), reason)
        return endpoint, timeout, reason


def _in_hub_cache(spec: LoadSpec) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(
            spec.model,
            token=spec.token.resolve_value() if spec.token is not None else None,
            local_files_only=True,
            allow_patterns=["*.json"],
        )
    except Exception:
        return False
    return True


_offline_depth = 0
_offline_saved = False


@contextlib.contextmanager
def hub_switched_off() -> Iterator[None]:
    """
    Switch huggingface_hub to offline mode for the duration of a load from the cache (nested use is counted).

    `local_files_only=True` alone does not keep transformers off the network: `AutoModel.from_pretrained` looks
    for a PEFT adapter config without passing it on (transformers `models/auto/auto_factory.py`,
    `find_adapter_config_file`), and that request waits 10 s per try, with retries. huggingface_hub's
    offline flag (`constants.HF_HUB_OFFLINE`, read at every request by its session's request hook and by
    transformers through `is_offline_mode()`) stops every request at once. Used only when the Hub did not
    answer, so other threads lose nothing they could have had.
    """
    global _offline_depth, _offline_saved
    from huggingface_hub import constants

    with _hub_lock:
        if _offline_depth == 0:
            _offline_saved = constants.HF_HUB_OFFLINE
        _offline_depth += 1
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        with _hub_lock:
            _offline_depth -= 1
            if _offline_depth == 0:
                constants.HF_HUB_OFFLINE = _offline_saved


def preflight(spec: LoadSpec) -> LoadSpec:
    """
    Check, before any loading starts, that a model can be found; fail fast with one line when it cannot.

    - A path that does not exist is reported as such (not as huggingface_hub's "Repo id must be in the form").
    - A Hub id, when the Hub is not switched off: the endpoint is probed once (`hub_unreachable`). When it does
      not answer, a model in the local Hugging Face cache is loaded from there (`local_files_only=True`, with a
      warning; load it inside `hub_switched_off()`); a model that is not cached raises at once, naming the
      model, the endpoint and the fix.

    :param spec: What is about to be loaded.
    :returns: The spec to load with (`local_files_only` set when falling back to the cache).
    :raises ModelLoadError: When the model path does not exist, or the Hub is unreachable and the model is not
        cached.
    """
    path = Path(spec.model).expanduser()
    if path.exists():
        if not path.is_dir():
            msg = (
                f"{spec.component} could not load '{spec.model}': it is a file, not a directory. Pass the folder "
                "a checkpoint was saved to with save_pretrained (config.json, safetensors weights, processor files)."
            )
            raise ModelLoadError(msg)
        return spec
    if looks_like_local_path(spec.model):
        msg = (
            f"{spec.component} could not load '{spec.model}': no such directory ({path.absolute()}). Pass the "
            "folder a checkpoint was saved to with save_pretrained, or a Hugging Face model id (namespace/name)."
        )
        raise ModelLoadError(msg)
    if spec.local_files_only or hub_offline():
        return spec
    endpoint, timeout, reason = hub_unreachable()
    if reason is None:
        return spec
    if _in_hub_cache(spec):
        logger.warning(
            "The Hugging Face Hub at {endpoint} did not answer ({reason}): {component} loads '{model}' from the "
            "local cache.",
            endpoint=endpoint,
            reason=reason,
            component=spec.component,
            model=spec.model,
        )
        return dataclasses.replace(spec, local_files_only=True)
    msg = (
        f"{spec.component} could not load '{spec.model}': the Hugging Face Hub at {endpoint} did not answer "
        f"({reason}; timeout {timeout:g} s) and the model is not in the local cache. Check your network or proxy "
        "(HF_ENDPOINT for a mirror), download the model once where the Hub is reachable, or pass a local "
        "directory as `model`."
    )
    raise ModelLoadError(msg)


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
        Before loading, `preflight` checks that the model can be found (a missing directory or an unreachable
        Hub fails at once, in one line).

        :returns: The loaded model wrapper.
        :raises ModelLoadError: When loading fails; the message names the model and says how to fix it.
        """
        key = spec.cache_key()
        with cls._loaded_lock:
            cached = cls._loaded.get(key)
            if cached is not None:
                return cast(Self, cached)
            checked = preflight(spec)
            if checked.local_files_only and not spec.local_files_only:
                with hub_switched_off():
                    loaded = cls._load(checked)
            else:
                loaded = cls._load(checked)
            cls._loaded[key] = loaded
            return loaded

    @classmethod
    def _load(cls, spec: LoadSpec) -> Self:
        raise NotImplementedError


_FINGERPRINT_SAMPLE = 1 << 16


def checkpoint_fingerprint(model: str, *, token: Secret | None = None, _depth: int = 0) -> str:
    """
    A content fingerprint of a checkpoint: the same weights give the same value wherever the folder lives.

    Hashes `config.json` (or `adapter_config.json`) and, for every `*.safetensors` file, its name, size and the
    first and last 64 KiB (the safetensors header, with every tensor's name, shape and offset, and samples of
    the data), so two different fine-tunes of one architecture differ, while moving or copying a folder, or
    loading it by Hub id instead of path, does not change the value. Reading is bounded (a few hundred KiB).
    A PEFT adapter's `base_model_name_or_path` is replaced by its base's fingerprint before hashing, so an
    adapter whose base folder was moved (and the adapter config pointed to the new place) keeps its identity.

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
            data = path.read_bytes()
            if name == "adapter_config.json":
                data = _adapter_identity(data, token=token, depth=_depth)
            digest.update(data)
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as fh:
            digest.update(fh.read(_FINGERPRINT_SAMPLE))
            if size > _FINGERPRINT_SAMPLE:
                fh.seek(max(size - _FINGERPRINT_SAMPLE, _FINGERPRINT_SAMPLE))
                digest.update(fh.read(_FINGERPRINT_SAMPLE))
    return "sha256:" + digest.hexdigest()


def _adapter_identity(data: bytes, *, token: Secret | None, depth: int) -> bytes:
    """A PEFT `adapter_config.json` with its base model named by content (the base's fingerprint), not by path."""
    try:
        config = json.loads(data)
    except ValueError:
        return data
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base or depth >= 2:  # an adapter on an adapter at most
        return data
    config["base_model_name_or_path"] = checkpoint_fingerprint(base, token=token, _depth=depth + 1)
    return json.dumps(config, sort_keys=True).encode()


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
