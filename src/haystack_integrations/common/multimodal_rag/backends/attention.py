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

Switched towers also get a leaner attention forward (`_lean_forward`): transformers' `apply_rotary_pos_emb_vision`
copies q and k to float32, concatenates a rotated copy of each, multiplies and adds the full float32 tensors and
copies the results back (about 16 full-size elementwise kernels per layer, 42% of the Qwen2-VL ranker's GPU time
with the other elementwise work, issue 15's profile). The lean forward rotates q and k together, straight from
the fused projection into one output: on CUDA in one Triton kernel (`fused_ops`, 1.95 -> 0.18 ms per layer of 16
Qwen2-VL candidates on an H100), elsewhere with the same float32 products and sums half by half
(`rotate_query_and_key`, 6 kernels); and it hands the segments to the varlen kernel without transposing. It is
kept only when a probe through the module's own forward gives bit-identical output (once per attention class and
config when switched; the probe runs where the model is at that point, the CPU in this package's loaders, and the
CUDA kernel has its own bit-for-bit check in `fused_ops`); otherwise transformers' forward stays. It steps aside
for training, autograd recording, or a tower switched to another attention implementation later.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import types
from functools import cache
from typing import Any, cast

import torch
from haystack import logging

from haystack_integrations.common.multimodal_rag.backends import fused_ops

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
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or attention_mask is not None or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, heads, dim)
    return _attend_segments(q, k, v, cu_seqlens, kwargs.get("max_length_q"), scaling).unsqueeze(0), None


