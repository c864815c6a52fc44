"""Exact top-K selection of one row held by one program: radix select over 8-bit digits with
histograms (:func:`radix_topk_keep`), or bisection on two 16-bit keys per word (:func:`swar_topk_keep`,
:func:`swar_topk_slots` with the compacted list's slots from one scan; the decode default for 16-bit
rows, measured fastest on the H200: tools/bench_prologue.py).

The decode prologue (:mod:`.decoder`) holds one activation row in registers and needs the mask of its
``k`` largest ``|x|``.  :func:`~.topk.topk_keep` settles one bit of the threshold per row reduction
(15 dependent reductions for bf16, 31 for fp32); the radix select settles 8 bits per pass with one
histogram:

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

__all__ = ["radix_topk_keep", "swar_topk_keep", "swar_topk_slots"]


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
def _swar_threshold(xr, inb, k, BLOCK_D: tl.constexpr):
    """Pack the 15-bit keys of the 16-bit row ``xr`` two per word and find the k-th largest key ``t``:

        word = key[2i] | key[2i+1] << 16,   g = word | 0x80008000   (a guard bit above each key)
        ((g - c·0x00010001) >> 15) & 0x00010001  = [key_lo >= c] + [key_hi >= c] << 16   (1 <= c <= 0x7FFF)

    so one integer sum per bisection step counts both halves of every word (counts < 2^15 each).
    Returns ``(ge, gt)`` per word: bit 0 / bit 16 = low / high key ``>= t`` (real elements only) and
    ``> t``, and ``need = k - #(key > t)``, the number of keys equal to ``t`` to keep."""
    key = xr.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    key = tl.where(inb, key, 0)  # pads: key 0 never reaches a candidate c >= 1
    lo, hi = tl.split(tl.reshape(key, [BLOCK_D // 2, 2]))
    g = (lo | (hi << 16)) | -2147450880  # 0x80008000 as int32
    vlo, vhi = tl.split(tl.reshape(inb.to(tl.int32), [BLOCK_D // 2, 2]))
    t = 0
    for b in tl.static_range(14, -1, -1):
        cand = t | (1 << b)
        cnt = tl.sum(((g - cand * 65537) >> 15) & 65537, axis=0)
        t = tl.where((cnt & 0xFFFF) + (cnt >> 16) >= k, cand, t)
    # ge: key >= t (t may be 0: pads masked); gt: key >= t + 1 (t + 1 <= 0x8000 never borrows)
    ge = ((g - t * 65537) >> 15) & (vlo | (vhi << 16))
    gt = ((g - (t + 1) * 65537) >> 15) & 65537
    n_gt = tl.sum(gt, axis=0)
    return ge, gt, k - ((n_gt & 0xFFFF) + (n_gt >> 16))


@triton.jit
def _unpack_halves(lo, hi, BLOCK_D: tl.constexpr):
    """Per-word values of the low / high element back to one ``[BLOCK_D]`` row in index order."""
    return tl.reshape(tl.join(lo, hi), [BLOCK_D])


@triton.jit
def swar_topk_keep(xr, inb, k, BLOCK_D: tl.constexpr):
    """Keep-mask of the top-``k`` ``|x|`` of the 16-bit row ``xr [BLOCK_D]`` (bf16/fp16, ``BLOCK_D``
    even; ``inb`` marks real elements), the mask of :func:`qsparse_dist.ops.topk_mask` (ties to the
    lowest index): bisection on two keys per 32-bit word (:func:`_swar_threshold`), 15 dependent
    row sums, half the integer work of one key per lane; the tie-ranking scan only when ties
    straddle the threshold."""
    ge, gt, need = _swar_threshold(xr, inb, k, BLOCK_D)
    eq = ge ^ gt
    n_eq = tl.sum(eq, axis=0)
    if need < (n_eq & 0xFFFF) + (n_eq >> 16):  # ties straddle t: rank them in index order
        e_lo = eq & 1
        e_hi = (eq >> 16) & 1
        incl = tl.cumsum(e_lo + e_hi, axis=0)
        kf = gt | (e_lo & ((incl - e_hi) <= need).to(tl.int32)) | ((e_hi & (incl <= need).to(tl.int32)) << 16)
    else:
        kf = ge
    return _unpack_halves((kf & 1) != 0, (kf & 65536) != 0, BLOCK_D)


@triton.jit
def swar_topk_slots(xr, inb, k, BLOCK_D: tl.constexpr):
    """:func:`swar_topk_keep` plus each kept element's slot in the compacted kept list (index order),
    from ONE scan over the words instead of a tie-ranking scan and a compaction scan over elements:
    kept up to element i = #(key > t up to i) + min(#(key == t up to i), need), the kept ties being
    the first ``need``; both counts come from one inclusive scan of ``#gt + #eq << 16`` per word.
    Returns ``(keep, slot)``; ``slot`` is meaningful where ``keep``."""
    ge, gt, need = _swar_threshold(xr, inb, k, BLOCK_D)
    eq = ge ^ gt
    gt_lo = gt & 1
    gt_hi = gt >> 16
    eq_lo = eq & 1
    eq_hi = (eq >> 16) & 1
    packed = gt_lo + gt_hi + ((eq_lo + eq_hi) << 16)  # per-row totals < 2^15 each: no carry
    excl = tl.cumsum(packed, axis=0) - packed
    n_gt = (excl & 0xFFFF) + gt_lo  # inclusive counts at the low element
    n_eq = (excl >> 16) + eq_lo
    keep_lo = (gt_lo | (eq_lo & (n_eq <= need).to(tl.int32))) != 0
    slot_lo = n_gt + tl.minimum(n_eq, need) - 1
    n_gt += gt_hi  # ... and at the high element
    n_eq += eq_hi
    keep_hi = (gt_hi | (eq_hi & (n_eq <= need).to(tl.int32))) != 0
    slot_hi = n_gt + tl.minimum(n_eq, need) - 1
    return _unpack_halves(keep_lo, keep_hi, BLOCK_D), _unpack_halves(slot_lo, slot_hi, BLOCK_D)


@triton.jit
def _radix_topk_rows_kernel(x_ptr, mask_ptr, D, k, KEY_BITS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    inb = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=inb, other=0.0)
    keep = radix_topk_keep(x, inb, k, KEY_BITS)
    tl.store(mask_ptr + row * D + cols, keep.to(tl.int8), mask=inb)


@triton.jit
def _swar_topk_rows_kernel(x_ptr, mask_ptr, slot_ptr, D, k, BLOCK_D: tl.constexpr, SLOTS: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    inb = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=inb, other=0.0)
    if SLOTS:
        keep, slot = swar_topk_slots(x, inb, k, BLOCK_D)
        tl.store(slot_ptr + row * D + cols, tl.where(keep, slot, -1), mask=inb)
    else:
        keep = swar_topk_keep(x, inb, k, BLOCK_D)
    tl.store(mask_ptr + row * D + cols, keep.to(tl.int8), mask=inb)


def swar_topk_mask(x2d, k: int, slots: bool = False):
    """Test/bench entry of :func:`swar_topk_keep` (``slots``: :func:`swar_topk_slots`): bool mask of the
    top-``k`` ``|x|`` of each row of a contiguous 16-bit ``[R, D]`` (and, with ``slots``, the int32
    slot of every kept element in its row's kept list, -1 elsewhere)."""
    import torch

    r, d = x2d.shape
    out = torch.empty((r, d), dtype=torch.int8, device=x2d.device)
    slot = torch.empty((r, d), dtype=torch.int32, device=x2d.device)
    block = max(2, triton.next_power_of_2(d))
    _swar_topk_rows_kernel[(r,)](x2d, out, slot, d, k, BLOCK_D=block, SLOTS=slots,
                                 num_warps=max(1, min(8, block // 512)))
    return (out.bool(), slot) if slots else out.bool()


def radix_topk_mask(x2d, k: int):
    """Test/bench entry: bool mask of the top-``k`` ``|x|`` of each row of a contiguous ``[R, D]``."""
    import torch

    r, d = x2d.shape
    out = torch.empty((r, d), dtype=torch.int8, device=x2d.device)
    bits = 31 if x2d.dtype == torch.float32 else 15
    _radix_topk_rows_kernel[(r,)](x2d, out, d, k, KEY_BITS=bits, BLOCK_D=triton.next_power_of_2(d),
                                  num_warps=max(1, min(16, triton.next_power_of_2(d) // 256)))
    return out.bool()
