"""The elementwise work of the Qwen-VL vision towers, fused into one kernel each by `torch.compile` on CUDA.

On the H100 profile of issue 15 (Qwen2-VL-2B-shaped `VisionLanguageRanker`, 80 candidates), the vision tower's
elementwise work took a third of the GPU time: the float32 rotary embedding of q and k (about 1.35 ms per layer
per 16 images even in `attention.rotate_query_and_key`'s 6 kernels, which run on PyTorch's strided path) and
QuickGELU (`x * sigmoid(1.702 * x)`: 3 kernels over the 5120-wide MLP activations). Each is a few bytes of
arithmetic per element, so one kernel that reads its inputs once and writes its output once is several times
faster. PyTorch has no such kernels; `torch.compile` (Inductor, Triton) generates them.

- Only on CUDA, and only for the switched (varlen) Qwen-VL towers (`attention.switch_vision_attention`): the
  same conditions as the lean attention forward. Compiled once per process and dtype, with dynamic shapes, when
  the model is loaded (`prepare`), so no query pays the compile time.
- Checked when compiled: the fused result must be within one rounding of the output dtype of the eager one on
  a probe (the rotary is the same float32 formula, but the compiler may contract a multiply and an add into one
  FMA; QuickGELU keeps its intermediates in float32 instead of rounding them to bfloat16). Otherwise, or when
  compiling fails (no C compiler, an old Triton), the eager path is kept, with one warning.
- `TORCHDYNAMO_DISABLE=1` (PyTorch's own switch) runs the same functions eagerly;
  `model_kwargs={"attn_implementation": "sdpa"}` keeps transformers' whole vision attention path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

import torch
from haystack import logging

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
#: name -> compiled function, or None once compiling or the check failed (eager from then on).
_COMPILED: dict[str, Callable[..., torch.Tensor] | None] = {}


def rotary_math(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """
    transformers' `apply_rotary_pos_emb_vision` on the q and k of a fused projection, written for the compiler.

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
    """transformers' `QuickGELUActivation` (`x * sigmoid(1.702 * x)`), written for the compiler."""
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


def compiled(name: str, device: torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor] | None:
    """
    The compiled `name` function ("rotary" or "quick_gelu") for `dtype` on a CUDA `device`, compiled and checked
    on first use; `None` when it cannot be used (then the caller runs its eager path).
    """
    key = f"{name}:{dtype}"
    if key in _COMPILED:  # the per-call path: no lock
        return _COMPILED[key]
    with _LOCK:
        if key in _COMPILED:
            return _COMPILED[key]
        eager = _FUNCTIONS[name]
        fused: Callable[..., torch.Tensor] | None = None
        try:
            candidate = cast(Callable[..., torch.Tensor], torch.compile(eager, dynamic=True, fullgraph=True))
            args = _probe(name, device, dtype)
            with torch.inference_mode():
                ok = _within_one_rounding(candidate(*args), eager(*args))
            if ok:
                fused = candidate
            else:
                logger.warning(
                    "The compiled vision-tower kernel '{kernel}' ({dtype}) differs from the eager one by more than "
                    "one rounding; the eager kernels are used",
                    kernel=name,
                    dtype=str(dtype),
                )
        except Exception as e:  # no C compiler, no Triton, an unsupported GPU: eager it is
            logger.warning(
                "torch.compile could not fuse the vision tower's '{kernel}' kernel ({error}); the eager kernels are "
                "used (correct, slower on the GPU)",
                kernel=name,
                error=f"{type(e).__name__}: {str(e)[:300]}",
            )
        _COMPILED[key] = fused
        return fused


class FusedQuickGELU(torch.nn.Module):
    """QuickGELU in one kernel on CUDA (`compiled("quick_gelu")`), transformers' arithmetic elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = compiled("quick_gelu", x.device, x.dtype) if x.is_cuda else None
        return fused(x) if fused is not None else quick_gelu_math(x)


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
    """Compile (and check) the fused kernels a loaded CUDA model will use, so that its first call does not wait."""
    parameter = next(model.parameters(), None)
    if parameter is None or not parameter.is_cuda:
        return
    if any(isinstance(m, FusedQuickGELU) for m in model.modules()):
        compiled("quick_gelu", parameter.device, parameter.dtype)
    if any("forward" in vars(m) and type(m).__name__.endswith("VisionAttention") for m in model.modules()):
        compiled("rotary", parameter.device, parameter.dtype)


def reset_for_tests() -> dict[str, Any]:
    """Forget every compiled kernel (tests); returns what was known."""
    with _LOCK:
        known = dict(_COMPILED)
        _COMPILED.clear()
    return known
