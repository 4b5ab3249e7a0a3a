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
- Only on CUDA, for inference (with autograd recording, the eager code runs), and only in switched (varlen)
  Qwen-VL towers (`attention.switch_vision_attention`): the rotary kernel where the lean attention forward was
  kept, QuickGELU in every Qwen2-VL vision MLP of such a tower. Built once per process, device and dtype when the
  model is loaded (`prepare`), so no query waits for the Triton compiler.
- Checked when built: on probes of random values at the model's own widths (both cases of the Triton compiler's
  multiple-of-16 specialisation), the kernel's output must equal the eager code's bit for bit. Otherwise, or
  when Triton is missing or cannot build (it needs a C compiler the first time), the eager code runs, after one
  warning.
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
#: "name:device:dtype" -> kernel launcher, or None once building or the check failed (eager from then on).
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


#: Probe widths when the model's are not known (a kernel first needed at call time, not at load).
_DEFAULT_WIDTHS: dict[str, tuple[Any, ...]] = {"rotary": ((2, 16),), "quick_gelu": (40,)}


def _probes(name: str, device: torch.device, dtype: torch.dtype, widths: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Random inputs for `name` at each width: `(heads, dim)` for "rotary", the last dimension for "quick_gelu";
    96 and 97 rows each (a multiple of 16 and not: the Triton compiler specialises on it)."""
    generator = torch.Generator().manual_seed(0)
    probes: list[tuple[Any, ...]] = []
    for width in widths:
        for rows in (96, 97):
            if name == "rotary":
                heads, dim = width
                angles = 30 * torch.randn(rows, dim // 2, generator=generator).repeat(1, 2)
                qkv = 3 * torch.randn(rows, 3, heads, dim, generator=generator)
                probes.append((qkv.to(device, dtype), angles.cos().to(device), angles.sin().to(device)))
            else:
                probes.append(((4 * torch.randn(rows, width, generator=generator)).to(device, dtype),))
    return probes


def _build(name: str) -> Callable[..., torch.Tensor]:
    """The Triton launcher of `name` (imports Triton: raises ImportError without it)."""
    from haystack_integrations.common.multimodal_rag.backends import _triton_kernels

    return cast(Callable[..., torch.Tensor], getattr(_triton_kernels, name))


def fused(
    name: str, device: torch.device, dtype: torch.dtype, widths: tuple[Any, ...] = ()
) -> Callable[..., torch.Tensor] | None:
    """
    The one-kernel `name` function ("rotary" or "quick_gelu") for `dtype` on a CUDA `device`, built and checked
    (at `widths`, see `_probes`) on first use; `None` when it cannot be used (then the caller runs its eager code).
    """
    key = f"{name}:{device}:{dtype}"
    if key in _FUSED:  # the per-call path: no lock
        return _FUSED[key]
    with _LOCK:
        if key in _FUSED:
            return _FUSED[key]
        eager = _FUNCTIONS[name]
        kernel: Callable[..., torch.Tensor] | None = None
        try:
            candidate = _build(name)
            with torch.inference_mode():
                same = all(
                    torch.equal(candidate(*args), eager(*args))
                    for args in _probes(name, device, dtype, widths or _DEFAULT_WIDTHS[name])
                )
            if same:
                kernel = candidate
            else:
                logger.warning(
                    "The fused vision-tower kernel '{kernel}' ({dtype} on {device}) does not give the eager code's "
                    "results bit for bit; the eager code is used",
                    kernel=name,
                    dtype=str(dtype),
                    device=str(device),
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


def usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels may be used for `x`: a CUDA tensor, under `no_grad`/`inference_mode` (the kernels
    record no autograd graph; the package's components always run so)."""
    return x.is_cuda and not torch.is_grad_enabled()


class FusedQuickGELU(torch.nn.Module):
    """QuickGELU in one kernel on CUDA (`fused("quick_gelu")`), transformers' arithmetic elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = fused("quick_gelu", x.device, x.dtype) if usable(x) else None
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


def _lean(module: torch.nn.Module) -> bool:
    """Whether `module` runs `attention._lean_forward` (an instance forward bound to it)."""
    return getattr(vars(module).get("forward"), "__name__", None) == "_lean_forward"


_Widths = dict[tuple[str, torch.device, torch.dtype], set[Any]]


def kernel_widths(model: torch.nn.Module, *, cuda_only: bool = True) -> _Widths:
    """
    The fused kernels `model` will call, as `{(name, device, dtype): widths}`: the MLP widths of its
    `FusedQuickGELU`s, the `(heads, dim)` of its lean vision attentions (on CUDA only, unless `cuda_only=False`).
    """
    found: _Widths = {}
    for module in model.modules():
        any_module: Any = module
        if isinstance(getattr(any_module, "act", None), FusedQuickGELU) and isinstance(
            getattr(any_module, "fc1", None), torch.nn.Linear
        ):
            weight = any_module.fc1.weight
            if weight.is_cuda or not cuda_only:
                found.setdefault(("quick_gelu", weight.device, weight.dtype), set()).add(any_module.fc1.out_features)
        if _lean(module):
            weight = any_module.qkv.weight
            heads = int(any_module.num_heads)
            if weight.is_cuda or not cuda_only:
                key = ("rotary", weight.device, weight.dtype)
                found.setdefault(key, set()).add((heads, any_module.qkv.in_features // heads))
    return found


def prepare(model: torch.nn.Module) -> None:
    """
    Build and check the fused kernels a loaded CUDA model will use, at its own widths, devices and dtypes, so that
    its first query does not wait for the Triton compiler.
    """
    for (name, device, dtype), widths in kernel_widths(model).items():
        fused(name, device, dtype, tuple(sorted(widths)))
