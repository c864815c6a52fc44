"""Fused per-row top-K selection: mask, masked activation (+STE), N:M blocks, int8 quantization.

One Triton program owns ``BLOCK_R`` rows of ``D`` features (a row is a token, or one N:M block of
``M`` features) and keeps them in registers for the whole selection:

1. key = the bit pattern of ``|x|`` as a non-negative integer (15 bits for bf16/fp16, 31 for fp32);
   for non-negative floats the integer order is the float order, so the k-th largest ``|x|`` is the
   k-th largest key.
2. Radix bisection, most significant bit first (``KEY_BITS`` steps, no sort)::

       t = 0
       for b = KEY_BITS-1 .. 0:  if count(key >= t | 2^b) >= k:  t |= 2^b

   ends with ``t`` = the largest value with ``count(key >= t) >= k``, i.e. the k-th largest key.
3. Ties, exactly as :func:`qsparse_dist.ops.mask_from_threshold`: keep ``key > t`` plus the first
   ``k - count(key > t)`` entries with ``key == t`` in index order (a cumulative sum along the row),
   so the mask is identical to the torch reference, bit for bit.

Fused epilogues (all in the same pass, one read of ``x``): the masked activation ``x ⊙ M``; the
boolean mask; the BitNet per-token absmax int8 fake-quant of ``x ⊙ M`` (reproducing
``fake_quant_activation_int8``'s float32 arithmetic and its forward value ``deq`` in ``x``'s dtype);
the int8 codes as floats plus the per-token scale (``quant=3``; BitNet training,
:func:`qsparse_dist.kernels.codes_scale.topk_codes_triton`); or
the real int8 codes and scales for the decode GEMV kernels.

16-bit rows of even width (every training shape) take :func:`_topk_rows_swar_kernel`: the same
bisection on two keys per 32-bit word, 3 integer operations per word and candidate instead of 2-3
per feature (H200, ``[16384, 2048]`` bf16: 0.081 ms against 0.139 ms; docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.quant import ACT_EPS, code_dtype
from ..ops.sparsify import kept_count

__all__ = [
    "topk_rows",
    "topk_mask_triton",
    "topk_sparsify_triton",
    "quantize_rows_int8",
]

_KEY_BITS = {torch.bfloat16: 15, torch.float16: 15, torch.float32: 31}


@triton.jit
def _round_half_even(v):
    """``torch.round`` (half to even) from floor, exact for any float32 (no fast-math tricks)."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _round_f32_to_bf16(v):
    """float32 -> nearest bf16 value (ties to even), still float32.  Done on the bits because the
    Triton interpreter truncates on ``.to(tl.bfloat16)`` while the GPU rounds; the value returned
    is exactly representable, so the following cast is exact on both."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_dtype(v, dtype: tl.constexpr, IS_BF16: tl.constexpr):
    if IS_BF16:
        v = _round_f32_to_bf16(v)
    return v.to(dtype)


@triton.jit
def topk_keep(x, inb, k, KEY_BITS: tl.constexpr, BLOCK_R: tl.constexpr, TWO_BITS: tl.constexpr = False,
              LAZY_TIES: tl.constexpr = False):
    """Boolean keep-mask of the top-``k`` ``|x|`` of every row of the 2-D tile ``x`` (``inb`` marks
    real elements): radix bisection on the bits of ``|x|``, ties to the lowest index.

    ``TWO_BITS``: settle two bits per step (three candidate counts packed in one int64 sum, 21
    bits each; rows < 2^21), halving the number of row reductions, the latency of a single row.
    ``LAZY_TIES``: run the index-order scan that ranks the ties only when some row of the tile needs
    fewer of the keys equal to its threshold than it has (one extra row sum instead of a scan)."""
    if KEY_BITS == 15:
        key = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    key = tl.where(inb, key, -1)
    t = tl.zeros([BLOCK_R], dtype=tl.int32)
    if TWO_BITS:
        for p in tl.static_range(KEY_BITS // 2):
            c1 = t | (1 << (KEY_BITS - 2 * (p + 1)))
            c2 = t | (2 << (KEY_BITS - 2 * (p + 1)))
            c3 = t | (3 << (KEY_BITS - 2 * (p + 1)))
            packed = ((key >= c1[:, None]).to(tl.int64) + ((key >= c2[:, None]).to(tl.int64) << 21)
                      + ((key >= c3[:, None]).to(tl.int64) << 42))
            cnt = tl.sum(packed, axis=1)
            n1 = (cnt & 0x1FFFFF).to(tl.int32)
            n2 = ((cnt >> 21) & 0x1FFFFF).to(tl.int32)
            n3 = (cnt >> 42).to(tl.int32)
            t = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, t)))
        if KEY_BITS % 2 == 1:
            cand = t | 1
            cnt1 = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
            t = tl.where(cnt1 >= k, cand, t)
    else:
        for b in tl.static_range(KEY_BITS - 1, -1, -1):
            cand = t | (1 << b)
            cnt1 = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
            t = tl.where(cnt1 >= k, cand, t)
    gt = key > t[:, None]
    need = k - tl.sum(gt.to(tl.int32), axis=1)
    eq = key == t[:, None]
    if LAZY_TIES:
        n_eq = tl.sum(eq.to(tl.int32), axis=1)
        if tl.max((need < n_eq).to(tl.int32), axis=0) > 0:
            rank = tl.cumsum(eq.to(tl.int32), axis=1)
            keep = gt | (eq & (rank <= need[:, None]))
        else:
            keep = gt | eq
    else:
        rank = tl.cumsum(eq.to(tl.int32), axis=1)
        keep = gt | (eq & (rank <= need[:, None]))
    return keep


@triton.jit
def _topk_rows_kernel(
    x_ptr, y_ptr, mask_ptr, q_ptr, scale_ptr, absmax_ptr, idx_ptr, vals_ptr,
    R, D, k, rows_per_token, eps,
    KEY_BITS: tl.constexpr,
    DO_TOPK: tl.constexpr,
    WRITE_Y: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    QUANT: tl.constexpr,  # 0: none, 1: fake-quant into y, 2: int8 codes into q + scale per row,
    #                       3: the codes as floats into y (y's dtype) + scale per row (BitNet training)
    HAS_ABSMAX: tl.constexpr,
    IS_BF16: tl.constexpr,
    TWO_BITS: tl.constexpr,
    WRITE_IDX: tl.constexpr,  # compacted kept list: idx [R, k] int32 and vals [R, k] (y, or q if QUANT == 2)
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LAZY_TIES: tl.constexpr = False,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    inb = rmask[:, None] & (cols < D)[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    if DO_TOPK:
        keep = topk_keep(x, inb, k, KEY_BITS, BLOCK_R, TWO_BITS, LAZY_TIES)
    else:
        keep = inb
    zero = tl.zeros_like(x)
    y = tl.where(keep, x, zero)
    if WRITE_MASK:
        tl.store(mask_ptr + offs, keep.to(tl.uint8), mask=inb)
    if WRITE_IDX:
        slot = rows[:, None] * k + tl.cumsum(keep.to(tl.int32), axis=1) - 1
        kept = keep & inb
        tl.store(idx_ptr + slot, cols[None, :] + tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.int32), mask=kept)
    if QUANT == 0:
        if WRITE_IDX:
            tl.store(vals_ptr + slot, y, mask=kept)
        if WRITE_Y:
            tl.store(y_ptr + offs, y, mask=inb)
    else:
        yf = y.to(tl.float32)
        if HAS_ABSMAX:
            m = tl.load(absmax_ptr + rows // rows_per_token, mask=rmask, other=1.0).to(tl.float32)
        else:
            m = tl.max(tl.abs(yf), axis=1)
        s = tl.math.div_rn(tl.maximum(m, eps), 127.0)
        v = _round_half_even(tl.math.div_rn(yf, s[:, None]))
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        if QUANT == 1:
            deq = _to_dtype(v * s[:, None], y.dtype, IS_BF16)
            tl.store(y_ptr + offs, deq, mask=inb)
        elif QUANT == 3:
            tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=inb)  # |v| <= 128: exact
            tl.store(scale_ptr + rows, s, mask=rmask)
        else:
            if WRITE_IDX:
                tl.store(vals_ptr + slot, v.to(tl.int8), mask=kept)
            else:
                tl.store(q_ptr + offs, v.to(tl.int8), mask=inb)
            tl.store(scale_ptr + rows, s, mask=rmask)


@triton.jit
def _topk_rows_swar_kernel(
    x_ptr, y_ptr, mask_ptr, scale_ptr, R, W, k, eps,
    WRITE_Y: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    QUANT: tl.constexpr,  # 0, or 3 (bf16 only): the codes as bf16 into y + scale per row
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """16-bit rows of even width read as ``W`` 32-bit words (two features each); the bisection of
    :func:`topk_keep` on both halves of a word at once (SWAR).  With the guard bit set,
    ``g = (w & 0x7FFF7FFF) | 0x80008000``, and ``c2 = c·0x00010001`` (``1 <= c <= 0x7FFF``),
    ``g - c2`` never borrows across the halves and bit 15 of each half is set iff that half's key
    ``>= c``: ``((g - c2) >> 15) & 0x00010001`` counts both halves in one integer (16 bits each; a
    row has < 2^16 features).  Per candidate: 3 integer operations per word instead of 2-3 per
    feature.  Ties: keep ``key > t`` and the first ``need`` keys ``== t`` in index order (low half
    first), the scan only when some row needs it."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    rmask = rows < R
    inb = rmask[:, None] & (cols < W)[None, :]
    offs = rows[:, None].to(tl.int64) * W + cols[None, :]
    w = tl.load(x_ptr + offs, mask=inb, other=0)
    g = (w & 0x7FFF7FFF) | -2147450880  # 0x80008000 as int32; pad words: keys 0, never counted
    t = tl.zeros([BLOCK_R], dtype=tl.int32)
    for b in tl.static_range(14, -1, -1):
        cand = t | (1 << b)
        flags = ((g - cand[:, None] * 65537) >> 15) & 65537
        cnt = tl.sum(flags, axis=1)
        t = tl.where((cnt & 0xFFFF) + ((cnt >> 16) & 0xFFFF) >= k, cand, t)
    # ge: key >= t (t may be 0: pad words masked); gt: key >= t + 1 (t + 1 <= 0x8000 never borrows)
    ge = tl.where(inb, ((g - t[:, None] * 65537) >> 15) & 65537, 0)
    gt = ((g - (t + 1)[:, None] * 65537) >> 15) & 65537
    eq = ge ^ gt
    n_gt = tl.sum(gt, axis=1)
    n_eq = tl.sum(eq, axis=1)
    need = k - ((n_gt & 0xFFFF) + ((n_gt >> 16) & 0xFFFF))
    have = (n_eq & 0xFFFF) + ((n_eq >> 16) & 0xFFFF)
    if tl.max((need < have).to(tl.int32), axis=0) > 0:
        e_lo = eq & 1
        e_hi = (eq >> 16) & 1
        incl = tl.cumsum(e_lo + e_hi, axis=1)
        rank_lo = incl - e_hi  # ties up to and including the low half, in index order
        keep_lo = e_lo * (rank_lo <= need[:, None]).to(tl.int32)
        keep_hi = e_hi * (incl <= need[:, None]).to(tl.int32)
        kf = gt | keep_lo | (keep_hi << 16)
    else:
        kf = ge
    ymask = kf * 0xFFFF  # 0x0000FFFF / 0xFFFF0000 / both per kept half
    if WRITE_MASK:
        mbase = mask_ptr + rows[:, None].to(tl.int64) * (2 * W) + 2 * cols[None, :]
        tl.store(mbase, (kf & 1).to(tl.uint8), mask=inb)
        tl.store(mbase + 1, ((kf >> 16) & 1).to(tl.uint8), mask=inb)
    if QUANT == 0:
        if WRITE_Y:
            tl.store(y_ptr + offs, w & ymask, mask=inb)
    else:
        yw = w & ymask
        lo = (yw << 16).to(tl.float32, bitcast=True)
        hi = (yw & -65536).to(tl.float32, bitcast=True)
        m = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))
        sc = tl.math.div_rn(tl.maximum(m, eps), 127.0)
        sb = tl.zeros_like(lo) + sc[:, None]
        v_lo = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(lo, sb)), -128.0), 127.0)
        v_hi = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(hi, sb)), -128.0), 127.0)
        # |v| <= 128 is exact in bf16: its float32 bits have 16 zero low bits
        code = ((v_hi.to(tl.int32, bitcast=True) & -65536)
                | ((v_lo.to(tl.int32, bitcast=True) >> 16) & 0xFFFF))
        tl.store(y_ptr + offs, code, mask=inb)
        tl.store(scale_ptr + rows, sc, mask=rmask)


