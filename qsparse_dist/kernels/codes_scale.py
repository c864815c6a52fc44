"""BitNet's integer-code product in training, around the matmul: the input codes with the top-K in
one pass (:func:`topk_codes_triton`) and the per-token scaling, one pass each way.

A BitNet linear computes ``y = (X_q · W_qᵀ) · (s_x · s_w)`` (:func:`qsparse_dist.ops.linear.scale_codes_product`):
in torch that is a float32 product of the whole ``[tokens, out]`` matmul output followed by a cast,
``(y_int * (s_x * s_w)).to(dtype)`` — read 2 bytes, write 4, read 4, write 2 per element, and the
same again in the backward (``grad.float() * c`` then the cast to ``y_int``'s dtype).  Here both
directions are one kernel that reads and writes the 16-bit tensors once, with the same float32
arithmetic (so bit-identical results):

    forward   out[r, n]  = RN_dtype( float(y[r, n]) × c[r] ),   c[r] = s_x[r] × s_w   (float32)
    backward  dy[r, n]   = RN_dtype( float(g[r, n]) × c[r] )

and the straight-through backward of the input codes, ``∂X_q/∂x = 1/s_x``:

    dx[r, n] = RN_dtype( float(g[r, n]) / s_x[r] )      (IEEE division, as torch's)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .topk import _rows_view, _to_dtype, topk_rows

__all__ = ["scale_rows", "scale_codes_product_triton", "topk_codes_triton"]

_BLOCK_N = 2048


@triton.jit
def _scale_rows_kernel(y_ptr, out_ptr, sx_ptr, sw_ptr, N, HAS_SW: tl.constexpr, DIVIDE: tl.constexpr,
                       IS_BF16: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = cols < N
    offs = row.to(tl.int64) * N + cols
    v = tl.load(y_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    c = tl.load(sx_ptr + row)
    if HAS_SW:
        c = c * tl.load(sw_ptr)
    if DIVIDE:
        r = tl.math.div_rn(v, tl.zeros_like(v) + c)
    else:
        r = v * c
    tl.store(out_ptr + offs, _to_dtype(r, out_ptr.dtype.element_ty, IS_BF16), mask=inb)


def scale_rows(y: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor | None = None, *,
               divide: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``RN_dtype(float(y) × (s_x · s_w))`` (or ``÷ s_x`` with ``divide``) per row; ``y`` ``[..., N]``,
    ``s_x`` float32 with one value per row of ``y`` (``[..., 1]``), ``s_w`` a 0-dim float32."""
    dtype = dtype or y.dtype
    y2d = y.contiguous().reshape(-1, y.shape[-1])
    sx = s_x.contiguous().reshape(-1)
    if sx.dtype != torch.float32 or sx.numel() != y2d.shape[0]:
        raise ValueError(f"s_x must be float32 with one value per row ({y2d.shape[0]}), got {sx.dtype} {tuple(s_x.shape)}")
    out = torch.empty(y.shape, dtype=dtype, device=y.device)
    r, n = y2d.shape
    if r and n:
        _scale_rows_kernel[(r, triton.cdiv(n, _BLOCK_N))](
            y2d, out, sx, s_w if s_w is not None else sx, n, HAS_SW=s_w is not None, DIVIDE=divide,
            IS_BF16=dtype == torch.bfloat16, BLOCK_N=_BLOCK_N, num_warps=8)
    return out


class _ScaleCodesProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_int, s_x, s_w, dtype):
        ctx.save_for_backward(s_x, s_w)
        ctx.in_dtype = y_int.dtype
        return scale_rows(y_int, s_x, s_w, dtype=dtype)

    @staticmethod
    def backward(ctx, grad):
        s_x, s_w = ctx.saved_tensors
        return scale_rows(grad, s_x, s_w, dtype=ctx.in_dtype), None, None, None


def scale_codes_product_triton(y_int: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor,
                               dtype: torch.dtype) -> torch.Tensor:
    """``(y_int * (s_x * s_w)).to(dtype)`` with its gradient to ``y_int``, bit for bit, in one pass
    each way (``s_x``, ``s_w`` carry no gradient: the codes' scales are detached)."""
    return _ScaleCodesProduct.apply(y_int, s_x, s_w, dtype)


class _TopKCodesSTE(torch.autograd.Function):
    """Forward: top-K (or N:M) and BitNet's per-token int8 codes in one pass.  Backward: the
    straight-through gradient of ``int8_codes_ste(topk_sparsify(x))``: ``(grad / s_x)`` in ``x``'s
    dtype, masked when ``ste=False``."""

    @staticmethod
    def forward(ctx, x, sparsity, block_size, ste):
        x2d, k = _rows_view(x, sparsity, block_size)
        absmax, rows_per_token = None, 1
        if block_size is not None:  # absmax per token; the row max is always kept
            absmax = x.detach().abs().amax(dim=-1).reshape(-1).float()
            rows_per_token = x.shape[-1] // block_size
        res = topk_rows(x2d, k, write_y=True, write_mask=not ste, quant=3, absmax=absmax,
                        rows_per_token=rows_per_token)
        scale = res["scale"][::rows_per_token].reshape(*x.shape[:-1], 1)
        ctx.ste, ctx.dtype = ste, x.dtype
        ctx.save_for_backward(scale, *(() if ste else (res["mask"].reshape(x.shape),)))
        ctx.mark_non_differentiable(scale)
        return res["y"].reshape(x.shape), scale

    @staticmethod
    def backward(ctx, grad, _grad_scale):
        scale, *mask = ctx.saved_tensors
        if grad.dtype in (torch.bfloat16, torch.float32) and ctx.dtype in (torch.bfloat16, torch.float32):
            g = scale_rows(grad, scale, divide=True, dtype=ctx.dtype)  # (grad / s_x).to(dtype) in one pass
        else:
            g = (grad / scale).to(ctx.dtype)
        if not ctx.ste:
            g = g * mask[0]
        return g, None, None, None


def topk_codes_triton(
    x: torch.Tensor, sparsity: float, *, block_size: int | None = None, ste: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X_q, s_x)`` of BitNet + Q-Sparse in one pass: the same values and gradients as
    ``int8_codes_ste(topk_sparsify(x, sparsity, block_size=block_size, ste=ste))`` — codes as floats
    of :func:`~qsparse_dist.ops.quant.code_dtype` (gradient ``1/s_x``), float32 scale ``[..., 1]``."""
    return _TopKCodesSTE.apply(x, sparsity, block_size, ste)
