"""Decode GEMV kernels (batch 1 and small batches) that read only the weights of kept features.

Weights are stored **feature-major**: ``Wt = Wᵀ`` of shape ``[K, N]`` (``K`` input features,
``N`` outputs), so the weights that one input feature ``k`` multiplies are one contiguous row of
``Wt``.  With Q-Sparse the input ``x`` has ``K - k`` exact zeros; every program loads the rows of its
``[BLOCK_K, BLOCK_N]`` tile with the predicate ``x[k] != 0`` (any row of the batch, for B > 1), so
the memory system never fetches the rows of dropped features: bytes read scale with ``1 - sparsity``
without a gather or a compaction step.

    sparse_gemv      y[b, n] = Σ_k x[b, k] · Wt[k, n]                      (bf16/fp16/fp32 Wt)
    ternary_gemv     y[b, n] = s_w · s_x[b] · Σ_k x_q[b, k] · (code[k, n] - 1)
                     x_q int8 per-token absmax codes, Wt packed 2 bits (ops.packing, feature-major
                     form ``to_feature_major``: byte j of row k holds outputs 4j..4j+3)

Both: grid ``(cdiv(N, BLOCK_N), SPLIT_K)``; each program reduces ``K / SPLIT_K`` features and, when
``SPLIT_K > 1``, adds its partial sum into a zeroed float32 output with ``atomic_add`` (split-K
keeps all SMs busy when ``N`` alone gives too few programs).  Batch 1 accumulates elementwise
(``acc[BLOCK_K, BLOCK_N] += x ⊙ w``, one reduction at the end); batches ``2..16`` use ``tl.dot``
with the batch padded to 16 (bf16 or int8 tensor cores).  The ternary codes become floats without
an int→float conversion: ``bitcast(0x4B000000 | c) - (2^23 + 1) = c - 1`` exactly, and float32 sums
of ``|x_q| ≤ 128`` products stay exact integers below 2^24 for ``K < 65536``.
Outputs are float32 ``[B, N]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import grid_dependency_wait, launch_kwargs

__all__ = ["GemvConfig", "default_config", "gather_gemv", "sparse_gemv", "ternary_gemv"]


@dataclass(frozen=True)
class GemvConfig:
    """Tile and launch shape.  ``block_n`` counts outputs (ternary: 4 per packed byte)."""

    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def default_config(k: int, n: int, batch: int, device: torch.device, ternary: bool = False) -> GemvConfig:
    """Heuristic from the H200 sweep (docs/kernels.md): narrow bf16 tiles with deep K, wide ternary
    tiles with shallow K, split-K up to ~4 programs per SM.  ``k`` = rows the kernel loops over
    (the kept count for :func:`gather_gemv`).  ``tune.tune_gemv`` measures instead of guessing."""
    if batch > 1:
        block_n, block_k = (256, 32) if ternary else (64, 32)
    else:
        block_n, block_k = (512, 16) if ternary else (32, 128)
    n_tiles = triton.cdiv(n, block_n)
    want = 4 * _num_sms(device)
    split = max(1, min(triton.cdiv(want, n_tiles), k // (2 * block_k)))
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split, num_warps=4)


# Shared pieces of the kernels below (inlined by Triton: the generated code is the same as written
# out in each kernel).  The batch-1 kernels are software-pipelined by hand — the weight tile of the
# next step and the x of the step after are loaded before the current tile is used, so a predicated
# weight load never waits for its own x load and two weight tiles are in flight per program — from
# these steps: ``_load_x`` (x of a step), ``_load_tile`` (the weight rows whose x is nonzero).


@triton.jit
def _load_x(x_ptr, kk, k_end):
    """x of features ``kk`` (0 past ``k_end``) as float32."""
    return tl.load(x_ptr + kk, mask=kk < k_end, other=0).to(tl.float32)


@triton.jit
def _load_tile(w_ptr, rows, rmask, cols, cmask, NCOL):
    """``W[rows, cols]`` of a row-major ``[*, NCOL]`` weight; masked-out rows are never fetched (0)."""
    return tl.load(w_ptr + rows[:, None] * NCOL + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0)


@triton.jit
def _kept_rows(kk, k_end, xv, SKIP_ZEROS: tl.constexpr):
    """Rows of the K range that are read: in range and, with ``SKIP_ZEROS``, ``x != 0``."""
    rows = kk < k_end
    if SKIP_ZEROS:
        rows = rows & (xv != 0.0)
    return rows


@triton.jit
def _write_out(ptrs, val, mask, ATOMIC: tl.constexpr):
    """Store, or ``atomic_add`` into the zeroed output when split-K programs share it."""
    if ATOMIC:
        tl.atomic_add(ptrs, val, mask=mask)
    else:
        tl.store(ptrs, val, mask=mask)


@triton.jit
def _w32_rotations():
    """Per code ``i`` of a 32-bit word, the left rotation ``(21 - 2i) mod 32`` (in 1..31) that brings
    its 2 bits to mantissa bits 21-22."""
    return ((53 - 2 * tl.arange(0, 16)) % 32).to(tl.uint32)[None, None, :]


@triton.jit
def _w32_decode(w, rot):
    """Words ``[R, C]`` of 16 two-bit codes -> float32 ``[R, C, 16]`` holding ``1 + c/4`` exactly."""
    u = w.to(tl.uint32, bitcast=True)[:, :, None]
    r = (u << rot) | (u >> (32 - rot))
    return ((r & 0x600000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _w32_result(acc, xsum, sx_ptr, sw_ptr, C: tl.constexpr):
    """``s_w · s_x · Σ x·(c - 1)`` from ``acc = Σ x·(1 + c/4)`` and ``xsum = Σ x``, flattened to
    ``[C · 16]`` outputs."""
    tot = tl.sum(xsum, axis=0)
    scale = tl.load(sw_ptr).to(tl.float32) * tl.load(sx_ptr).to(tl.float32)
    return tl.reshape((4.0 * (tl.sum(acc, axis=0) - tot) - tot) * scale, [C * 16])


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, out_ptr,
    B, K, N, k_per_split,
    SKIP_ZEROS: tl.constexpr,
    BP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_F32: tl.constexpr,  # the Triton interpreter multiplies bf16 bit patterns as integers
    PDL: tl.constexpr = 0,  # programmatic dependent launch (.pdl): wait before any access
):
    grid_dependency_wait(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if BP == 1:  # pipelined one tile ahead (see the helpers above)
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        kk = k_start + tl.arange(0, BLOCK_K)
        xa = _load_x(x_ptr, kk, k_end)
        wa = _load_tile(w_ptr, kk, _kept_rows(kk, k_end, xa, SKIP_ZEROS), n, nmask, N)
        kk = kk + BLOCK_K
        xb = _load_x(x_ptr, kk, k_end)
        for _ in range(k_start, k_end, BLOCK_K):
            wb = _load_tile(w_ptr, kk, _kept_rows(kk, k_end, xb, SKIP_ZEROS), n, nmask, N)
            kk = kk + BLOCK_K
            xc = _load_x(x_ptr, kk, k_end)
            acc += xa[:, None] * wa.to(tl.float32)
            xa = xb
            wa = wb
            xb = xc
        _write_out(out_ptr + n, tl.sum(acc, axis=0), nmask, ATOMIC)
    else:
        b = tl.arange(0, BP)
        bmask = b < B
        acc = tl.zeros([BP, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kin = kk < k_end
            xv = tl.load(x_ptr + b[:, None] * K + kk[None, :], mask=bmask[:, None] & kin[None, :], other=0.0)
            if SKIP_ZEROS:
                kin = kin & (tl.max(tl.abs(xv.to(tl.float32)), axis=0) != 0.0)
            w = tl.load(w_ptr + kk[:, None] * N + n[None, :], mask=kin[:, None] & nmask[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(xv.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xv.to(w.dtype), w, acc)
        _write_out(out_ptr + b[:, None] * N + n[None, :], acc, bmask[:, None] & nmask[None, :], ATOMIC)


@triton.jit
def _code_to_weight(c):
    """2-bit code (int32 in 0..2) -> weight c - 1 as float32, via the 2^23 mantissa trick."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0


