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
or the real int8 codes and scales for the decode GEMV kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.quant import ACT_EPS
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
def topk_keep(x, inb, k, KEY_BITS: tl.constexpr, BLOCK_R: tl.constexpr, TWO_BITS: tl.constexpr = False):
    """Boolean keep-mask of the top-``k`` ``|x|`` of every row of the 2-D tile ``x`` (``inb`` marks
    real elements): radix bisection on the bits of ``|x|``, ties to the lowest index.

    ``TWO_BITS``: settle two bits per step (three candidate counts packed in one int64 sum, 21
    bits each; rows < 2^21), halving the number of row reductions, the latency of a single row."""
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
    rank = tl.cumsum(eq.to(tl.int32), axis=1)
    return gt | (eq & (rank <= need[:, None]))


@triton.jit
def _topk_rows_kernel(
    x_ptr, y_ptr, mask_ptr, q_ptr, scale_ptr, absmax_ptr, idx_ptr, vals_ptr,
    R, D, k, rows_per_token, eps,
    KEY_BITS: tl.constexpr,
    DO_TOPK: tl.constexpr,
    WRITE_Y: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    QUANT: tl.constexpr,  # 0: none, 1: fake-quant into y, 2: int8 codes into q + scale per row
    HAS_ABSMAX: tl.constexpr,
    IS_BF16: tl.constexpr,
    TWO_BITS: tl.constexpr,
    WRITE_IDX: tl.constexpr,  # compacted kept list: idx [R, k] int32 and vals [R, k] (y, or q if QUANT == 2)
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    inb = rmask[:, None] & (cols < D)[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    if DO_TOPK:
        keep = topk_keep(x, inb, k, KEY_BITS, BLOCK_R, TWO_BITS)
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
        else:
            if WRITE_IDX:
                tl.store(vals_ptr + slot, v.to(tl.int8), mask=kept)
            else:
                tl.store(q_ptr + offs, v.to(tl.int8), mask=inb)
            tl.store(scale_ptr + rows, s, mask=rmask)


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


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    ``quant=1``), ``mask`` (bool), ``q`` (int8) and ``scale`` (float32 ``[R]``) when ``quant=2``.
    ``write_idx`` (needs ``k < D``): the compacted kept features of every row in index order,
    ``idx`` int32 ``[R, k]`` and ``vals`` ``[R, k]`` (the kept values, or their int8 codes with
    ``quant=2``, which then replace ``q``): the input of the gather GEMVs.
    """
    if x2d.dim() != 2 or not x2d.is_contiguous():
        raise ValueError(f"x2d must be a contiguous 2-D tensor, got shape {tuple(x2d.shape)}")
    if x2d.dtype not in _KEY_BITS:
        raise ValueError(f"x dtype must be one of {list(_KEY_BITS)}, got {x2d.dtype}")
    if quant not in (0, 1, 2):
        raise ValueError(f"quant must be 0, 1 or 2, got {quant!r}")
    r, d = x2d.shape
    out: dict[str, torch.Tensor] = {}
    y = torch.empty_like(x2d) if (write_y or quant == 1) else x2d
    mask = torch.empty((r, d), dtype=torch.bool, device=x2d.device) if write_mask else x2d
    q = torch.empty((r, d), dtype=torch.int8, device=x2d.device) if quant == 2 else x2d
    scale = torch.empty((r,), dtype=torch.float32, device=x2d.device) if quant == 2 else x2d
    if write_idx:
        if k is None or k >= d:
            raise ValueError(f"write_idx needs top-K (k < D), got k={k}, D={d}")
        idx = torch.empty((r, k), dtype=torch.int32, device=x2d.device)
        vals = torch.empty((r, k), dtype=torch.int8 if quant == 2 else x2d.dtype, device=x2d.device)
        q = x2d if quant == 2 else q
    else:
        idx = vals = x2d
    if r == 0:
        pass
    else:
        block_r, block_d, num_warps = _config(r, d)
        do_topk = k is not None and k < d
        args = (x2d, y, mask.view(torch.uint8) if write_mask else mask, q, scale,
                absmax if absmax is not None else x2d, idx, vals,
                r, d, k if do_topk else d, rows_per_token, eps)
        flags = dict(KEY_BITS=_KEY_BITS[x2d.dtype], DO_TOPK=do_topk, WRITE_Y=write_y, WRITE_MASK=write_mask,
                     QUANT=quant, HAS_ABSMAX=absmax is not None,
                     IS_BF16=x2d.dtype == torch.bfloat16, TWO_BITS=_two_bits(r, d), WRITE_IDX=write_idx,
                     BLOCK_D=block_d)
        if r >= TUNE_MIN_ROWS and not write_idx and not _interpreting():
            _topk_rows_kernel_tuned[lambda meta: (triton.cdiv(r, meta["BLOCK_R"]),)](*args, **flags)
        else:
            _topk_rows_kernel[(triton.cdiv(r, block_r),)](*args, **flags, BLOCK_R=block_r, num_warps=num_warps)
    if write_y or quant == 1:
        out["y"] = y
    if write_mask:
        out["mask"] = mask
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
