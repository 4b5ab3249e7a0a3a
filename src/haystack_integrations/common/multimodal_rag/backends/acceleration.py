"""Device-aware loading defaults: the dtype and attention kernel a model gets when the user does not choose.

Applied to every model this package loads (`load_model_and_processor` and the VLM backend); what the user puts
in `model_kwargs` (`dtype`/`torch_dtype`, `attn_implementation`) always wins.

- dtype: bfloat16 on a CUDA device that supports it unless the checkpoint's config records float16 (then
  float16); on a CPU float32, unless the checkpoint records bfloat16 AND the CPU has native bfloat16
  instructions (AVX512-BF16 or AMX on x86, the BF16 extension on Arm). Without them bfloat16 is emulated and
  several times slower than float32 (6.6x slower measured on an AVX2-only CPU, issue 15), so it is never chosen
  automatically there, and a warning says so when the user asks for it. (transformers 5 would otherwise load
  a checkpoint in the dtype it records: bf16 for ColQwen2.5 and Qwen2.5-VL, whatever the CPU.)
- attention: on CUDA, flash-attention-2 when the `flash_attn` package is installed; otherwise transformers'
  own default (PyTorch SDPA for every model family used here). Override with
  `model_kwargs={"attn_implementation": "sdpa"}` (or `"eager"`) for a model flash-attention does not support.
- layout (`contiguous_vision_embeddings`): SigLIP's patch embeddings leave the vision tower as a transposed view
  of the convolution's output, and every later residual sum keeps that layout: each layer norm then copies its
  input, and the residual additions run on the strided, unvectorised path. One copy at the tower's entry gives
  bit-identical results (elementwise sums and layer norms do not depend on the layout) at 20-30% less GPU time
  for the tower (issue 15's profile: 55 full-size copies and 54 strided sums per image batch of SigLIP-so400m).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import platform
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from haystack import logging

if TYPE_CHECKING:
    from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec

logger = logging.getLogger(__name__)

_DTYPE_KEYS = ("dtype", "torch_dtype")


@cache
def cpu_has_native_bf16() -> bool:
    """
    Whether this CPU computes bfloat16 natively (x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension).

    Read from `/proc/cpuinfo` (Linux); `False` where it cannot be read, so bfloat16 is never chosen blindly.

    :returns: True when the flags are present.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def flash_attention_available() -> bool:
    """True when the `flash_attn` package is importable (it is only used on CUDA)."""
    return importlib.util.find_spec("flash_attn") is not None


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def choose_default_dtype(device: str, checkpoint_dtype: str | None, *, cuda_bf16: bool, cpu_bf16: bool) -> str:
    """
    The dtype a model loads in when the user did not set one.

    :param device: Torch device string.
    :param checkpoint_dtype: The `dtype`/`torch_dtype` recorded in the checkpoint's config.json, if any.
    :param cuda_bf16: Whether the CUDA device supports bfloat16.
    :param cpu_bf16: Whether the CPU computes bfloat16 natively.
    :returns: `"bfloat16"`, `"float16"` or `"float32"`.
    """
    checkpoint_dtype = _dtype_name(checkpoint_dtype)
    if device.startswith("cuda"):
        if checkpoint_dtype == "float16":
            return "float16"
        return "bfloat16" if cuda_bf16 else "float32"
    if checkpoint_dtype == "bfloat16" and cpu_bf16 and device == "cpu":
        return "bfloat16"
    return "float32"


def _recorded_dtype(spec: LoadSpec) -> str | None:
    from haystack_integrations.common.multimodal_rag.backends.loading import read_checkpoint_json

    try:
        # Local files / the cache only: never a network round trip of our own before the model load (which
        # reports an unreachable checkpoint with advice). Not cached yet: "the checkpoint says nothing".
        config = read_checkpoint_json(spec.model, "config.json", token=spec.token, local_files_only=True)
    except Exception:
        return None
    if not isinstance(config, dict):
        return None
    text_config = config.get("text_config")
    for source in (config, text_config if isinstance(text_config, dict) else {}):
        recorded = source.get("dtype") or source.get("torch_dtype")
        if recorded is not None:
            return str(recorded)
    return None


def with_device_defaults(spec: LoadSpec) -> LoadSpec:
    """
    The spec with the device's default dtype and attention implementation in `model_kwargs` where unset.

    :param spec: What to load and how (not modified).
    :returns: A spec whose `model_kwargs` name the dtype (and, on CUDA with flash-attention, the kernel).
    """
    kwargs = dict(spec.model_kwargs or {})
    requested = next((_dtype_name(kwargs[k]) for k in _DTYPE_KEYS if k in kwargs), None)
    if requested is None:
        cuda_bf16 = spec.device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        kwargs["dtype"] = choose_default_dtype(
            spec.device, _recorded_dtype(spec), cuda_bf16=cuda_bf16, cpu_bf16=cpu_has_native_bf16()
        )
    elif requested == "bfloat16" and spec.device == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "{component}: model_kwargs asks for bfloat16 on a CPU without native bfloat16 instructions "
            "(no avx512_bf16/amx_bf16): it is emulated and usually several times SLOWER than float32.",
            component=spec.component,
        )
    if spec.device.startswith("cuda") and "attn_implementation" not in kwargs and flash_attention_available():
        kwargs["attn_implementation"] = "flash_attention_2"
    return dataclasses.replace(spec, model_kwargs=kwargs)


def _contiguous_output(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
    return output.contiguous() if isinstance(output, torch.Tensor) else output


def contiguous_vision_embeddings(model: torch.nn.Module) -> int:
    """
    Make the output of every `SiglipVisionEmbeddings` module of `model` contiguous (also inside PaliGemma).

    A forward hook, once per module. Only SigLIP's: its first consumers (a layer norm, which copied it anyway,
    and the residual sums) give the same values whatever the layout; other towers were not checked.

    :param model: A loaded transformers model.
    :returns: How many modules were hooked now.
    """
    hooked = 0
    for module in model.modules():
        if type(module).__name__ == "SiglipVisionEmbeddings" and not getattr(module, "_mmrag_contiguous", False):
            module.register_forward_hook(_contiguous_output)
            setattr(module, "_mmrag_contiguous", True)  # noqa: B010 - an nn.Module attribute, not a tensor
            hooked += 1
    return hooked
