"""Fused GLU activations for training: one Triton pass forward, one backward, on the fused fc1 output.

``h = [gate ‖ up]`` (last dim ``2F``, megatron's ``linear_fc1`` layout) → ``y [.., F]``::

    relu2glu   y = u · relu(g)²          dg = [g > 0] · (dy·u)·2·relu(g),  du = dy · relu(g)²
    drelu      y = relu(g) · relu(u)      dg = [g > 0] · dy·relu(u),        du = [u > 0] · dy·relu(g)
    swiglu     y = silu(g) · u            dg = dy·u · σ(g)(1 + g(1 − σ(g))),  du = dy · silu(g)

The eager path (:func:`qsparse_dist.ops.glu_activation`) launches 3 kernels forward and ~6 backward
on the two *strided* halves of ``h``; here every element of ``h`` is read once forward and ``h`` and
``dy`` once backward.  Rounding follows the eager ops step by step: each intermediate that eager
autograd materializes in ``h``'s dtype (``relu(g)²``, ``dy·u``, ...) is rounded to that dtype here
too (products of two bf16 values are exact in float32, so one rounding each gives the eager bits).
ReLU²GLU and dReLU are therefore bit-identical to the eager ops forward and backward (bf16 and fp32);
SwiGLU differs only by the exponential's last bit (Triton's ``exp`` vs CUDA's ``expf``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .topk import _round_f32_to_bf16

__all__ = ["FUSED_GLU_ACTIVATIONS", "fused_glu"]

FUSED_GLU_ACTIVATIONS = {"relu2glu": 0, "drelu": 1, "swiglu": 2}

_BLOCK = 2048


@triton.jit
def _rnd(v, OUT_KIND: tl.constexpr):
    """Round float32 ``v`` to the tensor dtype and back (0 = fp32: identity, 1 = bf16, 2 = fp16)."""
    if OUT_KIND == 1:
        v = _round_f32_to_bf16(v)
    elif OUT_KIND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _load_halves(h_ptr, N, F, BLOCK: tl.constexpr):
    """This program's output offsets ``offs`` ([rows, F] flattened), their mask, the matching gate
    offsets ``src`` in ``h = [gate ‖ up]`` ([rows, 2F]; up is at ``src + F``) and both halves there,
    in float32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    row = offs // F
    src = row * (2 * F) + (offs - row * F)
    g = tl.load(h_ptr + src, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + src + F, mask=m, other=0.0).to(tl.float32)
    return offs, m, src, g, u


@triton.jit
def _glu_fwd_kernel(h_ptr, y_ptr, N, F, ACT: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs, m, src, g, u = _load_halves(h_ptr, N, F, BLOCK)
    if ACT == 0:
        r = tl.maximum(g, 0.0)
        y = u * _rnd(r * r, OUT_KIND)
    elif ACT == 1:
        y = tl.maximum(g, 0.0) * tl.maximum(u, 0.0)
    else:
        y = u * _rnd(g / (1.0 + tl.exp(-g)), OUT_KIND)
    tl.store(y_ptr + offs, _rnd(y, OUT_KIND).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _glu_bwd_kernel(h_ptr, dy_ptr, dh_ptr, N, F, ACT: tl.constexpr, OUT_KIND: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs, m, src, g, u = _load_halves(h_ptr, N, F, BLOCK)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if ACT == 0:
        r = tl.maximum(g, 0.0)
        du = dy * _rnd(r * r, OUT_KIND)
        dg = tl.where(r > 0.0, _rnd(dy * u, OUT_KIND) * (2.0 * r), 0.0)
    elif ACT == 1:
        rg = tl.maximum(g, 0.0)
        ru = tl.maximum(u, 0.0)
        dg = tl.where(rg > 0.0, dy * ru, 0.0)
        du = tl.where(ru > 0.0, dy * rg, 0.0)
    else:
        sig = 1.0 / (1.0 + tl.exp(-g))
        du = dy * _rnd(g * sig, OUT_KIND)
        dg = _rnd(dy * u, OUT_KIND) * (sig * (1.0 + g * (1.0 - sig)))
    tl.store(dh_ptr + src, _rnd(dg, OUT_KIND).to(dh_ptr.dtype.element_ty), mask=m)
    tl.store(dh_ptr + src + F, _rnd(du, OUT_KIND).to(dh_ptr.dtype.element_ty), mask=m)


_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class _FusedGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, act: int) -> torch.Tensor:
        h = h.contiguous()
        f = h.shape[-1] // 2
        y = torch.empty(*h.shape[:-1], f, dtype=h.dtype, device=h.device)
        n = y.numel()
        if n:
            _glu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](h, y, n, f, ACT=act, OUT_KIND=_OUT_KIND[h.dtype],
                                                      BLOCK=_BLOCK, num_warps=8)
        ctx.save_for_backward(h)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (h,) = ctx.saved_tensors
        dy = dy.contiguous()
        dh = torch.empty_like(h)
        n = dy.numel()
        if n:
            _glu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](h, dy, dh, n, h.shape[-1] // 2, ACT=ctx.act,
                                                      OUT_KIND=_OUT_KIND[h.dtype], BLOCK=_BLOCK, num_warps=8)
        return dh, None


def fused_glu(h: torch.Tensor, name: str) -> torch.Tensor:
    """``glu_activation(name)(h)`` in one fused Triton pass (forward and backward)."""
    if name not in FUSED_GLU_ACTIVATIONS:
        raise ValueError(f"ffn_activation must be one of {sorted(FUSED_GLU_ACTIVATIONS)}, got {name!r}")
    if h.shape[-1] % 2:
        raise ValueError(f"fused gate/up dim must be even, got {h.shape[-1]}")
    if h.dtype not in _OUT_KIND:
        raise ValueError(f"fused_glu supports float32/bfloat16/float16, got {h.dtype}")
    return _FusedGLU.apply(h, FUSED_GLU_ACTIVATIONS[name])