#: Radix steps of 2 bits (``True``) or 1 bit (``False``); ``None`` = default (1 bit).
#: tools/bench_kernels.py times both.
TWO_BITS_OVERRIDE: bool | None = None


def _two_bits(rows: int, d: int) -> bool:
    if TWO_BITS_OVERRIDE is not None:
        return TWO_BITS_OVERRIDE
    return False  # measured on an H200: 2-bit steps were slower for 1 row and for 8192 rows


def _config(rows: int, d: int) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(triton.next_power_of_2(rows), 4096 // block_d))
    num_warps = max(1, min(16, block_r * block_d // 512))
    return block_r, block_d, num_warps


TUNE_MIN_ROWS = 4096
"""From this many rows (training batches) the launch shape (rows per program, warps) is autotuned per
row width on the GPU; fewer rows (decode) and the interpreter use :func:`_config`."""


def _prune_tune_configs(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D") or named_args.get("BLOCK_D")
    kept = [c for c in configs if 128 <= c.kwargs["BLOCK_R"] * block_d <= 16384
            and c.num_warps * 32 <= c.kwargs["BLOCK_R"] * block_d]
    return kept or configs[:1]


_topk_rows_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_R": r}, num_warps=w)
             for r, w in ((1, 2), (1, 4), (1, 8), (1, 16), (2, 4), (2, 8), (2, 16), (4, 4), (4, 8), (8, 8),
                          (16, 4), (32, 4), (64, 4), (128, 4), (128, 8))],
    key=["D", "BLOCK_D", "QUANT", "WRITE_MASK"],
    prune_configs_by={"early_config_prune": _prune_tune_configs},
)(_topk_rows_kernel)


_topk_rows_swar_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_R": r}, num_warps=w)
             for r, w in ((1, 2), (1, 8), (128, 4))],  # the H200's best per width (2026-11-29 sweep)
    key=["W", "BLOCK_W", "QUANT", "WRITE_MASK"],
    prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: [
        c for c in configs if 64 <= c.kwargs["BLOCK_R"] * (kw.get("BLOCK_W") or named_args["BLOCK_W"]) <= 8192
        and c.num_warps * 32 <= c.kwargs["BLOCK_R"] * (kw.get("BLOCK_W") or named_args["BLOCK_W"])] or configs[:1]},
)(_topk_rows_swar_kernel)

