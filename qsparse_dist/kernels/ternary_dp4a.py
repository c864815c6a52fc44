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
from .pdl import grid_dependency_wait, launch_kwargs

__all__ = ["tile_counters", "pack_k4", "ternary_gemv_k4", "default_k4_config", "pack_k16", "ternary_gemv_k16", "default_k16_config"]


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


_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


def tile_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, for split-K ternary GEMVs.  The last program
    of a tile resets its counter, so one buffer serves every call on a stream (allocate it before a
    CUDA-graph capture: 65536 counters up front)."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n_tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("tile_counters: first call inside a CUDA-graph capture; call once before capturing")
        buf = torch.zeros(max(n_tiles, 65536), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


@triton.jit
def _store_int_sum(out_ptr, n, nmask, tot, sw_ptr, sx_ptr, cnt_ptr, pid_n, nsplit, ATOMIC: tl.constexpr):
    """``out[n] = tot · (s_x · s_w)``, the reference's rounding (``ops.linear.scale_codes_product``).

    Split-K: each program adds its integer partial sum **unscaled** (integers below 2^24 add exactly in
    float32, in any order) and the program that arrives last at the tile's counter scales the total
    once.  Scaling each partial before the atomic add (the earlier code) rounded every partial and
    made the result depend on the split and on the arrival order: integer sums that are equal in the
    reference came out one ulp apart, the next top-K broke those ties differently, and the flips
    compounded with depth (issue 16's fp32 bitnet_qsparse gap, 0.6 relative at the 8B shape)."""
    scale = tl.load(sw_ptr).to(tl.float32) * tl.load(sx_ptr).to(tl.float32)
    totf = tot.to(tl.float32)
    if ATOMIC:
        tl.atomic_add(out_ptr + n, totf, mask=nmask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is performed before the arrival is released
        old = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if old == nsplit - 1:
            tl.debug_barrier()
            total = tl.atomic_add(out_ptr + n, totf * 0.0, mask=nmask, sem="acq_rel")  # coherent read of the sum
            tl.store(out_ptr + n, total * scale, mask=nmask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
    else:
        tl.store(out_ptr + n, totf * scale, mask=nmask)


@triton.jit
def _ternary_k4_kernel(
    xw_ptr, sx_ptr, p_ptr, sw_ptr, out_ptr, cnt_ptr,
    G, N, g_per_split,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr,
    SKIP_ZEROS: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch (.pdl): wait before any access
):
    grid_dependency_wait(PDL)
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
    _store_int_sum(out_ptr, n, nmask, tot, sw_ptr, sx_ptr, cnt_ptr, pid_n, tl.num_programs(1), ATOMIC)


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
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s_w · s_x · x_q @ (codes - 1)`` -> float32 ``[1, N]`` for ``x_q`` int8 ``[1, K]`` (K % 4 == 0,
    4-byte aligned) and ``p = pack_k4(pack_ternary(W_q))`` uint8 ``[K/4, N]``."""
    return _launch_ternary(_ternary_k4_kernel, 4, torch.uint8, default_k4_config, x_q, x_scale, p, w_scale,
                           skip_zeros, config, out, out_is_zeroed, counters)


def _launch_ternary(kernel, group: int, p_dtype: torch.dtype, default_cfg, x_q: torch.Tensor,
                    x_scale: torch.Tensor, p: torch.Tensor, w_scale: torch.Tensor, skip_zeros: bool,
                    config: GemvConfig | None, out: torch.Tensor | None, out_is_zeroed: bool,
                    counters: torch.Tensor | None) -> torch.Tensor:
    """Checks and launch shared by the k4 / k16 kernels: ``group`` inputs per packed element of ``p``
    (``[K/group, N]`` of ``p_dtype``), the int8 codes read as int32 words, split-K over groups."""
    if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.shape[0] != 1:
        raise ValueError(f"x_q must be int8 [1, K], got {x_q.dtype} {tuple(x_q.shape)}")
    k = x_q.shape[1]
    if k % group or p.dtype != p_dtype or p.dim() != 2 or p.shape[0] != k // group:
        raise ValueError(f"packed codes must be {p_dtype} [K/{group}, N] with K={k} a multiple of {group}, "
                         f"got {p.dtype} {tuple(p.shape)}")
    if not x_q.is_contiguous() or x_q.data_ptr() % 4:
        x_q = x_q.contiguous().clone()
    n, g = p.shape[1], k // group
    cfg = config or default_cfg(k, n, x_q.device)
    per = triton.cdiv(triton.cdiv(g, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(g, per)
    atomic = splits > 1
    if out is None:
        out = torch.zeros(1, n, device=x_q.device, dtype=torch.float32)
    elif atomic and not out_is_zeroed:
        out.zero_()
    use_asm = x_q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    tiles = triton.cdiv(n, cfg.block_n)
    kernel[(tiles, splits)](
        x_q.view(torch.int32), x_scale.float().reshape(-1), p, w_scale.float().reshape(1), out,
        counters if counters is not None else tile_counters(x_q.device, tiles), g, n, per,
        BLOCK_G=cfg.block_k, BLOCK_N=cfg.block_n, ATOMIC=atomic, USE_ASM=use_asm,
        SKIP_ZEROS=skip_zeros, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **launch_kwargs(out.device),
    )
    return out


# ---------------------------------------------------------------------------------------------------
# "k16": 16 weights per 32-bit word, pre-permuted so that one shift + one AND yields a dp4a operand.
#
#     word(g, n) = Σ_{i<4, b<4} code(16g + 4i + b, n) << (8b + 2i)        P16 [K/16, N] int32
#
# so ``(word >> 2i) & 0x03030303`` holds, byte b, the code of input ``16g + 4i + b``: exactly the four
# inputs of the activation word ``xw[4g + i]``.  Per 16 weights: 3 shifts, 4 ANDs, 4 dp4a (11
# instructions, 0.7 per weight) against 5 per 4 weights (1.25 per weight) for "k4", whose spreading
# multiplies dominate.  One 4-byte load per 16 weights, coalesced along N.
# ---------------------------------------------------------------------------------------------------


def pack_k16(w_q_packed_rows: torch.Tensor, k: int) -> torch.Tensor:
    """``pack_ternary(W_q)`` ``[N, ceil(K/4)]`` (the export layout) -> ``P16`` int32 ``[K/16, N]``."""
    if k % 16:
        raise ValueError(f"pack_k16 needs in_features % 16 == 0, got {k}")
    n = w_q_packed_rows.shape[0]
    shifts = torch.arange(0, 8, 2, device=w_q_packed_rows.device, dtype=torch.int32)
    codes = (w_q_packed_rows.to(torch.int32)[..., None] >> shifts) & 3  # [N, K/4, 4]: code of input 4j + m
    codes = codes.reshape(n, k // 16, 4, 4)  # [n, g, i, b]: input 16g + 4i + b
    pos = (8 * torch.arange(4, device=codes.device))[None, :] + (2 * torch.arange(4, device=codes.device))[:, None]
    words = (codes.to(torch.int64) << pos).sum(dim=(2, 3))  # [N, K/16], < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous()


@triton.jit
def _k16_words(xw4, i: tl.constexpr):
    """Column ``i`` of ``[BLOCK_G, 4]`` activation words (no register indexing in Triton)."""
    return tl.sum(tl.where(tl.arange(0, 4)[None, :] == i, xw4, 0), axis=1)


@triton.jit
def _ternary_k16_kernel(
    xw_ptr, sx_ptr, p_ptr, sw_ptr, out_ptr, cnt_ptr,
    G, N, g_per_split,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr,
    SKIP_ZEROS: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch (.pdl): wait before any access
):
    grid_dependency_wait(PDL)
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
        xw4 = tl.load(xw_ptr + 4 * g[:, None] + tl.arange(0, 4)[None, :], mask=gm[:, None], other=0)
        rows = gm
        if SKIP_ZEROS:
            rows = rows & (tl.max(tl.abs(xw4), axis=1) != 0)
        w = tl.load(p_ptr + g[:, None] * N + n[None, :], mask=rows[:, None] & nmask[None, :], other=0)
        acc, xs = _k16_accumulate(w, xw4, acc, xs, ones, BLOCK_N, USE_ASM)
    tot = tl.sum(acc, axis=0) - tl.sum(xs, axis=0)
    _store_int_sum(out_ptr, n, nmask, tot, sw_ptr, sx_ptr, cnt_ptr, pid_n, tl.num_programs(1), ATOMIC)


@triton.jit
def _k16_accumulate(w, xw4, acc, xs, ones, BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr):
    """``acc += Σ_i dp4a((w >> 2i) & 0x03030303, xw_i)``, ``xs += Σ x`` (for the ``- Σx`` of ``code - 1``)."""
    for i in tl.static_range(4):
        xi = _k16_words(xw4, i)
        s = (w >> (2 * i)) & 0x03030303
        acc = _dp4a(s, xi[:, None] + tl.zeros_like(acc), acc, USE_ASM)
        xs = _dp4a(ones, xi, xs, USE_ASM)
    return acc, xs


def default_k16_config(k: int, n: int, device: torch.device) -> GemvConfig:
    """``block_k`` counts groups of 16 inputs, ``block_n`` outputs (one int32 word each).  From the
    H200 sweep at the 8B shapes (tools/bench_decode.py, docs/benchmarks.md): 256 x 8 with split-K to
    ~4 programs per SM, except for wide outputs (>= 64 tiles, e.g. fc1 4096x28672: 13.8 vs 15.6 µs)
    where 256 x 16 with ~2 programs per SM wins."""
    block_n = 256
    tiles = triton.cdiv(n, block_n)
    block_g, per_sm = (16, 2) if tiles >= 64 else (8, 4)
    groups = triton.cdiv(k, 16)
    split = max(1, min(triton.cdiv(per_sm * _num_sms(device), tiles), groups // (2 * block_g)))
    return GemvConfig(block_n=block_n, block_k=block_g, split_k=split, num_warps=4)


def ternary_gemv_k16(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    p16: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    skip_zeros: bool = True,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
    out_is_zeroed: bool = False,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s_w · s_x · x_q @ (codes - 1)`` -> float32 ``[1, N]`` for ``x_q`` int8 ``[1, K]`` (K % 16 == 0,
    4-byte aligned) and ``p16 = pack_k16(pack_ternary(W_q), K)`` int32 ``[K/16, N]``."""
    return _launch_ternary(_ternary_k16_kernel, 16, torch.int32, default_k16_config, x_q, x_scale, p16, w_scale,
                           skip_zeros, config, out, out_is_zeroed, counters)
