"""The elementwise work of the Qwen-VL vision towers in one Triton kernel each, on CUDA.

On the H100 profile of issue 15 (Qwen2-VL-2B-shaped `VisionLanguageRanker`, 80 candidates), the vision tower's
elementwise work took a third of the GPU time: the float32 rotary embedding of q and k (1.95 ms per layer per 16
images in transformers' code, 1.41 ms in `attention.rotate_query_and_key`'s 6 kernels, which run on PyTorch's
strided path) and QuickGELU (`x * sigmoid(1.702 * x)`: 3 kernels, 0.76 ms over the 5120-wide MLP activations).
Each is a few operations per element, so one kernel that reads its inputs once and writes its output once is
several times faster: 0.18 ms and 0.26 ms (`_triton_kernels.py`; H100, 31,104 tokens, same run), with no value
different from transformers' in 79.6 and 159 million. `torch.compile` was measured too: 0.85 ms and 0.29-0.40 ms,
and its QuickGELU keeps float32 intermediates, so 40% of its outputs differ from transformers' by a rounding.

- The kernels round where PyTorch's eager kernels round (libdevice's round-to-nearest operations, no FMA
  contraction): their results are transformers' results.
- Only on CUDA, and only for the switched (varlen) Qwen-VL towers (`attention.switch_vision_attention`): the
  same conditions as the lean attention forward. Built once per process and dtype when the model is loaded
  (`prepare`), so no query waits for the Triton compiler.
- Checked when built: on a probe, the kernel must agree with the eager code within one rounding of the output
  dtype. Otherwise, or when Triton is missing or cannot build (it needs a C compiler the first time), the eager
  code runs, after one warning.
- `model_kwargs={"attn_implementation": "sdpa"}` keeps transformers' whole vision attention path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

import torch
from haystack import logging

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
#: name:dtype -> kernel launcher, or None once building or the check failed (eager from then on).
_FUSED: dict[str, Callable[..., torch.Tensor] | None] = {}


def rotary_math(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """
    transformers' `apply_rotary_pos_emb_vision` on the q and k of a fused projection (the eager reference).

    :param qkv: `(total, 3, heads, dim)`.
    :param cos: `(total, dim)`.
    :param sin: `(total, dim)`.
    :returns: `(2, total, heads, dim)` in qkv's dtype: rotated q, then rotated k (each contiguous).
    """
    pair = qkv[:, :2].float()
    half = pair.shape[-1] // 2
    rotated = torch.cat((-pair[..., half:], pair[..., :half]), dim=-1)
    c = cos.float()[:, None, None, :]
    s = sin.float()[:, None, None, :]
    return (pair * c + rotated * s).to(qkv.dtype).permute(1, 0, 2, 3).contiguous()


def quick_gelu_math(x: torch.Tensor) -> torch.Tensor:
    """transformers' `QuickGELUActivation` (`x * sigmoid(1.702 * x)`; the eager reference)."""
    return x * torch.sigmoid(1.702 * x)


_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"rotary": rotary_math, "quick_gelu": quick_gelu_math}


