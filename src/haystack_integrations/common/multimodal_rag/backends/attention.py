"""One variable-length attention call per layer for the Qwen-VL vision towers, instead of one call per window.

The vision towers of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (ColQwen2, ColQwen2.5, ColQwen3, MonoQwen2-VL, the
generators' Qwen-VL models) attend within segments of a packed sequence: within each image (Qwen2-VL, Qwen3-VL,
the four full-attention blocks of Qwen2.5-VL) or within each 112 px window (the other 28 blocks of Qwen2.5-VL).
Under PyTorch SDPA, transformers' vision attention splits the packed sequence and calls attention once per
segment (`VisionAttention.forward`, the `else:` branch after `is_flash_attention_requested`): about 1,300 calls
and a host sync per layer for ONE 768-token page of ColQwen2.5, ~43,000 calls per 32 pages (issue 15's profile).
When a flash-attention implementation is requested, the same module instead passes the segment boundaries
(`cu_seq_lens_q`, `max_length_q`) to the attention function once per layer.

This module registers an attention function under `VARLEN_ATTENTION` (the name must contain "flash": that is
the test transformers' vision attention uses to pass the boundaries) and switches ONLY the vision towers'
config to it after loading; the language model keeps SDPA. The function computes exactly what the per-segment
calls compute:

- on CUDA in float16/bfloat16, with PyTorch's built-in flash-attention varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`, PyTorch >= 2.9): one kernel per layer, no host sync;
- elsewhere (CPU, float32, older PyTorch): segments of equal length are stacked and attended in one SDPA call
  each (a layer of a page costs a handful of calls instead of one per window).

It is applied on CUDA when the user did not set `attn_implementation` in `model_kwargs` and the tower runs on
SDPA; `model_kwargs={"attn_implementation": "sdpa"}` keeps transformers' per-segment path. A tower whose
attention module does not follow the boundary protocol (checked on its source) is left alone. On a CPU nothing
changes (there the attention arithmetic, not the number of calls, is the cost).
"""

from __future__ import annotations

import inspect
import itertools
import threading
from functools import cache
from typing import Any, cast

import torch
from haystack import logging

logger = logging.getLogger(__name__)

#: The name registered with transformers' `AttentionInterface` ("flash" makes the vision attention pass the
#: segment boundaries; the kernel is PyTorch's flash varlen kernel on CUDA, grouped SDPA elsewhere).
VARLEN_ATTENTION = "multimodal_rag_flash_varlen"

_REGISTER_LOCK = threading.Lock()
_REGISTERED = False
_TORCH_VARLEN_BROKEN = False


