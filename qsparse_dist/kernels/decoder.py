"""The kernels of a batch-1 decode step of :class:`~qsparse_dist.model.reference.QSparseGPT`; the step
itself (buffers, layer loop, CUDA-graph ready) is assembled by
:class:`qsparse_dist.infer.backends.decoder.KernelDecoder`.

Per layer, 10 launches, every shape static, every position read from a device tensor::

    prologue(+residual, RMSNorm, top-K[, int8])  -> qkv GEMV -> RoPE + KV-cache write -> attention
    prologue(top-K[, int8])                      -> out GEMV
    prologue(+residual, RMSNorm, top-K[, int8])  -> fc1 GEMV
    prologue(GLU activation, top-K[, int8])      -> fc2 GEMV       (its residual add: next prologue)

The prologue kernel holds one activation row in registers and fuses the residual add, the norm or
the GLU activation, the Q-Sparse top-K of the next projection's input (``topk_keep``, identical
selection to the training kernels) and, for BitNet projections, the per-token int8 quantization.
Projections run :func:`~.gemv.sparse_gemv` (Q-Sparse: zero rows skipped), :func:`~.gemv.ternary_gemv`
(BitNet, 2-bit packed weights) or cuBLAS (``F.linear``) for dense ones; ``dense=True`` builds the
same model with every projection dense, the baseline of ``tools/bench_decode.py``.  GEMV outputs
are float32 slices of one workspace zeroed once per step (split-K accumulates into it).
The residual stream is float32.  MoE and N:M (block) projections are not supported here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..ops import LinearRecipe, kept_count, pack_ternary_weight, to_feature_major
from ..ops.quant import ACT_EPS
from .gemv import GemvConfig, default_config, gather_gemv, sparse_gemv, ternary_gemv
from .hist_gemv import (
    default_hist_config,
    hist_accumulate,
    hist_sparse_gemv,
    hist_ternary_k4,
    hist_ternary_k16,
)
from .pdl import grid_dependency_wait, launch_kwargs
from .select import radix_topk_keep, swar_topk_keep, swar_topk_slots
from .ternary_dp4a import (
    default_k4_config,
    default_k16_config,
    pack_k4,
    pack_k16,
    ternary_gemv_k4,
    ternary_gemv_k16,
    tile_counters,
)
from .topk import _round_f32_to_bf16, _round_half_even, topk_keep

__all__ = ["DecodeLinear", "prologue", "rope_kv_write", "decode_attention"]

_ACTS = {"relu2glu": 1, "drelu": 2, "swiglu": 3}

#: Top-K selection of the prologue (all give the mask of ``ops.topk_mask``): ``"bisect"`` the bit-by-bit
#: bisection shared with the training kernels, ``"radix"`` radix select over 8-bit digits
#: (:func:`.select.radix_topk_keep`), ``"swar"`` the bisection on two 16-bit keys per word with the
#: kept list's slots from one scan (:func:`.select.swar_topk_slots`; 16-bit rows only), or ``None`` = by
#: measurement (H200, tools/bench_prologue.py, docs/benchmarks.md): ``swar`` for bf16/fp16 rows (8B
#: widths, with the kept list, µs per call: 4096 features 8.6 / 8.9 bisect / radix -> 5.6, 14336 27.1 /
#: 31.5 -> 13.5; int8-coded rows 15.3 / 12.3 -> 8.5 and 54.7 / 41.0 -> 22.7), for float32 rows radix
#: when int8-quantized and bisection otherwise (first session).
SELECT: str | None = None
_SELECT_CODES = {"bisect": 0, "radix": 1, "swar": 2}


def _select_code(select: str | None, d: int, quantized: bool, sixteen_bit: bool) -> int:
    """The prologue's ``SELECT`` constexpr for a row of ``d`` features."""
    select = SELECT if select is None else select
    if select is not None and select not in _SELECT_CODES:
        raise ValueError(f"select must be one of {sorted(_SELECT_CODES)} or None, got {select!r}")
    if select == "swar" and not sixteen_bit:
        select = None
    if select is None:
        select = "swar" if sixteen_bit else ("radix" if quantized else "bisect")
    if select == "radix" and d >= 32768:  # radix counts are packed in 16 bits
        select = "bisect"
    return _SELECT_CODES[select]


