"""Batch-1 top-K GEMVs that select inside the GEMV: no selection kernel, no dependent pass over the row.

Issue 16 measured the exact top-K of a decode row (one CTA per row, :mod:`.select`) at 9.7-30 µs per
call against 2-3 µs for a plain RMSNorm prologue, more than the sparse GEMVs save.  Here the work is
split in two halves that are both cheap:

* the **prologue** (:func:`qsparse_dist.kernels.decoder.prologue` with ``hist_out``) writes the whole
  row ``y`` (16-bit activations; int8 codes of the whole row for BitNet — the absmax of the kept
  values is the absmax of the row, because the largest ``|x|`` is always kept) and adds every key
  ``key = bits(|y|)`` (15 bits) into a global histogram with relaxed atomics: ``hist[key] += 1``
  (32768 fine bins) and ``hist[32768 + key >> 7] += 1`` (256 coarse bins; one CTA-level histogram,
  256 atomics);
* every **GEMV program** derives the k-th largest key ``t`` from the histogram in two dependent
  reads (coarse digit ``d1`` = the largest with ``#{key >= d1·128} >= k``, then the fine bin within
  it), i.e. 1.5 KB from L2 instead of a pass over the row, then masks its own slice of the row:

      keep_i = key_i > t  or  (key_i == t  and  #{j <= i : key_j == t} <= k - #{key > t})

  — exactly :func:`qsparse_dist.ops.topk_mask` (ties to the lowest index).  The tie rank of a
  program's first feature (``carry``) needs the count of ``key == t`` before its split-K range:
  one pass over ``y[:k_start]`` (L2), only when ties straddle the threshold.

The histogram buffers ping-pong: the GEMV that reads buffer ``j`` zeroes buffer ``j ^ 1`` (the
previous projection's, already consumed) for the next prologue; the step's workspace memset zeroes
both at the start of a step.  16-bit activations only (a 31-bit fp32 key has no 2-level histogram):
fp32 decode keeps :mod:`.select`.

    hist_sparse_gemv   y = (x ⊙ keep) @ Wt       bf16 feature-major Wt [K, N], rows of dropped
                                                 features never fetched (predicated loads)
    hist_ternary_k4    y = s_w s_x (q ⊙ keep) @ (codes - 1)   the dp4a kernels of :mod:`.ternary_dp4a`
    hist_ternary_k16                                 ("k4" / "k16" packing), activation bytes of dropped
                                                     features masked to 0
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gemv import GemvConfig, _load_tile, _num_sms, _write_out
from .pdl import grid_dependency_wait, launch_kwargs
from .ternary_dp4a import _dp4a, _k16_accumulate, _store_int_sum, tile_counters

__all__ = ["HIST_SIZE", "hist_sparse_gemv", "hist_ternary_k4", "hist_ternary_k16", "hist_threshold_torch", "default_hist_config",
           "hist_accumulate", "hist_threshold"]

FINE_BINS = 32768
COARSE_BINS = 256
#: int32 words of one histogram buffer (fine bins, then coarse bins)
HIST_SIZE = FINE_BINS + COARSE_BINS


@triton.jit
def hist_accumulate(xr, inb, hist_ptr):
    """Add the 15-bit keys of the 16-bit row ``xr`` (``inb``: real elements) into the histogram."""
    key = xr.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    tl.atomic_add(hist_ptr + key, tl.full(key.shape, 1, tl.int32), mask=inb, sem="relaxed")
    coarse = tl.histogram(key >> 7, 256, mask=inb)
    tl.atomic_add(hist_ptr + 32768 + tl.arange(0, 256), coarse, sem="relaxed")


@triton.jit
def hist_threshold(hist_ptr, k, D):
    """``(t, need, n_eq)``: the k-th largest key, how many keys equal to it are kept, how many there are."""
    cb = tl.arange(0, 256)
    c = tl.load(hist_ptr + 32768 + cb)
    ge = D - tl.cumsum(c, axis=0) + c  # #{key >> 7 >= bin}, non-increasing
    d1 = tl.sum((ge >= k).to(tl.int32), axis=0) - 1
    above1 = tl.sum(tl.where(cb == d1, ge - c, 0), axis=0)
    n1 = tl.sum(tl.where(cb == d1, c, 0), axis=0)
    fb = tl.arange(0, 128)
    f = tl.load(hist_ptr + d1 * 128 + fb)
    ge2 = above1 + n1 - tl.cumsum(f, axis=0) + f
    d0 = tl.sum((ge2 >= k).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(fb == d0, ge2 - f, 0), axis=0)
    n_eq = tl.sum(tl.where(fb == d0, f, 0), axis=0)
    return d1 * 128 + d0, k - above, n_eq


@triton.jit
def _tie_carry(y_ptr, t, need, n_eq, k_start, SCAN: tl.constexpr):
    """#{j < k_start : key_j == t}, counted only when ties straddle the threshold (else 0 is exact)."""
    carry = tl.full([], 0, tl.int32)
    if (need < n_eq) & (k_start > 0):
        for s0 in range(0, k_start, SCAN):
            j = s0 + tl.arange(0, SCAN)
            m = j < k_start
            v = tl.load(y_ptr + j, mask=m, other=0)
            key = v.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
            carry += tl.sum((m & (key == t)).to(tl.int32), axis=0)
    return carry