@cache
def _torch_varlen_attn() -> Any:
    """PyTorch's flash varlen attention function, or `None` when this PyTorch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """
    Attention within each segment of packed `(total, heads, dim)` tensors: one SDPA call per distinct segment length.

    Segments of equal length (the full windows of a page; the pages of a batch rendered at one size) are stacked
    into one batch and attended without a mask, so a layer costs a handful of calls (a masked, padded batch is
    2-4x slower on a CPU, where SDPA falls back to its unfused path for masks).

    :returns: `(total, heads, dim)`, segment by segment in the packed order.
    """
    bounds = cu_seqlens.tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    if len(by_length) == 1 and len(next(iter(by_length.values()))) == 1:  # one segment: plain attention
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), scale=scale
        )
        return out.transpose(0, 1)
    out = torch.empty_like(query)
    for length, starts in by_length.items():
        rows = (torch.tensor(starts)[:, None] + torch.arange(length)[None, :]).to(query.device)  # (n, length)

        def gather(x: torch.Tensor, rows: torch.Tensor = rows) -> torch.Tensor:
            return x[rows].permute(0, 2, 1, 3)  # (n, heads, length, dim)

        attended = torch.nn.functional.scaled_dot_product_attention(
            gather(query), gather(key), gather(value), scale=scale
        )
        out[rows.reshape(-1)] = attended.permute(0, 2, 1, 3).reshape(-1, *query.shape[1:])
    return out


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """
    transformers attention-interface function: attention within the segments `cu_seq_lens_q` delimits.

    :param module: The calling attention module.
    :param query: `(1, heads, total, dim)`.
    :param key: `(1, heads, total, dim)`.
    :param value: `(1, heads, total, dim)`.
    :param attention_mask: Must be `None` with segment boundaries (the vision towers pass none).
    :param scaling: Softmax scale.
    :param dropout: Must be 0 (inference only).
    :param kwargs: `cu_seq_lens_q`/`cu_seq_lens_k` (equal) and `max_length_q`; without them, plain SDPA.
    :returns: `((1, total, heads, dim), None)`, the layout transformers' attention functions return.
    """
    global _TORCH_VARLEN_BROKEN
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or attention_mask is not None or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, heads, dim)
    fast = _torch_varlen_attn()
    if fast is not None and not _TORCH_VARLEN_BROKEN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        max_length = kwargs.get("max_length_q")
        if max_length is None:
            max_length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu = cu_seqlens.to(torch.int32)
        try:
            out = fast(
                q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, int(max_length), int(max_length), scale=scaling
            )
            return out.unsqueeze(0), None
        except (RuntimeError, NotImplementedError, TypeError) as e:
            _TORCH_VARLEN_BROKEN = True
            logger.warning(
                "PyTorch's flash varlen attention failed ({error}); the vision tower uses grouped SDPA instead",
                error=f"{type(e).__name__}: {e}",
            )
    return _grouped_attention(q, k, v, cu_seqlens, scaling).unsqueeze(0), None


def _register() -> None:
    global _REGISTERED
    with _REGISTER_LOCK:
        if not _REGISTERED:
            from transformers import AttentionInterface

            AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
            _REGISTERED = True


@cache
def _follows_boundary_protocol(module_class: Any) -> bool:
    """Whether a vision attention class passes `cu_seq_lens_q` to the attention function when flash is requested."""
    try:
        source = inspect.getsource(module_class.forward)
    except (OSError, TypeError):
        return False
    return "is_flash_attention_requested" in source and "cu_seq_lens_q" in source and "cu_seqlens" in source


def _vision_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    # Qwen2-VL's is `VisionAttention`, Qwen2.5-VL's `Qwen2_5_VLVisionAttention`, Qwen3-VL's `Qwen3VLVisionAttention`.
    return [m for m in model.modules() if type(m).__name__.endswith("VisionAttention")]


def use_varlen_vision_attention(model: torch.nn.Module, *, device: str, requested: str | None) -> bool:
    """
    On CUDA, switch a loaded model's Qwen-VL vision tower to `VARLEN_ATTENTION` (the language model is untouched).

    Only on CUDA: there the per-window calls leave the GPU waiting on the host. On a CPU the attention work itself
    dominates and transformers' per-window calls are as fast as any batching of them (measured: 12 ms for 48
    windows vs 26 ms stacked, 2-vCPU Xeon), so nothing changes there.

    :param model: A loaded transformers model (any architecture; others are left alone).
    :param device: The device the model runs on.
    :param requested: The `attn_implementation` the user asked for in `model_kwargs`, if any: then nothing changes.
    :returns: Whether the tower was switched.
    """
    if requested is not None or not device.startswith("cuda"):
        return False
    return switch_vision_attention(model)


def switch_vision_attention(model: torch.nn.Module) -> bool:
    """
    Switch the model's Qwen-VL vision attention from SDPA to `VARLEN_ATTENTION`, whatever the device.

    :param model: A loaded transformers model.
    :returns: Whether it was switched (`False` for other architectures and for towers not on SDPA).
    """
    modules = _vision_attention_modules(model)
    if not modules or not all(_follows_boundary_protocol(cast(Any, type(m))) for m in modules):
        return False
    configs: dict[int, Any] = {id(m.config): m.config for m in modules if getattr(m, "config", None) is not None}
    if len(configs) == 0 or any(getattr(c, "_attn_implementation", None) != "sdpa" for c in configs.values()):
        return False  # eager or flash-attention already chosen: leave it
    _register()
    for config in configs.values():
        config._attn_implementation = VARLEN_ATTENTION
    return True
