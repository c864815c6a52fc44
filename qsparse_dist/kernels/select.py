"""Exact top-K selection of one row in a few passes: radix select over 8-bit digits with histograms.

The decode prologue (:mod:`.decoder`) holds one activation row in registers and needs the mask of its
``k`` largest ``|x|``.  :func:`~.topk.topk_keep` settles one bit of the threshold per row reduction
(15 dependent reductions for bf16, 31 for fp32); here each pass settles 8 bits with one histogram:

    key  = bits of |x| as a non-negative integer (15 bits for bf16/fp16, 31 for fp32)
    pass p: among the keys whose higher digits equal the prefix found so far, histogram the next
            digit d (256 bins; the last digit of a 15/31-bit key has 7 bits, 128 bins) and take the
            largest d with  above + #{digit >= d} >= k  (``above`` = keys already known to be larger)

so ``t`` (the k-th largest key) is found in 2 passes for 16-bit floats and 4 for float32, with no
power-of-two padding of the selection itself (rows < 32768 features: counts are packed in 16 bits).  Ties: keep ``key > t`` plus the first
``k - #(key > t)`` keys equal to ``t`` in index order, exactly :func:`qsparse_dist.ops.topk_mask`'s
rule; the cumulative sum that ranks the ties runs only when ties straddle the threshold.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["radix_topk_keep"]


@triton.jit
def _digit_step(key, sel, total, shift: tl.constexpr, bits: tl.constexpr, above, k):
    """One radix pass over the ``total`` selected keys: returns (digit d*, #keys known larger than
    prefix·d*, #selected keys with digit d*).  Three reductions over the bins and one scan."""
    nb: tl.constexpr = 1 << bits
    dig = (key >> shift) & (nb - 1)
    h = tl.histogram(dig, nb, mask=sel)
    bins = tl.arange(0, nb)
    gt = total - tl.cumsum(h, axis=0)  # #{digit > bin}; #{digit >= bin} = gt + h (non-increasing)
    d = tl.sum((above + gt + h >= k).to(tl.int32), axis=0) - 1
    packed = tl.sum(tl.where(bins == d, (gt << 16) | h, 0), axis=0)  # counts < 2^15
    return d, above + (packed >> 16), packed & 0xFFFF


@triton.jit
def radix_topk_keep(x, inb, k, KEY_BITS: tl.constexpr):
    """Keep-mask of the top-``k`` ``|x|`` of the 1-D row ``x`` (``inb`` marks real elements); the
    same mask as :func:`qsparse_dist.ops.topk_mask` (ties to the lowest index).  ``k >= 1``."""
    if KEY_BITS == 15:
        key = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        d1, above, n1 = _digit_step(key, inb, tl.sum(inb.to(tl.int32), axis=0), 7, 8, 0, k)
        sel = inb & ((key >> 7) == d1)
        d0, above, n_eq = _digit_step(key, sel, n1, 0, 7, above, k)
        t = (d1 << 7) | d0
    else:
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        d3, above, n3 = _digit_step(key, inb, tl.sum(inb.to(tl.int32), axis=0), 23, 8, 0, k)
        sel = inb & ((key >> 23) == d3)
        d2, above, n2 = _digit_step(key, sel, n3, 15, 8, above, k)
        sel = sel & (((key >> 15) & 255) == d2)
        d1, above, n1 = _digit_step(key, sel, n2, 7, 8, above, k)
        sel = sel & (((key >> 7) & 255) == d1)
        d0, above, n_eq = _digit_step(key, sel, n1, 0, 7, above, k)
        t = (d3 << 23) | (d2 << 15) | (d1 << 7) | d0
    need = k - above  # ties at t to keep, 1 <= need <= n_eq
    gt = inb & (key > t)
    eq = inb & (key == t)
    if need >= n_eq:
        keep = gt | eq
    else:
        rank = tl.cumsum(eq.to(tl.int32), axis=0)
        keep = gt | (eq & (rank <= need))
    return keep


@triton.jit
def _radix_topk_rows_kernel(x_ptr, mask_ptr, D, k, KEY_BITS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    inb = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=inb, other=0.0)
    keep = radix_topk_keep(x, inb, k, KEY_BITS)
    tl.store(mask_ptr + row * D + cols, keep.to(tl.int8), mask=inb)


def radix_topk_mask(x2d, k: int):
    """Test/bench entry: bool mask of the top-``k`` ``|x|`` of each row of a contiguous ``[R, D]``."""
    import torch

    r, d = x2d.shape
    out = torch.empty((r, d), dtype=torch.int8, device=x2d.device)
    bits = 31 if x2d.dtype == torch.float32 else 15
    _radix_topk_rows_kernel[(r,)](x2d, out, d, k, KEY_BITS=bits, BLOCK_D=triton.next_power_of_2(d),
                                  num_warps=max(1, min(16, triton.next_power_of_2(d) // 256)))
    return out.bool()