def _attend_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int | torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Attention within each segment of packed `(total, heads, dim)` tensors; returns `(total, heads, dim)`."""
    global _TORCH_VARLEN_BROKEN
    fast = _torch_varlen_attn()
    if fast is not None and not _TORCH_VARLEN_BROKEN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if max_length is None:
            max_length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu = cu_seqlens.to(torch.int32)
        try:
            out = fast(
                q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, int(max_length), int(max_length), scale=scaling
            )
            return cast(torch.Tensor, out)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            _TORCH_VARLEN_BROKEN = True
            logger.warning(
                "PyTorch's flash varlen attention failed ({error}); the vision tower uses grouped SDPA instead",
                error=f"{type(e).__name__}: {e}",
            )
    return _grouped_attention(q, k, v, cu_seqlens, scaling)


def rotate_query_and_key(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """
    The rotary embedding of the Qwen-VL vision towers applied to q and k, computed as transformers computes it.

    transformers (`apply_rotary_pos_emb_vision`): `(q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype)`,
    with `rotate_half(x) = cat(-x2, x1)`. Half by half that is `x1 * c1 - x2 * s1` and `x2 * c2 + x1 * s2`: the
    same float32 products (a bfloat16 value times a float32 one is computed in float32), the same float32 sum
    (`a + (-b)` is `a - b` exactly), rounded once to the input dtype on store. Bit-identical, in 6 kernels.

    :param qkv: `(total, 3, heads, dim)`, the vision attention's fused projection (any strides).
    :param cos: `(total, dim)` cosines of the rotary angles.
    :param sin: `(total, dim)` sines.
    :returns: `(2, total, heads, dim)` in qkv's dtype: rotated q, then rotated k (each contiguous).
    """
    total, _, heads, dim = qkv.shape
    half = dim // 2
    pair = qkv[:, :2]  # (total, 2, heads, dim): q and k together
    out = torch.empty((2, total, heads, dim), dtype=qkv.dtype, device=qkv.device)
    target = out.permute(1, 0, 2, 3)
    c = cos.float()[:, None, None, :]
    s = sin.float()[:, None, None, :]
    x1, x2 = pair[..., :half], pair[..., half:]
    torch.sub(x1 * c[..., :half], x2 * s[..., :half], out=target[..., :half])
    torch.add(x2 * c[..., half:], x1 * s[..., half:], out=target[..., half:])
    return out


def _lean_forward(
    self: Any,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rotary_pos_emb: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """
    A Qwen-VL vision attention forward: fused rotary (`rotate_query_and_key`), then one varlen attention call.

    Other keyword arguments (colpali-engine passes `output_hidden_states`) are ignored, as they are on the way they
    take in transformers' forward: into the attention function, which for a switched tower is `varlen_attention`.
    """
    if (
        position_embeddings is None  # older transformers pass rotary_pos_emb: not what the probe checked
        or self.training
        or torch.is_grad_enabled()  # the half-by-half rotary writes into a preallocated output: no autograd
        or getattr(self.config, "_attn_implementation", None) != VARLEN_ATTENTION  # switched away since
    ):
        if rotary_pos_emb is not None:
            kwargs["rotary_pos_emb"] = rotary_pos_emb
        return cast(
            torch.Tensor,
            type(self).forward(
                self,
                hidden_states,
                cu_seqlens,
                position_embeddings=position_embeddings,
                max_seqlen=max_seqlen,
                **kwargs,
            ),
        )
    total = hidden_states.shape[0]
    qkv = self.qkv(hidden_states).view(total, 3, self.num_heads, -1)
    cos, sin = position_embeddings
    kernel = fused_ops.fused("rotary", qkv.device, qkv.dtype) if fused_ops.usable(qkv) else None
    q, k = (kernel or rotate_query_and_key)(qkv, cos, sin)
    out = _attend_segments(q, k, qkv[:, 2], cu_seqlens, max_seqlen, self.scaling)
    return cast(torch.Tensor, self.proj(out.reshape(total, -1)))


def _lean_forward_matches(module: torch.nn.Module) -> bool:
    """Whether `_lean_forward` gives bit-identical output to the module's own forward on a two-segment probe."""
    try:
        qkv = cast(torch.nn.Linear, module.qkv)
        heads = int(cast(Any, module).num_heads)
        width = qkv.in_features
        dim = width // heads
        generator = torch.Generator().manual_seed(0)
        lengths = [24, 40]
        total = sum(lengths)
        hidden = torch.randn(total, width, generator=generator).to(qkv.weight.device, qkv.weight.dtype)
        angles = torch.randn(total, dim // 2, generator=generator).repeat(1, 2).to(qkv.weight.device)
        embeddings = (angles.cos(), angles.sin())
        cu = torch.tensor([0, lengths[0], total], dtype=torch.int32, device=qkv.weight.device)
        with torch.inference_mode():
            reference = type(module).forward(module, hidden, cu_seqlens=cu, position_embeddings=embeddings)
            lean = _lean_forward(module, hidden, cu, position_embeddings=embeddings)
        if isinstance(reference, tuple):
            return False
        return bool(reference.shape == lean.shape and torch.equal(reference, lean))
    except Exception as e:  # any surprise means: keep transformers' forward
        logger.debug("The lean vision attention forward was not checked: {error}", error=e)
        return False


def use_lean_forward(modules: list[torch.nn.Module]) -> bool:
    """
    Give the switched vision attention modules `_lean_forward` when a probe proves it identical; else nothing.

    One probe per class and config (the towers of one model share both). Modules that already carry an instance
    `forward` (e.g. accelerate's device-map hooks) keep it, and then none is changed.
    """
    if not modules or any("forward" in vars(m) for m in modules):
        return False
    if not all(isinstance(getattr(m, "qkv", None), torch.nn.Linear) for m in modules):
        return False
    probed: dict[tuple[type, int], bool] = {}
    for module in modules:
        group = (type(module), id(getattr(module, "config", None)))
        if group not in probed:
            probed[group] = _lean_forward_matches(module)
    if not all(probed.values()):
        return False
    for module in modules:
        module.forward = types.MethodType(_lean_forward, module)
    return True


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
    use_lean_forward(modules)
    fused_ops.fuse_activations(model)
    return True