@triton.jit
def _keep(v, inr, t, need, carry):
    """Keep-mask of a contiguous slice ``v`` (16-bit values in index order) and the new tie carry."""
    key = v.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    gt = inr & (key > t)
    eq = inr & (key == t)
    n_tile = tl.sum(eq.to(tl.int32), axis=0)
    if (carry < need) & (carry + n_tile > need):  # the one slice where the kept ties end
        keep = gt | (eq & (carry + tl.cumsum(eq.to(tl.int32), axis=0) <= need))
    else:
        keep = tl.where(carry < need, gt | eq, gt)
    return keep, carry + n_tile


@triton.jit
def _zero_slice(zero_ptr, pid, nprog, SIZE: tl.constexpr, ZB: tl.constexpr):
    """Program ``pid`` of ``nprog`` zeroes its share of the other histogram buffer."""
    per = tl.cdiv(tl.cdiv(SIZE, nprog), ZB) * ZB
    for z0 in range(pid * per, tl.minimum(pid * per + per, SIZE), ZB):
        z = z0 + tl.arange(0, ZB)
        tl.store(zero_ptr + z, tl.zeros([ZB], tl.int32), mask=z < SIZE)


@triton.jit
def _hist_sparse_gemv_kernel(
    y_ptr, hist_ptr, zero_ptr, w_ptr, out_ptr,
    K, N, k, k_per_split,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr, ZERO: tl.constexpr,
    SIZE: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch (.pdl): wait before any access
):
    grid_dependency_wait(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if ZERO:
        _zero_slice(zero_ptr, pid_k * tl.num_programs(0) + pid_n, tl.num_programs(0) * tl.num_programs(1), SIZE, 1024)
    t, need, n_eq = hist_threshold(hist_ptr, k, K)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    carry = _tie_carry(y_ptr, t, need, n_eq, k_start, 1024)
    # pipelined one tile ahead: the weight tile of the next step is in flight while this one is used
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    kk = k_start + tl.arange(0, BLOCK_K)
    xa = tl.load(y_ptr + kk, mask=kk < k_end, other=0)
    ka, carry = _keep(xa, kk < k_end, t, need, carry)
    wa = _load_tile(w_ptr, kk, ka, n, nmask, N)
    kk = kk + BLOCK_K
    xb = tl.load(y_ptr + kk, mask=kk < k_end, other=0)
    for _ in range(k_start, k_end, BLOCK_K):
        kb, carry = _keep(xb, kk < k_end, t, need, carry)
        wb = _load_tile(w_ptr, kk, kb, n, nmask, N)
        kk = kk + BLOCK_K
        xc = tl.load(y_ptr + kk, mask=kk < k_end, other=0)
        acc += tl.where(ka, xa.to(tl.float32), 0.0)[:, None] * wa.to(tl.float32)
        xa = xb
        ka = kb
        wa = wb
        xb = xc
    _write_out(out_ptr + n, tl.sum(acc, axis=0), nmask, ATOMIC)


def default_hist_config(k: int, n: int, device: torch.device, ternary: bool = False) -> GemvConfig:
    """bf16: tiles of 256 candidate rows (~128 kept at 50 %) x 32 outputs, split-K to ~2 programs per
    SM (each program pays the threshold read once); ternary: the dp4a kernel's default tiles."""
    block_n, block_k = (256, 16) if ternary else (32, 256)
    rows = triton.cdiv(k, 4) if ternary else k
    tiles = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(2 * _num_sms(device), tiles), rows // (2 * block_k)))
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split, num_warps=4)


