"""Device-aware loading defaults: the dtype and attention kernel a model gets when the user does not choose.

- CUDA: bfloat16 (float16 on GPUs without bf16) and flash-attention-2 when the `flash_attn` package is
  installed, else PyTorch SDPA. Every model family this package runs (SigLIP, Qwen2-VL, Qwen2.5-VL, the
  ColPali family) was trained and is served in bf16 on GPUs (their model cards' examples load bf16).
- CPU: float32 and the transformers default attention. bf16 on a CPU without native bf16 instructions is far
  slower than fp32 (measured 6.6x slower on the project's AVX2 machine), so it is never chosen automatically.

What the user puts in `model_kwargs` (`dtype`/`torch_dtype`, `attn_implementation`) always wins.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

_DTYPE_KEYS = ("dtype", "torch_dtype")


def flash_attention_available() -> bool:
    """True when the `flash_attn` package is importable (it is only used on CUDA)."""
    return importlib.util.find_spec("flash_attn") is not None


def accelerated_model_kwargs(device: str, model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """
    `model_kwargs` with the device's default dtype and attention implementation filled in where unset.

    :param device: Torch device string the model will run on (`"cpu"`, `"cuda:0"`, `"mps"`, ...).
    :param model_kwargs: The component's `model_kwargs` (not modified).
    :returns: A new dict.
    """
    kwargs = dict(model_kwargs or {})
    if not device.startswith("cuda"):
        return kwargs
    if not any(key in kwargs for key in _DTYPE_KEYS):
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if "attn_implementation" not in kwargs:
        kwargs["attn_implementation"] = "flash_attention_2" if flash_attention_available() else "sdpa"
    return kwargs