#: Warps of the prologue kernel: ``None`` = by measurement (H200, tools/bench_prologue.py): one per 256
#: padded features, at most 8 up to 4096 features and 16 above; with the swar select at most 8 for
#: bf16/fp16 rows (fewer warps, cheaper row sums: 14336 features 13.5 / 13.8 µs with 8 / 16 warps, 4096
#: 5.6 / 6.2) and at most 16 for int8-coded rows (4096: 8.9 / 8.5 µs, 14336: 29.8 / 22.7 µs with 8 / 16);
#: an int; or ``(warps for d <= 8192, warps above)`` (tools/bench_decode.py knob).
PROLOGUE_WARPS: int | tuple[int, int] | None = None


def _prologue_warps(d: int, select: int = 0, quant: bool = False) -> int:
    pw = PROLOGUE_WARPS
    if isinstance(pw, tuple):
        pw = pw[0] if d <= 8192 else pw[1]
    block = triton.next_power_of_2(d)
    if select == _SELECT_CODES["swar"]:
        cap = 16 if quant else 8
    else:
        cap = 8 if block <= 4096 else 16
    return pw or max(1, min(cap, block // 256))


@triton.jit
def _prologue_kernel(
    in_ptr, res_ptr, normw_ptr, y_ptr, q_ptr, s_ptr, idx_ptr, hist_ptr,
    D, k, in_stride, norm_eps, q_eps,
    ADD_RES: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, DO_TOPK: tl.constexpr,
    QUANT: tl.constexpr, IS_BF16: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_IDX: tl.constexpr,  # batch 1: write the kept list (idx, values or codes) for gather_gemv
    SELECT: tl.constexpr = 1,  # 0 bit bisection, 1 radix (8-bit-digit histograms), 2 SWAR bisection (16-bit rows)
    HIST: tl.constexpr = False,  # no selection here: write the whole row, add its keys to hist (.hist_gemv)
    PDL: tl.constexpr = 0,  # launched with programmatic dependent launch (.pdl): wait first
):
    grid_dependency_wait(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    inb = cols < D
    base = in_ptr + row * in_stride
    if ACT > 0:
        g = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
        u = tl.load(base + D + cols, mask=inb, other=0.0).to(tl.float32)
        if ACT == 1:
            r = tl.maximum(g, 0.0)
            x = u * (r * r)  # the reference's order, up * relu(gate)²: bit-identical, ties stay ties
        elif ACT == 2:
            x = tl.maximum(g, 0.0) * tl.maximum(u, 0.0)
        else:
            x = g / (1.0 + tl.exp(-g)) * u
    else:
        x = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
        if ADD_RES:
            x = x + tl.load(res_ptr + row * D + cols, mask=inb, other=0.0)
            tl.store(res_ptr + row * D + cols, x, mask=inb)
        if NORM:
            ms = tl.sum(x * x, axis=0) / D
            w = tl.load(normw_ptr + cols, mask=inb, other=0.0).to(tl.float32)
            x = x * (1.0 / tl.sqrt(ms + norm_eps)) * w
    if IS_BF16:
        x = _round_f32_to_bf16(x)
    xr = x.to(y_ptr.dtype.element_ty)  # exact: already rounded to the activation dtype
    xt = xr[None, :]
    if HIST:
        hist_accumulate(xr, inb, hist_ptr)
    if DO_TOPK:
        if SELECT == 2 and WRITE_IDX:  # mask and kept-list slots from one scan
            keep1, slot1 = swar_topk_slots(xr, inb, k, BLOCK_D)
            keep = keep1[None, :]
            slot = slot1[None, :]
        elif SELECT == 2:
            keep = swar_topk_keep(xr, inb, k, BLOCK_D)[None, :]
        elif SELECT == 1:
            keep = radix_topk_keep(xr, inb, k, KEY_BITS)[None, :]
        else:
            keep = topk_keep(xt, inb[None, :], k, KEY_BITS, 1)
        xt = tl.where(keep, xt, tl.zeros_like(xt))
        if WRITE_IDX:
            kept = keep & inb[None, :]
            if SELECT != 2:
                slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1
            tl.store(idx_ptr + slot, cols[None, :] + tl.zeros([1, BLOCK_D], dtype=tl.int32), mask=kept)
    if QUANT:
        yf = xt.to(tl.float32)
        m = tl.max(tl.abs(yf), axis=1)
        s = tl.math.div_rn(tl.maximum(m, q_eps), 127.0)
        v = _round_half_even(tl.math.div_rn(yf, s[:, None]))
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        if WRITE_IDX:
            tl.store(q_ptr + slot, v.to(tl.int8), mask=kept)
        else:
            tl.store(q_ptr + row * D + cols[None, :], v.to(tl.int8), mask=inb[None, :])
        tl.store(s_ptr + row + tl.arange(0, 1), s)
        if HIST:  # the GEMV selects on the 16-bit row's keys
            tl.store(y_ptr + row * D + cols[None, :], xt, mask=inb[None, :])
    else:
        if WRITE_IDX:
            tl.store(y_ptr + slot, xt, mask=kept)
        else:
            tl.store(y_ptr + row * D + cols[None, :], xt, mask=inb[None, :])


def prologue(
    inp: torch.Tensor,
    out: torch.Tensor,
    *,
    d: int,
    k: int | None = None,
    residual: torch.Tensor | None = None,
    add_residual: bool = False,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
    act: str | None = None,
    q_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    idx_out: torch.Tensor | None = None,
    select: str | None = None,
    hist_out: torch.Tensor | None = None,
) -> None:
    """Fused row op writing the next projection's input into ``out`` (or int8 codes into ``q_out``).

    ``inp [B, d]`` (``[B, 2d]`` = [gate ‖ up] with ``act``); ``residual`` float32 ``[B, d]``:
    with ``add_residual`` it becomes ``residual + inp`` (stored) before the norm, without it and
    without ``act`` the input is read as is.  ``k``: keep the top-k ``|x|`` (None = all).
    ``idx_out`` (batch 1, with ``k``): int32 ``[k]`` kept indices; ``out`` / the codes of
    ``q_out`` then receive the ``k`` kept values in that order (compacted, for ``gather_gemv``).
    ``hist_out`` (batch 1, 16-bit ``out``, instead of ``k``): no selection here — the whole row (its
    int8 codes) is written and its keys are added into the zeroed int32 histogram ``hist_out``
    (:mod:`.hist_gemv`, whose GEMVs select).
    """
    bsz = inp.shape[0]
    if act is not None and act not in _ACTS:
        raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
    q, s = q_out if q_out is not None else (out, out)
    sel = _select_code(select, d, q_out is not None, out.dtype in (torch.bfloat16, torch.float16))
    do_topk = k is not None and k < d
    if hist_out is not None:
        if bsz != 1 or out.dtype not in (torch.bfloat16, torch.float16) or do_topk or idx_out is not None:
            raise ValueError("hist_out needs batch 1, a bf16/fp16 row and no k / idx_out (the GEMV selects)")
    _prologue_kernel[(bsz,)](
        inp, residual if residual is not None else inp, norm_weight if norm_weight is not None else inp,
        out, q, s, idx_out if idx_out is not None else out, hist_out if hist_out is not None else out, d,
        k if do_topk else d, inp.stride(0), norm_eps, ACT_EPS,
        ADD_RES=add_residual, NORM=norm_weight is not None, ACT=_ACTS[act] if act else 0,
        DO_TOPK=do_topk, QUANT=q_out is not None, IS_BF16=out.dtype == torch.bfloat16,
        KEY_BITS=15 if out.dtype in (torch.bfloat16, torch.float16) else 31,
        BLOCK_D=triton.next_power_of_2(d), WRITE_IDX=idx_out is not None and do_topk, SELECT=sel,
        HIST=hist_out is not None, num_warps=_prologue_warps(d, sel if do_topk else 0, q_out is not None), **launch_kwargs(inp.device),
    )


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr,
    NH, NG, max_len,
    HD: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    grid_dependency_wait(PDL)
    h = tl.program_id(0)
    pos = tl.load(pos_ptr)
    half = tl.arange(0, HD // 2)
    if h < NH + NG:
        x1 = tl.load(qkv_ptr + h * HD + half).to(tl.float32)
        x2 = tl.load(qkv_ptr + h * HD + HD // 2 + half).to(tl.float32)
        c = tl.load(cos_ptr + pos * HD + half)
        s = tl.load(sin_ptr + pos * HD + half)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        if h < NH:
            tl.store(q_out_ptr + h * HD + half, o1)
            tl.store(q_out_ptr + h * HD + HD // 2 + half, o2)
        else:
            dst = k_cache_ptr + ((h - NH) * max_len + pos) * HD
            tl.store(dst + half, o1.to(k_cache_ptr.dtype.element_ty))
            tl.store(dst + HD // 2 + half, o2.to(k_cache_ptr.dtype.element_ty))
    else:
        g = h - NH - NG
        d = tl.arange(0, HD)
        v = tl.load(qkv_ptr + (NH + NG) * HD + g * HD + d)
        tl.store(v_cache_ptr + (g * max_len + pos) * HD + d, v.to(v_cache_ptr.dtype.element_ty))


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, pos_ptr,
    GROUP, max_len, sm_scale,
    HD: tl.constexpr, BLOCK_T: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """One query head, keys 0..pos of its KV group, online softmax (flash-decoding, no split)."""
    grid_dependency_wait(PDL)
    h = tl.program_id(0)
    g = h // GROUP
    length = tl.load(pos_ptr) + 1
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + h * HD + d).to(tl.float32) * sm_scale
    m = tl.full([], -1e30, tl.float32)
    l_sum = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HD], dtype=tl.float32)
    for start in range(0, length, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        tm = t < length
        offs = (g * max_len + t[:, None]) * HD + d[None, :]
        kt = tl.load(k_cache_ptr + offs, mask=tm[:, None], other=0.0).to(tl.float32)
        sc = tl.where(tm, tl.sum(kt * q[None, :], axis=1), -1e30)
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        p = tl.where(tm, tl.exp(sc - m_new), 0.0)
        alpha = tl.exp(m - m_new)
        vt = tl.load(v_cache_ptr + offs, mask=tm[:, None], other=0.0).to(tl.float32)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        m = m_new
    tl.store(out_ptr + h * HD + d, (acc / l_sum).to(out_ptr.dtype.element_ty))


def rope_kv_write(qkv: torch.Tensor, q_rot: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, nh: int, ng: int) -> None:
    """Rotate the ``nh`` query and ``ng`` key heads of the fused ``qkv`` row at position ``pos`` (device
    int64 ``[1]``) into ``q_rot`` / ``k_cache[:, pos]`` and copy the values to ``v_cache[:, pos]``."""
    max_len, hd = k_cache.shape[-2], k_cache.shape[-1]
    _rope_cache_kernel[(nh + 2 * ng,)](qkv, q_rot, k_cache, v_cache, cos, sin, pos, nh, ng, max_len, HD=hd,
                                       num_warps=1, **launch_kwargs(qkv.device))


def decode_attention(q_rot: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                     pos: torch.Tensor, nh: int, ng: int) -> None:
    """``out[h] = softmax(q_h · K[:pos+1]ᵀ / √hd) · V[:pos+1]`` per query head (its KV group ``h·ng/nh``)."""
    max_len, hd = k_cache.shape[-2], k_cache.shape[-1]
    _decode_attention_kernel[(nh,)](q_rot, k_cache, v_cache, out, pos, nh // ng, max_len, 1.0 / math.sqrt(hd),
                                    HD=hd, BLOCK_T=64, num_warps=4, **launch_kwargs(q_rot.device))


class DecodeLinear:
    """One projection at decode time, from the latent weight ``[N, K]`` and its recipe.

    dense: cuBLAS on ``W`` (output in the activation dtype); qsparse: :func:`sparse_gemv` on
    ``Wᵀ`` (or :func:`gather_gemv` on the kept list); bitnet / bitnet_qsparse: ``ternary="k16"``
    (default; K % 16 == 0, else "k4") :func:`~.ternary_dp4a.ternary_gemv_k16` (16 pre-permuted codes
    per word, 1.4-1.7x faster than "k4" on the H200 at the 8B shapes), ``"k4"``
    :func:`~.ternary_dp4a.ternary_gemv_k4` (dp4a over 4 inputs per byte), ``"float"`` the
    float-decoding :func:`ternary_gemv` / ternary :func:`gather_gemv` on feature-major codes.
    The caller provides the input already sparsified (and int8-quantized for BitNet); with ``hist``
    (16-bit rows, top-K projections) the whole row and its key histogram instead (:mod:`.hist_gemv`:
    the GEMV selects; opt-in, slower on the H200, docs/kernels.md).
    """

    def __init__(self, weight: torch.Tensor, recipe: LinearRecipe, dtype: torch.dtype,
                 config: GemvConfig | None = None, gather: bool = True, ternary: str = "k16",
                 hist: bool = False) -> None:
        if recipe.block_size is not None:
            raise ValueError("N:M (block_size) projections are not supported by the kernel decoder")
        if ternary not in ("k4", "k16", "float"):
            raise ValueError(f"ternary must be 'k4' / 'k16' (dp4a kernels) or 'float' (float decoding), got {ternary!r}")
        self.recipe = recipe
        self.out_features, self.in_features = weight.shape
        self.k = kept_count(self.in_features, recipe.sparsity) if recipe.uses_topk else None
        self.mode = "ternary" if recipe.quantized else ("sparse" if recipe.uses_topk else "dense")
        if self.mode == "ternary" and ternary == "k16" and self.in_features % 16 == 0:
            self.mode = "ternary_k16"
        elif self.mode == "ternary" and ternary in ("k4", "k16") and self.in_features % 4 == 0:
            self.mode = "ternary_k4"
        w = weight.detach()
        self.config = config
        if self.mode == "dense":
            self.w = w.to(dtype).contiguous()
        elif self.mode == "sparse":
            self.wt = w.to(dtype).t().contiguous()
        else:
            packed = pack_ternary_weight(w)  # absmean codes, [N, ceil(K/4)]
            if self.mode == "ternary_k16":
                self.p16 = pack_k16(packed.packed, self.in_features)
            elif self.mode == "ternary_k4":
                self.p4 = pack_k4(packed.packed)
            else:
                self.wt_packed = to_feature_major(packed.packed, self.in_features)
            self.w_scale = packed.scale.to(w.device)
            tile_counters(w.device, 1)  # split-K arrival counters exist before any CUDA-graph capture
        # top-K selected inside the GEMV from the prologue's key histogram (16-bit rows; .hist_gemv)
        self.hist = (hist and self.k is not None and dtype in (torch.bfloat16, torch.float16)
                     and self.mode in ("sparse", "ternary_k4", "ternary_k16"))
        # batch 1 with top-K: loop over the compacted kept list (work ∝ kept features)
        self.gather = not self.hist and gather and self.k is not None and (
            self.mode == "sparse" or (self.mode == "ternary" and self.out_features % 16 == 0))
        if self.mode == "ternary_k16" and config is None:
            self.config = default_k16_config(self.in_features, self.out_features, w.device)
        elif self.hist and config is None:
            self.config = default_hist_config(self.in_features, self.out_features, w.device,
                                              ternary=self.mode == "ternary_k4")
        elif self.mode == "ternary_k4" and config is None:
            self.config = default_k4_config(self.in_features, self.out_features, w.device)
        elif self.mode in ("sparse", "ternary") and config is None:
            self.config = default_config(self.k if self.gather else self.in_features, self.out_features, 1,
                                         w.device, ternary=self.mode == "ternary")

    @property
    def quantized_input(self) -> bool:
        return self.mode.startswith("ternary")

    def __call__(self, x, out: torch.Tensor, idx: torch.Tensor | None = None, hist: torch.Tensor | None = None,
                 zero_hist: torch.Tensor | None = None, row: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` float32 ``[B, N]`` slice, zeroed beforehand (split-K adds into it).  With
        ``self.gather``, ``x`` holds the compacted kept values (or codes) and ``idx`` their indices;
        with ``self.hist``, ``x`` is the whole row (ternary: its int8 codes and scale, ``row`` the
        16-bit row), ``hist`` its key histogram, ``zero_hist`` the buffer to zero for the next prologue."""
        if self.hist:
            if self.mode == "sparse":
                return hist_sparse_gemv(x, hist, self.k, self.wt, config=self.config, out=out, out_is_zeroed=True,
                                        zero_hist=zero_hist)
            q, s = x
            fn, p = (hist_ternary_k16, self.p16) if self.mode == "ternary_k16" else (hist_ternary_k4, self.p4)
            return fn(row, q, s, hist, self.k, p, self.w_scale, config=self.config, out=out, out_is_zeroed=True,
                      zero_hist=zero_hist)
        if self.gather:
            if self.mode == "sparse":
                return gather_gemv(x, idx, self.wt, self.out_features, config=self.config, out=out,
                                   out_is_zeroed=True)
            q, s = x
            return gather_gemv(q, idx, self.wt_packed, self.out_features, x_scale=s, w_scale=self.w_scale,
                               config=self.config, out=out, out_is_zeroed=True)
        if self.mode == "dense":
            return F.linear(x, self.w)
        if self.mode == "ternary_k16":
            q, s = x
            return ternary_gemv_k16(q, s, self.p16, self.w_scale, skip_zeros=self.k is not None, config=self.config,
                                    out=out, out_is_zeroed=True)
        if self.mode == "ternary_k4":
            q, s = x
            return ternary_gemv_k4(q, s, self.p4, self.w_scale, skip_zeros=self.k is not None, config=self.config,
                                   out=out, out_is_zeroed=True)
        if self.mode == "sparse":
            return sparse_gemv(x, self.wt, config=self.config, out=out, out_is_zeroed=True)
        q, s = x
        return ternary_gemv(q, s, self.wt_packed, self.w_scale, self.out_features, skip_zeros=self.k is not None,
                            config=self.config, out=out, out_is_zeroed=True)
