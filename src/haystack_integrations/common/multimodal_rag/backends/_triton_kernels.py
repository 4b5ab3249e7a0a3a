"""Triton kernels of `fused_ops` (imported only there, only for CUDA tensors: importing this module needs Triton).

Every floating-point step is spelled out with libdevice's round-to-nearest functions (`mul_rn`, `add_rn`,
`div_rn`, `exp`), which the compiler may not contract into FMAs or replace by approximations: each kernel rounds
where PyTorch's eager kernels round, so its results are those of transformers' eager code.
"""

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_GELU_BLOCK = 4096


def _on(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Triton launches on the current CUDA device's current stream: make it the tensors' device (a model on
    cuda:1 must not run its kernels on cuda:0). Off CUDA (Triton's interpreter, in tests) nothing changes."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _quick_gelu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # noqa: N803
    # transformers' QuickGELUActivation: x * torch.sigmoid(1.702 * x), three eager kernels. Each computes in
    # float32 and rounds its result to the tensor dtype; torch's sigmoid is 1 / (1 + exp(-t)) in float32.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    t = libdevice.mul_rn(x, 1.702).to(out_ptr.dtype.element_ty).to(tl.float32)
    s = libdevice.div_rn(1.0, libdevice.add_rn(1.0, libdevice.exp(-t)))
    s = s.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offsets, libdevice.mul_rn(x, s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(  # type: ignore[no-untyped-def]
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    total,
    heads,
    stride_token,
    stride_part,
    stride_head,
    stride_cos,
    stride_sin,
    DIM: tl.constexpr,  # noqa: N803
    HALF: tl.constexpr,  # noqa: N803
    BLOCK_H: tl.constexpr,  # noqa: N803
    BLOCK_D: tl.constexpr,  # noqa: N803
):
    # One token's q (part 0) or k (part 1), all heads: out = x * cos + rotate_half(x) * sin in float32 (two
    # rounded products, one rounded sum), rounded once to the output dtype; rotate_half(x) = cat(-x2, x1).
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    head = tl.arange(0, BLOCK_H)[:, None]
    dim = tl.arange(0, BLOCK_D)[None, :]
    mask = (head < heads) & (dim < DIM)
    row = qkv_ptr + token * stride_token + part * stride_part + head * stride_head
    x = tl.load(row + dim, mask=mask).to(tl.float32)
    first = dim < HALF
    partner = tl.load(row + tl.where(first, dim + HALF, dim - HALF), mask=mask).to(tl.float32)
    rotated = tl.where(first, -partner, partner)
    c = tl.load(cos_ptr + token * stride_cos + dim, mask=dim < DIM).to(tl.float32)
    s = tl.load(sin_ptr + token * stride_sin + dim, mask=dim < DIM).to(tl.float32)
    result = libdevice.add_rn(libdevice.mul_rn(x, c), libdevice.mul_rn(rotated, s))
    out = out_ptr + part * total * heads * DIM + token * heads * DIM + head * DIM + dim
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=mask)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """QuickGELU of a CUDA tensor in one kernel (any shape; a new contiguous tensor of x's dtype)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    with _on(x.device):
        _quick_gelu_kernel[(triton.cdiv(n, _GELU_BLOCK),)](x, out, n, BLOCK=_GELU_BLOCK, num_warps=8)
    return out


def rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """
    The Qwen-VL vision rotary embedding of q and k in one kernel.

    :param qkv: `(total, 3, heads, dim)` CUDA tensor whose last dimension is contiguous.
    :param cos: `(total, dim)`.
    :param sin: `(total, dim)`.
    :returns: `(2, total, heads, dim)` in qkv's dtype, contiguous.
    """
    total, _, heads, dim = qkv.shape
    if dim % 2 or cos.shape != (total, dim) or sin.shape != (total, dim):
        msg = f"rotary: unexpected shapes qkv={tuple(qkv.shape)} cos={tuple(cos.shape)} sin={tuple(sin.shape)}"
        raise ValueError(msg)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    out = torch.empty((2, total, heads, dim), dtype=qkv.dtype, device=qkv.device)
    if total:
        with _on(qkv.device):
            _rotary_kernel[(total, 2)](
                qkv,
                cos,
                sin,
                out,
                total,
                heads,
                qkv.stride(0),
                qkv.stride(1),
                qkv.stride(2),
                cos.stride(0),
                sin.stride(0),
                DIM=dim,
                HALF=dim // 2,
                BLOCK_H=triton.next_power_of_2(heads),
                BLOCK_D=triton.next_power_of_2(dim),
                num_warps=4,
            )
    return out
