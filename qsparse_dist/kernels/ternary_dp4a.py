"""Batch-1 ternary GEMV with integer dot products: 4 weights per instruction instead of ~6 per weight.

Layout ("k4"): ``P [ceil(K/4), N]`` uint8, ``P[g, n]`` = the 2-bit codes ``c = w_q + 1`` of inputs
``4g..4g+3`` of output ``n`` (bits ``2i, 2i+1`` for input ``4g+i``), i.e. ``pack_ternary(W_q).T``:
the export's packed tensor transposed, no re-packing.  The int8 activation codes are read as 32-bit
words ``xw[g]`` (bytes = ``x_q[4g..4g+3]``).  For one byte ``b`` of codes::

    s = ((b * 0x1001) & 0x000F000F) * 0x41 & 0x03030303     # spread: byte i of s = code i (0..2)
    acc += dp4a(s, xw[g])                                   # Σ_i code_i · x_i  (one instruction)

(the two multiplies place disjoint copies, so no carries), and at the end
``y = s_w · s_x · (acc - Σ_k x_q[k])`` because ``w = code - 1``.  int32 accumulation is exact.
Per 4 weights: 1 byte load (vectorized along ``N``), 4 integer ops and one ``dp4a``, against ~6
instructions per weight of the float decoding in :mod:`.gemv`.  Under ``TRITON_INTERPRET=1`` (CPU
tests) the ``dp4a`` is computed with shifts and multiplies (inline PTX has no interpreter).
Top-K inputs (``bitnet_qsparse``) run the same kernel: a group of 4 features is skipped only when
all four are zero, so the bytes read do not shrink with sparsity (they are 1/8 of bf16 already).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gemv import GemvConfig, _num_sms

__all__ = ["pack_k4", "ternary_gemv_k4", "default_k4_config"]


def pack_k4(w_q_packed_rows: torch.Tensor) -> torch.Tensor:
    """``pack_ternary(W_q)`` ``[N, ceil(K/4)]`` (the export layout) -> kernel layout ``[ceil(K/4), N]``."""
    return w_q_packed_rows.t().contiguous()


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """``c + Σ_i ubyte_i(a) · sbyte_i(b)`` for int32 ``a`` (bytes 0..2), ``b`` (4 signed bytes)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        s = c
        for i in tl.static_range(4):
            s += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return s


@triton.jit
def _ternary_k4_kernel(
    xw_ptr, sx_ptr, p_ptr, sw_ptr, out_ptr,
    G, N, g_per_split,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr,
    SKIP_ZEROS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    g_start = pid_k * g_per_split
    g_end = tl.minimum(g_start + g_per_split, G)
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.int32)
    xs = tl.zeros([BLOCK_G], dtype=tl.int32)
    ones = tl.full([BLOCK_G], 0x01010101, tl.int32)
    for g0 in range(g_start, g_end, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        gm = g < g_end
        xw = tl.load(xw_ptr + g, mask=gm, other=0)
        rows = gm
        if SKIP_ZEROS:
            rows = rows & (xw != 0)
        b = tl.load(p_ptr + g[:, None] * N + n[None, :], mask=rows[:, None] & nmask[None, :], other=0).to(tl.int32)
        s = (((b * 0x1001) & 0x000F000F) * 0x41) & 0x03030303
        acc = _dp4a(s, xw[:, None] + tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.int32), acc, USE_ASM)
        xs = _dp4a(ones, xw, xs, USE_ASM)
    tot = tl.sum(acc, axis=0) - tl.sum(xs, axis=0)
    res = tot.to(tl.float32) * (tl.load(sw_ptr).to(tl.float32) * tl.load(sx_ptr).to(tl.float32))
    if ATOMIC:
        tl.atomic_add(out_ptr + n, res, mask=nmask)
    else:
        tl.store(out_ptr + n, res, mask=nmask)


def default_k4_config(k: int, n: int, device: torch.device) -> GemvConfig:
    """``block_k`` counts groups of 4 inputs; split-K to ~4 programs per SM."""
    block_n, block_g = 256, 16
    tiles = triton.cdiv(n, block_n)
    groups = triton.cdiv(k, 4)
    split = max(1, min(triton.cdiv(4 * _num_sms(device), tiles), groups // (2 * block_g)))
    return GemvConfig(block_n=block_n, block_k=block_g, split_k=split, num_warps=4)


def ternary_gemv_k4(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    p: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    skip_zeros: bool = True,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
    out_is_zeroed: bool = False,
) -> torch.Tensor:
    """``s_w · s_x · x_q @ (codes - 1)`` -> float32 ``[1, N]`` for ``x_q`` int8 ``[1, K]`` (K % 4 == 0,
    4-byte aligned) and ``p = pack_k4(pack_ternary(W_q))`` uint8 ``[K/4, N]``."""
    if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.shape[0] != 1:
        raise ValueError(f"x_q must be int8 [1, K], got {x_q.dtype} {tuple(x_q.shape)}")
    k = x_q.shape[1]
    if k % 4 or p.dtype != torch.uint8 or p.dim() != 2 or p.shape[0] != k // 4:
        raise ValueError(f"p must be uint8 [K/4, N] with K={k} a multiple of 4, got {p.dtype} {tuple(p.shape)}")
    if not x_q.is_contiguous() or x_q.data_ptr() % 4:
        x_q = x_q.contiguous().clone()
    n = p.shape[1]
    g = k // 4
    cfg = config or default_k4_config(k, n, x_q.device)
    per = triton.cdiv(triton.cdiv(g, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(g, per)
    atomic = splits > 1
    if out is None:
        out = torch.zeros(1, n, device=x_q.device, dtype=torch.float32)
    elif atomic and not out_is_zeroed:
        out.zero_()
    use_asm = x_q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    _ternary_k4_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        x_q.view(torch.int32), x_scale.float().reshape(-1), p, w_scale.float().reshape(1), out,
        g, n, per, BLOCK_G=cfg.block_k, BLOCK_N=cfg.block_n, ATOMIC=atomic, USE_ASM=use_asm,
        SKIP_ZEROS=skip_zeros, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