@triton.jit
def _ternary_gemv_kernel(
    q_ptr, sx_ptr, w_ptr, sw_ptr, out_ptr,
    B, K, N, NB, k_per_split,
    SKIP_ZEROS: tl.constexpr,
    BP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    ATOMIC: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch (.pdl): wait before any access
):
    grid_dependency_wait(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    j = pid_n * BLOCK_NB + tl.arange(0, BLOCK_NB)  # packed byte column: outputs 4j..4j+3
    jmask = j < NB
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    sw = tl.load(sw_ptr).to(tl.float32)
    if BP == 1:
        acc0 = tl.zeros([BLOCK_K, BLOCK_NB], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_K, BLOCK_NB], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_K, BLOCK_NB], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_K, BLOCK_NB], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kin = kk < k_end
            xq = tl.load(q_ptr + kk, mask=kin, other=0)
            if SKIP_ZEROS:
                kin = kin & (xq != 0)
            p = tl.load(w_ptr + kk[:, None] * NB + j[None, :],
                        mask=kin[:, None] & jmask[None, :], other=0x55).to(tl.int32)
            xf = xq.to(tl.float32)[:, None]
            acc0 += xf * _code_to_weight(p & 3)
            acc1 += xf * _code_to_weight((p >> 2) & 3)
            acc2 += xf * _code_to_weight((p >> 4) & 3)
            acc3 += xf * _code_to_weight(p >> 6)
        scale = sw * tl.load(sx_ptr).to(tl.float32)
        n0 = 4 * j
        r0 = tl.sum(acc0, axis=0) * scale
        r1 = tl.sum(acc1, axis=0) * scale
        r2 = tl.sum(acc2, axis=0) * scale
        r3 = tl.sum(acc3, axis=0) * scale
        _write_out(out_ptr + n0, r0, jmask & (n0 < N), ATOMIC)
        _write_out(out_ptr + n0 + 1, r1, jmask & (n0 + 1 < N), ATOMIC)
        _write_out(out_ptr + n0 + 2, r2, jmask & (n0 + 2 < N), ATOMIC)
        _write_out(out_ptr + n0 + 3, r3, jmask & (n0 + 3 < N), ATOMIC)
    else:
        b = tl.arange(0, BP)
        bmask = b < B
        acc = tl.zeros([BP, 4 * BLOCK_NB], dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kin = kk < k_end
            xq = tl.load(q_ptr + b[:, None] * K + kk[None, :], mask=bmask[:, None] & kin[None, :], other=0)
            if SKIP_ZEROS:
                kin = kin & (tl.max(tl.abs(xq.to(tl.int32)), axis=0) != 0)
            p = tl.load(w_ptr + kk[:, None] * NB + j[None, :],
                        mask=kin[:, None] & jmask[None, :], other=0x55).to(tl.int32)
            # interleave the 4 codes of each byte: column 4j+i <- bits [2i, 2i+1]
            c0 = (p & 3) - 1
            c1 = ((p >> 2) & 3) - 1
            c2 = ((p >> 4) & 3) - 1
            c3 = (p >> 6) - 1
            w = tl.join(tl.join(c0, c2), tl.join(c1, c3)).reshape(BLOCK_K, 4 * BLOCK_NB).to(tl.int8)
            acc = tl.dot(xq, w, acc, out_dtype=tl.int32)
        n = pid_n * 4 * BLOCK_NB + tl.arange(0, 4 * BLOCK_NB)
        sx = tl.load(sx_ptr + b, mask=bmask, other=0.0).to(tl.float32)
        res = acc.to(tl.float32) * (sx[:, None] * sw)
        _write_out(out_ptr + b[:, None] * N + n[None, :], res, bmask[:, None] & (n < N)[None, :], ATOMIC)


@triton.jit
def _ternary_gemv_w32_kernel(
    q_ptr, sx_ptr, w_ptr, sw_ptr, out_ptr,
    K, N, NW, k_per_split,
    SKIP_ZEROS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_NW: tl.constexpr,
    ATOMIC: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch (.pdl): wait before any access
):
    """Batch 1, packed rows read as 32-bit words (16 codes, outputs 16w..16w+15).

    Code i of a word is rotated into mantissa bits 21-22 and OR-ed under the exponent of 1.0:
    ``f = 1 + c/4`` (rotate + and/or + one FMA per weight, no int->float conversion), so
    ``acc = Σ x + ¼ Σ x·c`` and ``Σ x·(c - 1) = 4·(acc - Σ x) - Σ x``; every partial sum is a
    multiple of 1/4 below 2^22 for K <= 22000, hence exact in float32.
    """
    grid_dependency_wait(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    jw = pid_n * BLOCK_NW + tl.arange(0, BLOCK_NW)
    jmask = jw < NW
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    rot = _w32_rotations()
    acc = tl.zeros([BLOCK_K, BLOCK_NW, 16], dtype=tl.float32)
    xsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    kk = k_start + tl.arange(0, BLOCK_K)
    xa = _load_x(q_ptr, kk, k_end)
    wa = _load_tile(w_ptr, kk, _kept_rows(kk, k_end, xa, SKIP_ZEROS), jw, jmask, NW)
    kk = kk + BLOCK_K
    xb = _load_x(q_ptr, kk, k_end)
    for _ in range(k_start, k_end, BLOCK_K):
        wb = _load_tile(w_ptr, kk, _kept_rows(kk, k_end, xb, SKIP_ZEROS), jw, jmask, NW)
        kk = kk + BLOCK_K
        xc = _load_x(q_ptr, kk, k_end)
        acc += xa[:, None, None] * _w32_decode(wa, rot)
        xsum += xa
        xa = xb
        wa = wb
        xb = xc
    res = _w32_result(acc, xsum, sx_ptr, sw_ptr, BLOCK_NW)
    n = pid_n * BLOCK_NW * 16 + tl.arange(0, BLOCK_NW * 16)
    _write_out(out_ptr + n, res, n < N, ATOMIC)


@triton.jit
def _gather_gemv_kernel(
    v_ptr, idx_ptr, w_ptr, sx_ptr, sw_ptr, out_ptr,
    KEPT, N, NCOL, per_split,
    TERNARY: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ATOMIC: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch (.pdl): wait before any access
):
    """Batch 1 over the compacted kept features: ``idx [KEPT]`` rows of the feature-major weight,
    ``v [KEPT]`` their activations.  The loop runs over kept rows only (work ∝ 1 - sparsity).

    ``TERNARY=False``: weight rows of ``NCOL = N`` bf16/fp16/fp32 values.  ``TERNARY=True``: rows of
    ``NCOL = N/16`` 32-bit words of 2-bit codes, decoded as in ``_ternary_gemv_w32_kernel``
    (``v`` = int8 codes, output scaled by ``s_w · s_x``).  Software-pipelined one tile ahead.
    """
    grid_dependency_wait(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    c = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < NCOL
    j_start = pid_k * per_split
    j_end = tl.minimum(j_start + per_split, KEPT)
    jj = j_start + tl.arange(0, BLOCK_K)
    ma = jj < j_end
    ia = tl.load(idx_ptr + jj, mask=ma, other=0)
    xa = _load_x(v_ptr, jj, j_end)
    wa = _load_tile(w_ptr, ia, ma, c, cmask, NCOL)
    jj = jj + BLOCK_K
    mb = jj < j_end
    ib = tl.load(idx_ptr + jj, mask=mb, other=0)
    xb = _load_x(v_ptr, jj, j_end)
    if TERNARY:
        rot = _w32_rotations()
        acc3 = tl.zeros([BLOCK_K, BLOCK_C, 16], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for _ in range(j_start, j_end, BLOCK_K):
        wb = _load_tile(w_ptr, ib, mb, c, cmask, NCOL)
        jj = jj + BLOCK_K
        mc = jj < j_end
        ic = tl.load(idx_ptr + jj, mask=mc, other=0)
        xc = _load_x(v_ptr, jj, j_end)
        if TERNARY:
            acc3 += xa[:, None, None] * _w32_decode(wa, rot)
            xsum += xa
        else:
            acc += xa[:, None] * wa.to(tl.float32)
        xa = xb
        wa = wb
        xb = xc
        ib = ic
        mb = mc
    if TERNARY:
        res = _w32_result(acc3, xsum, sx_ptr, sw_ptr, BLOCK_C)
        n = pid_n * BLOCK_C * 16 + tl.arange(0, BLOCK_C * 16)
    else:
        res = tl.sum(acc, axis=0)
        n = c
    _write_out(out_ptr + n, res, n < N, ATOMIC)


def _batch_pad(batch: int) -> int:
    if batch == 1:
        return 1
    if batch > 16:
        raise ValueError(f"the GEMV kernels take batch <= 16 (decode); got batch {batch}")
    return 16


def _launch_shape(k: int, cfg: GemvConfig) -> tuple[int, int]:
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def sparse_gemv(
    x: torch.Tensor,
    wt: torch.Tensor,
    *,
    skip_zeros: bool = True,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
    out_is_zeroed: bool = False,
) -> torch.Tensor:
    """``x [B, K] @ wt [K, N]`` -> float32 ``[B, N]``, fetching only rows ``k`` with ``x[:, k] != 0``.

    ``x`` is the already sparsified activation (zeros where top-K dropped a feature); ``wt`` the
    feature-major weight (``W.t().contiguous()``).  ``B <= 16``.  ``out``: float32 ``[B, N]``;
    ``out_is_zeroed=True`` promises it holds zeros (a decode step zeroes all its GEMV outputs with
    one memset), else split-K zeroes it first.
    """
    if x.dim() != 2 or wt.dim() != 2 or x.shape[1] != wt.shape[0]:
        raise ValueError(f"x must be [B, K] and wt [K, N]; got {tuple(x.shape)} and {tuple(wt.shape)}")
    x, wt = x.contiguous(), wt.contiguous()
    if wt.numel() >= 2**31:
        raise ValueError(f"wt has {wt.numel()} elements; the kernels index with int32 (< 2^31)")
    bsz, k = x.shape
    n = wt.shape[1]
    bp = _batch_pad(bsz)
    cfg = config or default_config(k, n, bsz, x.device)
    k_per_split, splits = _launch_shape(k, cfg)
    atomic = splits > 1
    if out is None:
        out = torch.zeros(bsz, n, device=x.device, dtype=torch.float32) if atomic else torch.empty(
            bsz, n, device=x.device, dtype=torch.float32)
    elif atomic and not out_is_zeroed:
        out.zero_()
    grid = (triton.cdiv(n, cfg.block_n), splits)
    _sparse_gemv_kernel[grid](
        x, wt, out, bsz, k, n, k_per_split,
        SKIP_ZEROS=skip_zeros, BP=bp, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, ATOMIC=atomic,
        DOT_F32=not x.is_cuda or wt.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(out.device),
    )
    return out


def ternary_gemv(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    wt_packed: torch.Tensor,
    w_scale: torch.Tensor,
    n: int,
    *,
    skip_zeros: bool = True,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
    out_is_zeroed: bool = False,
) -> torch.Tensor:
    """BitNet decode GEMV: ``s_w · s_x[b] · x_q[b] @ (unpack(wt_packed) - ...)`` -> float32 ``[B, n]``.

    Args:
        x_q: int8 ``[B, K]`` activation codes (zeros where top-K dropped a feature).
        x_scale: float32 ``[B]`` per-token scales (``x ≈ x_scale · x_q``).
        wt_packed: uint8 ``[K, ceil(n/4)]``, :func:`qsparse_dist.ops.packing.to_feature_major`.
        w_scale: float32 scalar tensor, the absmean scale ``s_w``.
        n: number of outputs (the packed row may hold up to 3 padding codes).
    """
    if x_q.dtype != torch.int8 or x_q.dim() != 2:
        raise ValueError(f"x_q must be int8 [B, K], got {x_q.dtype} {tuple(x_q.shape)}")
    if wt_packed.dtype != torch.uint8 or wt_packed.dim() != 2 or wt_packed.shape[0] != x_q.shape[1]:
        raise ValueError(
            f"wt_packed must be uint8 [K, ceil(n/4)] with K = {x_q.shape[1]}, got "
            f"{wt_packed.dtype} {tuple(wt_packed.shape)}"
        )
    if wt_packed.shape[1] != (n + 3) // 4:
        raise ValueError(f"n={n} needs ceil(n/4)={(n + 3) // 4} packed columns, got {wt_packed.shape[1]}")
    x_q, wt_packed = x_q.contiguous(), wt_packed.contiguous()
    bsz, k = x_q.shape
    if k >= 65536:
        raise ValueError(f"K={k} too large for the exact float32 accumulation (K < 65536)")
    bp = _batch_pad(bsz)
    cfg = config or default_config(k, n, bsz, x_q.device, ternary=True)
    if cfg.block_n % 4:
        raise ValueError(f"config.block_n must be a multiple of 4 for packed weights, got {cfg.block_n}")
    k_per_split, splits = _launch_shape(k, cfg)
    atomic = splits > 1
    if out is None:
        out = torch.zeros(bsz, n, device=x_q.device, dtype=torch.float32) if atomic else torch.empty(
            bsz, n, device=x_q.device, dtype=torch.float32)
    elif atomic and not out_is_zeroed:
        out.zero_()
    nb = wt_packed.shape[1]
    if bsz == 1 and n % 16 == 0 and cfg.block_n % 16 == 0 and k <= 22000 and wt_packed.data_ptr() % 4 == 0:
        words = wt_packed.view(torch.int32)  # [K, N/16]: 16 codes per word, same bit layout
        nw = words.shape[1]
        block_nw = cfg.block_n // 16
        _ternary_gemv_w32_kernel[(triton.cdiv(nw, block_nw), splits)](
            x_q, x_scale.float().contiguous(), words, w_scale.float().reshape(1), out,
            k, n, nw, k_per_split,
            SKIP_ZEROS=skip_zeros, BLOCK_K=cfg.block_k, BLOCK_NW=block_nw, ATOMIC=atomic,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(out.device),
        )
        return out
    block_nb = cfg.block_n // 4
    block_k = cfg.block_k if bp == 1 else max(32, cfg.block_k)  # int8 tl.dot needs K >= 32
    if block_k != cfg.block_k:
        k_per_split, splits = _launch_shape(k, GemvConfig(cfg.block_n, block_k, cfg.split_k))
        atomic = splits > 1
        if atomic and not out_is_zeroed:
            out.zero_()
    grid = (triton.cdiv(nb, block_nb), splits)
    _ternary_gemv_kernel[grid](
        x_q, x_scale.float().contiguous(), wt_packed, w_scale.float().reshape(1), out,
        bsz, k, n, nb, k_per_split,
        SKIP_ZEROS=skip_zeros, BP=bp, BLOCK_K=block_k, BLOCK_NB=block_nb, ATOMIC=atomic,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(out.device),
    )
    return out


def gather_gemv(
    vals: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    n: int,
    *,
    x_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
    out_is_zeroed: bool = False,
) -> torch.Tensor:
    """Batch-1 GEMV over a compacted kept list (``topk_rows(..., write_idx=True)``) -> float32 ``[1, n]``.

    bf16/fp16/fp32 ``weight [K, n]`` (feature-major): ``y = Σ_j vals[j] · weight[idx[j]]``.
    uint8 ``weight [K, n/4]`` (packed ternary, feature-major, ``n % 16 == 0``): ``vals`` are the int8
    codes and ``y = s_w · s_x · Σ_j vals[j] · (codes[idx[j]] - 1)``.
    """
    vals, idx = vals.reshape(-1), idx.reshape(-1)
    if idx.dtype != torch.int32 or vals.shape != idx.shape:
        raise ValueError(f"idx must be int32 and match vals; got {idx.dtype} {tuple(idx.shape)} / {tuple(vals.shape)}")
    ternary = weight.dtype == torch.uint8
    kept = idx.numel()
    if ternary:
        if n % 16 or weight.shape[1] != n // 4:
            raise ValueError(f"packed ternary gather needs n % 16 == 0 and weight [K, n/4]; got n={n}, "
                             f"{tuple(weight.shape)}")
        if x_scale is None or w_scale is None:
            raise ValueError("packed ternary weights need x_scale and w_scale")
        w = weight.contiguous().view(torch.int32)
        ncol = n // 16
    else:
        if weight.shape[1] != n:
            raise ValueError(f"weight must be [K, n={n}], got {tuple(weight.shape)}")
        w = weight.contiguous()
        ncol = n
    if w.numel() >= 2**31:
        raise ValueError("weight too large for int32 indexing")
    cfg = config or default_config(kept, n, 1, weight.device, ternary=ternary)
    per_split, splits = _launch_shape(kept, cfg)
    atomic = splits > 1
    if out is None:
        out = torch.zeros(1, n, device=weight.device, dtype=torch.float32)
    elif atomic and not out_is_zeroed:
        out.zero_()
    block_c = cfg.block_n // 16 if ternary else cfg.block_n
    if ternary and cfg.block_n % 16:
        raise ValueError(f"config.block_n must be a multiple of 16 for packed weights, got {cfg.block_n}")
    one = x_scale if x_scale is not None else w
    _gather_gemv_kernel[(triton.cdiv(ncol, block_c), splits)](
        vals, idx, w, x_scale.float().reshape(-1) if ternary else one, w_scale.float().reshape(1) if ternary else one,
        out, kept, n, ncol, per_split,
        TERNARY=ternary, BLOCK_K=cfg.block_k, BLOCK_C=block_c, ATOMIC=atomic,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(out.device),
    )
    return out