LAZY_TIES_MIN_ROWS = TUNE_MIN_ROWS
"""From this many rows the bisection kernel ranks ties only when they straddle a threshold
(``topk_keep(LAZY_TIES=True)``); below (decode), the unconditional scan as before."""

SELECT_OVERRIDE: str | None = None
"""Force the selection kernel where both apply: ``"bisect"`` (:func:`topk_keep`, one feature per
lane) or ``"swar"`` (:func:`_topk_rows_swar_kernel`, two 16-bit keys per 32-bit word).  ``None``:
swar wherever it applies (16-bit rows of even width, no compacted list, no per-token absmax;
measured faster at every training shape on the H200), else bisect.  Tests and tools/bench_kernels.py
set it."""


def _families(d: int, k: int | None, quant: int, write_idx: bool, has_absmax: bool,
              key_bits: int = 15, is_bf16: bool = True) -> list[str]:
    """Selection kernels that can compute this launch (both give the identical mask)."""
    fams = ["bisect"]
    if k is None or k >= d or write_idx or has_absmax or quant == 2:
        return fams
    if d % 2 == 0 and d >= 16 and key_bits == 15 and (quant == 0 or (quant == 3 and is_bf16)):
        fams.append("swar")
    return fams


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(x2d, k, y, mask, q, scale, absmax, idx, vals, write_y, write_mask, quant, rows_per_token, eps,
            write_idx) -> None:
    r, d = x2d.shape
    do_topk = k is not None and k < d
    key_bits = _KEY_BITS[x2d.dtype]
    mask_u8 = mask.view(torch.uint8) if write_mask else mask
    training = r >= TUNE_MIN_ROWS and not _interpreting()
    is_bf16 = x2d.dtype == torch.bfloat16
    fams = _families(d, k, quant, write_idx, absmax is not None, key_bits, is_bf16)
    if "swar" in fams and (x2d.data_ptr() % 4 or y.data_ptr() % 4):
        fams.remove("swar")
    fam = SELECT_OVERRIDE if SELECT_OVERRIDE in fams else fams[-1]
    if fam == "swar":
        wd = d // 2
        args = (x2d.view(torch.int32), y.view(torch.int32) if (write_y or quant == 3) else x2d.view(torch.int32),
                mask_u8, scale, r, wd, k, eps)
        flags = dict(WRITE_Y=write_y, WRITE_MASK=write_mask, QUANT=quant, BLOCK_W=triton.next_power_of_2(wd))
        if training:
            _topk_rows_swar_kernel_tuned[lambda meta: (triton.cdiv(r, meta["BLOCK_R"]),)](*args, **flags)
        else:
            block_r = max(1, min(triton.next_power_of_2(r), 2048 // flags["BLOCK_W"]))
            _topk_rows_swar_kernel[(triton.cdiv(r, block_r),)](
                *args, **flags, BLOCK_R=block_r, num_warps=max(1, min(8, block_r * flags["BLOCK_W"] // 256)))
        return
    block_r, block_d, num_warps = _config(r, d)
    args = (x2d, y, mask_u8, q, scale, absmax if absmax is not None else x2d, idx, vals,
            r, d, k if do_topk else d, rows_per_token, eps)
    flags = dict(KEY_BITS=key_bits, DO_TOPK=do_topk, WRITE_Y=write_y, WRITE_MASK=write_mask,
                 QUANT=quant, HAS_ABSMAX=absmax is not None, IS_BF16=is_bf16, TWO_BITS=_two_bits(r, d),
                 WRITE_IDX=write_idx, BLOCK_D=block_d, LAZY_TIES=r >= LAZY_TIES_MIN_ROWS)
    if training and not write_idx:
        _topk_rows_kernel_tuned[lambda meta: (triton.cdiv(r, meta["BLOCK_R"]),)](*args, **flags)
    else:
        _topk_rows_kernel[(triton.cdiv(r, block_r),)](*args, **flags, BLOCK_R=block_r, num_warps=num_warps)


def topk_rows(
    x2d: torch.Tensor,
    k: int | None,
    *,
    write_y: bool = True,
    write_mask: bool = False,
    quant: int = 0,
    absmax: torch.Tensor | None = None,
    rows_per_token: int = 1,
    eps: float = ACT_EPS,
    write_idx: bool = False,
) -> dict[str, torch.Tensor]:
    """Launch the kernel on a contiguous ``[R, D]`` tensor; ``k=None`` keeps every feature.

    Returns a dict with the requested outputs: ``y`` (dtype of ``x``; fake-quantized when
    ``quant=1``; with ``quant=3`` the int8 codes as floats of :func:`~qsparse_dist.ops.quant.code_dtype`,
    BitNet's ``X_q``), ``mask`` (bool), ``q`` (int8, ``quant=2``) and ``scale`` (float32 ``[R]``,
    ``quant`` 2 or 3).
    ``write_idx`` (needs ``k < D``): the compacted kept features of every row in index order,
    ``idx`` int32 ``[R, k]`` and ``vals`` ``[R, k]`` (the kept values, or their int8 codes with
    ``quant=2``, which then replace ``q``): the input of the gather GEMVs.
    """
    if x2d.dim() != 2 or not x2d.is_contiguous():
        raise ValueError(f"x2d must be a contiguous 2-D tensor, got shape {tuple(x2d.shape)}")
    if x2d.dtype not in _KEY_BITS:
        raise ValueError(f"x dtype must be one of {list(_KEY_BITS)}, got {x2d.dtype}")
    if quant not in (0, 1, 2, 3):
        raise ValueError(f"quant must be 0, 1, 2 or 3, got {quant!r}")
    r, d = x2d.shape
    out: dict[str, torch.Tensor] = {}
    if quant == 3:
        y = torch.empty((r, d), dtype=code_dtype(x2d.dtype), device=x2d.device)
    else:
        y = torch.empty_like(x2d) if (write_y or quant == 1) else x2d
    mask = torch.empty((r, d), dtype=torch.bool, device=x2d.device) if write_mask else x2d
    q = torch.empty((r, d), dtype=torch.int8, device=x2d.device) if quant == 2 else x2d
    scale = torch.empty((r,), dtype=torch.float32, device=x2d.device) if quant in (2, 3) else x2d
    if write_idx:
        if k is None or k >= d:
            raise ValueError(f"write_idx needs top-K (k < D), got k={k}, D={d}")
        idx = torch.empty((r, k), dtype=torch.int32, device=x2d.device)
        vals = torch.empty((r, k), dtype=torch.int8 if quant == 2 else x2d.dtype, device=x2d.device)
        q = x2d if quant == 2 else q
    else:
        idx = vals = x2d
    if r > 0:
        _launch(x2d, k, y, mask, q, scale, absmax, idx, vals, write_y, write_mask, quant, rows_per_token, eps,
                write_idx)
    if write_y or quant in (1, 3):
        out["y"] = y
    if write_mask:
        out["mask"] = mask
    if quant == 3:
        out["scale"] = scale
    if quant == 2:
        out["scale"] = scale
        if not write_idx:
            out["q"] = q
    if write_idx:
        out["idx"], out["vals"] = idx, vals
    return out


def _rows_view(x: torch.Tensor, sparsity: float, block_size: int | None) -> tuple[torch.Tensor, int]:
    d = x.shape[-1] if block_size is None else block_size
    return x.contiguous().reshape(-1, d), kept_count(d, sparsity)


def topk_mask_triton(x: torch.Tensor, sparsity: float, *, block_size: int | None = None) -> torch.Tensor:
    """Same as :func:`qsparse_dist.ops.topk_mask` (bool, identical tie rule)."""
    x2d, k = _rows_view(x.detach(), sparsity, block_size)
    return topk_rows(x2d, k, write_y=False, write_mask=True)["mask"].reshape(x.shape)


class _TopKSTE(torch.autograd.Function):
    """Forward: fused top-K (+ int8 fake-quant).  Backward: STE (identity) or the masked gradient."""

    @staticmethod
    def forward(ctx, x, sparsity, block_size, ste, quant):
        x2d, k = _rows_view(x, sparsity, block_size)
        absmax, rows_per_token = None, 1
        if quant and block_size is not None:  # absmax per token; the row max is always kept
            absmax = x.detach().abs().amax(dim=-1).reshape(-1).float()
            rows_per_token = x.shape[-1] // block_size
        res = topk_rows(x2d, k, write_y=True, write_mask=not ste, quant=1 if quant else 0,
                        absmax=absmax, rows_per_token=rows_per_token)
        ctx.ste = ste
        if not ste:
            ctx.save_for_backward(res["mask"].reshape(x.shape))
        return res["y"].reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        if ctx.ste:
            return grad, None, None, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def topk_sparsify_triton(
    x: torch.Tensor,
    sparsity: float,
    *,
    block_size: int | None = None,
    ste: bool = True,
    quantize: bool = False,
) -> torch.Tensor:
    """``x ⊙ M`` (``quantize=False``: :func:`qsparse_dist.ops.topk_sparsify` without rescale) or
    ``Q8(x ⊙ M)`` (``quantize=True``: ``fake_quant_activation_int8(topk_sparsify(x))``)."""
    return _TopKSTE.apply(x, sparsity, block_size, ste, quantize)


def quantize_rows_int8(
    x: torch.Tensor, sparsity: float | None = None, eps: float = ACT_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode input of the ternary GEMV: ``(x_q int8 [..., d], scale float32 [...])`` of
    ``x ⊙ M`` (top-K when ``sparsity`` is given and > 0), per-row absmax int8."""
    d = x.shape[-1]
    k = kept_count(d, sparsity) if sparsity else None
    res = topk_rows(x.contiguous().reshape(-1, d), k, write_y=False, quant=2, eps=eps)
    return res["q"].reshape(x.shape), res["scale"].reshape(x.shape[:-1])