def _split(rows: int, cfg: GemvConfig) -> tuple[int, int]:
    per = triton.cdiv(triton.cdiv(rows, cfg.split_k), cfg.block_k) * cfg.block_k
    return per, triton.cdiv(rows, per)


def _check(y: torch.Tensor, hist: torch.Tensor, k: int) -> int:
    if y.dim() != 2 or y.shape[0] != 1 or y.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"y must be a bf16/fp16 row [1, K], got {y.dtype} {tuple(y.shape)}")
    if hist.dtype != torch.int32 or hist.numel() < HIST_SIZE:
        raise ValueError(f"hist must be int32 with >= {HIST_SIZE} entries, got {hist.dtype} {hist.numel()}")
    d = y.shape[1]
    if not 1 <= k <= d:
        raise ValueError(f"k must be in 1..{d}, got {k}")
    return d


def hist_sparse_gemv(y: torch.Tensor, hist: torch.Tensor, k: int, wt: torch.Tensor, *,
                     config: GemvConfig | None = None, out: torch.Tensor | None = None,
                     out_is_zeroed: bool = False, zero_hist: torch.Tensor | None = None) -> torch.Tensor:
    """``(y ⊙ topk_mask_k(y)) @ wt`` -> float32 ``[1, N]``: ``y`` the whole bf16/fp16 row, ``hist`` its
    key histogram (:func:`hist_accumulate`), ``wt`` feature-major ``[K, N]``.  ``zero_hist``: a
    histogram buffer to zero on the way (the next prologue's)."""
    kdim = _check(y, hist, k)
    if wt.shape[0] != kdim:
        raise ValueError(f"wt must be [K={kdim}, N], got {tuple(wt.shape)}")
    n = wt.shape[1]
    cfg = config or default_hist_config(kdim, n, y.device)
    per, splits = _split(kdim, cfg)
    if out is None:
        out = torch.zeros(1, n, device=y.device, dtype=torch.float32)
    elif splits > 1 and not out_is_zeroed:
        out.zero_()
    _hist_sparse_gemv_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        y, hist, zero_hist if zero_hist is not None else hist, wt, out, kdim, n, k, per,
        BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, ATOMIC=splits > 1, ZERO=zero_hist is not None, SIZE=HIST_SIZE,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(out.device))
    return out