def _probe(name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    if name == "rotary":
        angles = 30 * torch.randn(97, 8, generator=generator).repeat(1, 2)
        qkv = 3 * torch.randn(97, 3, 2, 16, generator=generator)
        return qkv.to(device, dtype), angles.cos().to(device), angles.sin().to(device)
    return ((4 * torch.randn(97, 40, generator=generator)).to(device, dtype),)


def _within_one_rounding(fused: torch.Tensor, eager: torch.Tensor) -> bool:
    if fused.shape != eager.shape or fused.dtype != eager.dtype:
        return False
    eps = torch.finfo(eager.dtype).eps
    return bool(torch.allclose(fused.float(), eager.float(), rtol=eps, atol=eps))


def _build(name: str) -> Callable[..., torch.Tensor]:
    """The Triton launcher of `name` (imports Triton: raises ImportError without it)."""
    from haystack_integrations.common.multimodal_rag.backends import _triton_kernels

    return cast(Callable[..., torch.Tensor], getattr(_triton_kernels, name))


def fused(name: str, device: torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor] | None:
    """
    The one-kernel `name` function ("rotary" or "quick_gelu") for `dtype` on a CUDA `device`, built and checked
    on first use; `None` when it cannot be used (then the caller runs its eager code).
    """
    key = f"{name}:{dtype}"
    if key in _FUSED:  # the per-call path: no lock
        return _FUSED[key]
    with _LOCK:
        if key in _FUSED:
            return _FUSED[key]
        eager = _FUNCTIONS[name]
        kernel: Callable[..., torch.Tensor] | None = None
        try:
            candidate = _build(name)
            args = _probe(name, device, dtype)
            with torch.inference_mode():
                ok = _within_one_rounding(candidate(*args), eager(*args))
            if ok:
                kernel = candidate
            else:
                logger.warning(
                    "The fused vision-tower kernel '{kernel}' ({dtype}) differs from the eager code by more than "
                    "one rounding; the eager code is used",
                    kernel=name,
                    dtype=str(dtype),
                )
        except Exception as e:  # no Triton, no C compiler, an unsupported GPU: eager it is
            logger.warning(
                "The vision tower's fused '{kernel}' kernel could not be built ({error}); the eager code is used "
                "(the same results, slower on the GPU)",
                kernel=name,
                error=f"{type(e).__name__}: {str(e)[:300]}",
            )
        _FUSED[key] = kernel
        return kernel


class FusedQuickGELU(torch.nn.Module):
    """QuickGELU in one kernel on CUDA (`fused("quick_gelu")`), transformers' arithmetic elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = fused("quick_gelu", x.device, x.dtype) if x.is_cuda else None
        return kernel(x) if kernel is not None else quick_gelu_math(x)


def fuse_activations(model: torch.nn.Module) -> int:
    """
    Replace the QuickGELU activations of `model`'s Qwen-VL vision MLPs (Qwen2-VL's `VisionMlp.act`) with
    `FusedQuickGELU`; other activations stay.

    :returns: How many were replaced.
    """
    replaced = 0
    for module in model.modules():
        act = getattr(module, "act", None)
        if type(module).__name__ == "VisionMlp" and type(act).__name__ == "QuickGELUActivation":
            module.act = FusedQuickGELU()
            replaced += 1
    return replaced


def prepare(model: torch.nn.Module) -> None:
    """
    Build (and check) the fused kernels a loaded CUDA model will use, and run each once at the model's own widths,
    so that its first query does not wait for the Triton compiler (which specialises on widths and on whether a
    size is a multiple of 16: both cases are run).
    """
    parameter = next(model.parameters(), None)
    if parameter is None or not parameter.is_cuda:
        return
    device, dtype = parameter.device, parameter.dtype
    modules: list[Any] = list(model.modules())
    widths = {int(m.fc1.out_features) for m in modules if isinstance(getattr(m, "act", None), FusedQuickGELU)}
    lean = [m for m in modules if "forward" in vars(m) and type(m).__name__.endswith("VisionAttention")]
    shapes = {(int(m.num_heads), int(m.qkv.in_features) // int(m.num_heads)) for m in lean}
    gelu = fused("quick_gelu", device, dtype) if widths else None
    rotary = fused("rotary", device, dtype) if shapes else None
    with torch.inference_mode():
        for width in widths:
            if gelu is not None:
                gelu(torch.zeros(3, width, device=device, dtype=dtype))
        for heads, dim in shapes:
            for total in (96, 97):
                angles = torch.zeros(total, dim, device=device)
                if rotary is not None:
                    rotary(torch.zeros(total, 3, heads, dim, device=device, dtype=dtype), angles, angles)


def reset_for_tests() -> dict[str, Any]:
    """Forget every built kernel (tests); returns what was known."""
    with _LOCK:
        known = dict(_FUSED)
        _FUSED.clear()
    return known