@triton.jit
def _hist_k4_kernel(
    xw_ptr, y_ptr, hist_ptr, zero_ptr, sx_ptr, p_ptr, sw_ptr, out_ptr, cnt_ptr,
    G, N, k, D, g_per_split,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr,
    ZERO: tl.constexpr, SIZE: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch (.pdl): wait before any access
):
    grid_dependency_wait(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if ZERO:
        _zero_slice(zero_ptr, pid_k * tl.num_programs(0) + pid_n, tl.num_programs(0) * tl.num_programs(1), SIZE, 1024)
    t, need, n_eq = hist_threshold(hist_ptr, k, D)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    g_start = pid_k * g_per_split
    g_end = tl.minimum(g_start + g_per_split, G)
    carry = _tie_carry(y_ptr, t, need, n_eq, 4 * g_start, 1024)
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.int32)
    xs = tl.zeros([BLOCK_G], dtype=tl.int32)
    ones = tl.full([BLOCK_G], 0x01010101, tl.int32)
    shifts = (8 * tl.arange(0, 4))[None, :]
    for g0 in range(g_start, g_end, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        gm = g < g_end
        f = 4 * g0 + tl.arange(0, 4 * BLOCK_G)
        fm = f < 4 * g_end
        keep, carry = _keep(tl.load(y_ptr + f, mask=fm, other=0), fm, t, need, carry)
        bytes_on = tl.sum(tl.reshape(keep.to(tl.int32), [BLOCK_G, 4]) * (255 << shifts), axis=1)
        xw = tl.load(xw_ptr + g, mask=gm, other=0) & bytes_on
        rows = gm & (xw != 0)
        b = tl.load(p_ptr + g[:, None] * N + n[None, :], mask=rows[:, None] & nmask[None, :], other=0).to(tl.int32)
        s = (((b * 0x1001) & 0x000F000F) * 0x41) & 0x03030303
        acc = _dp4a(s, xw[:, None] + tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.int32), acc, USE_ASM)
        xs = _dp4a(ones, xw, xs, USE_ASM)
    tot = tl.sum(acc, axis=0) - tl.sum(xs, axis=0)
    _store_int_sum(out_ptr, n, nmask, tot, sw_ptr, sx_ptr, cnt_ptr, pid_n, tl.num_programs(1), ATOMIC)


def _launch_hist_ternary(kernel, group: int, p_dtype: torch.dtype, default_cfg, y: torch.Tensor, q: torch.Tensor,
                         x_scale: torch.Tensor, hist: torch.Tensor, k: int, p: torch.Tensor, w_scale: torch.Tensor,
                         config: GemvConfig | None, out: torch.Tensor | None, out_is_zeroed: bool,
                         zero_hist: torch.Tensor | None, counters: torch.Tensor | None) -> torch.Tensor:
    """Checks and launch shared by the k4 / k16 kernels: ``group`` inputs per packed element of ``p``
    (``[K/group, N]`` of ``p_dtype``), the int8 codes ``q`` read as int32 words."""
    kdim = _check(y, hist, k)
    if q.dtype != torch.int8 or q.shape != y.shape or kdim % group or not q.is_contiguous() or q.data_ptr() % 4:
        raise ValueError(f"q must be int8 like y with K % {group} == 0, 4-byte aligned, got {q.dtype} {tuple(q.shape)}")
    if p.dtype != p_dtype or p.shape[0] != kdim // group:
        raise ValueError(f"packed codes must be {p_dtype} [K/{group}, N], got {p.dtype} {tuple(p.shape)}")
    n, groups = p.shape[1], kdim // group
    cfg = config or default_cfg(kdim, n, y.device)
    per, splits = _split(groups, cfg)
    if out is None:
        out = torch.zeros(1, n, device=y.device, dtype=torch.float32)
    elif splits > 1 and not out_is_zeroed:
        out.zero_()
    use_asm = y.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    tiles = triton.cdiv(n, cfg.block_n)
    kernel[(tiles, splits)](
        q.view(torch.int32), y, hist, zero_hist if zero_hist is not None else hist, x_scale.float().reshape(-1), p,
        w_scale.float().reshape(1), out, counters if counters is not None else tile_counters(y.device, tiles),
        groups, n, k, kdim, per, BLOCK_G=cfg.block_k, BLOCK_N=cfg.block_n,
        ATOMIC=splits > 1, USE_ASM=use_asm, ZERO=zero_hist is not None, SIZE=HIST_SIZE,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(out.device))
    return out


def hist_ternary_k4(y: torch.Tensor, q: torch.Tensor, x_scale: torch.Tensor, hist: torch.Tensor, k: int,
                    p: torch.Tensor, w_scale: torch.Tensor, *, config: GemvConfig | None = None,
                    out: torch.Tensor | None = None, out_is_zeroed: bool = False,
                    zero_hist: torch.Tensor | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """``s_w s_x (q ⊙ topk_mask_k(y)) @ (codes - 1)`` -> float32 ``[1, N]``: ``q`` int8 codes of the whole
    row, ``y`` the 16-bit row they quantize (its keys select), ``p = pack_k4(...)`` ``[K/4, N]``."""
    return _launch_hist_ternary(
        _hist_k4_kernel, 4, torch.uint8, lambda kd, n, dev: default_hist_config(kd, n, dev, ternary=True),
        y, q, x_scale, hist, k, p, w_scale, config, out, out_is_zeroed, zero_hist, counters)


@triton.jit
def _hist_k16_kernel(
    xw_ptr, y_ptr, hist_ptr, zero_ptr, sx_ptr, p_ptr, sw_ptr, out_ptr, cnt_ptr,
    G, N, k, D, g_per_split,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr,
    ZERO: tl.constexpr, SIZE: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch (.pdl): wait before any access
):
    grid_dependency_wait(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if ZERO:
        _zero_slice(zero_ptr, pid_k * tl.num_programs(0) + pid_n, tl.num_programs(0) * tl.num_programs(1), SIZE, 1024)
    t, need, n_eq = hist_threshold(hist_ptr, k, D)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    g_start = pid_k * g_per_split
    g_end = tl.minimum(g_start + g_per_split, G)
    carry = _tie_carry(y_ptr, t, need, n_eq, 16 * g_start, 1024)
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.int32)
    xs = tl.zeros([BLOCK_G], dtype=tl.int32)
    ones = tl.full([BLOCK_G], 0x01010101, tl.int32)
    shifts = (8 * tl.arange(0, 4))[None, None, :]
    for g0 in range(g_start, g_end, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        gm = g < g_end
        f = 16 * g0 + tl.arange(0, 16 * BLOCK_G)
        fm = f < 16 * g_end
        keep, carry = _keep(tl.load(y_ptr + f, mask=fm, other=0), fm, t, need, carry)
        bytes_on = tl.sum(tl.reshape(keep.to(tl.int32), [BLOCK_G, 4, 4]) * (255 << shifts), axis=2)
        xw4 = tl.load(xw_ptr + 4 * g[:, None] + tl.arange(0, 4)[None, :], mask=gm[:, None], other=0) & bytes_on
        rows = gm & (tl.max(tl.abs(xw4), axis=1) != 0)
        w = tl.load(p_ptr + g[:, None] * N + n[None, :], mask=rows[:, None] & nmask[None, :], other=0)
        acc, xs = _k16_accumulate(w, xw4, acc, xs, ones, BLOCK_N, USE_ASM)
    tot = tl.sum(acc, axis=0) - tl.sum(xs, axis=0)
    _store_int_sum(out_ptr, n, nmask, tot, sw_ptr, sx_ptr, cnt_ptr, pid_n, tl.num_programs(1), ATOMIC)


def hist_ternary_k16(y: torch.Tensor, q: torch.Tensor, x_scale: torch.Tensor, hist: torch.Tensor, k: int,
                     p16: torch.Tensor, w_scale: torch.Tensor, *, config: GemvConfig | None = None,
                     out: torch.Tensor | None = None, out_is_zeroed: bool = False,
                     zero_hist: torch.Tensor | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`hist_ternary_k4` over ``p16 = pack_k16(...)`` int32 ``[K/16, N]`` (K % 16 == 0)."""
    from .ternary_dp4a import default_k16_config

    return _launch_hist_ternary(_hist_k16_kernel, 16, torch.int32, default_k16_config,
                                y, q, x_scale, hist, k, p16, w_scale, config, out, out_is_zeroed, zero_hist, counters)


def hist_threshold_torch(hist: torch.Tensor, k: int) -> tuple[int, int, int]:
    """Torch reference of :func:`hist_threshold` (tests): ``(t, need, n_eq)`` from the fine bins."""
    fine = hist[:FINE_BINS].long().cpu()
    ge = fine.flip(0).cumsum(0).flip(0)  # #{key >= b}
    t = int((ge >= k).sum()) - 1
    above = int(ge[t] - fine[t])
    return t, k - above, int(fine[t])
