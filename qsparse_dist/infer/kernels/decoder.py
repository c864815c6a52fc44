"""A batch-1 decode step of :class:`~qsparse_dist.model.reference.QSparseGPT` built from the Triton
kernels, ready for CUDA-graph capture (``qsparse_dist.infer.cuda_graph.GraphedStep``).

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

from ...ops import LinearRecipe, kept_count, pack_ternary, quantize_weight_ternary
from ...ops.quant import ACT_EPS
from .gemv import GemvConfig, default_config, gather_gemv, sparse_gemv, ternary_gemv
from .select import radix_topk_keep
from .ternary_dp4a import default_k4_config, pack_k4, ternary_gemv_k4
from .topk import _round_f32_to_bf16, _round_half_even, topk_keep

__all__ = ["DecodeLinear", "KernelDecoder", "prologue"]

_ACTS = {"relu2glu": 1, "drelu": 2, "swiglu": 3}

#: Top-K selection of the prologue: radix select over 8-bit digits (:mod:`.select`, ``True``), the
#: bit-by-bit bisection shared with the training kernels (``False``), or ``None`` = by measurement
#: (H200, tools/bench_decode.py, docs/benchmarks.md): radix when the row is also int8-quantized
#: (bitnet_qsparse: 1.2x faster end to end at both shapes), bisection otherwise (qsparse: 1-2 % faster).
RADIX_SELECT: bool | None = None
#: Warps of the prologue kernel: ``None`` = one per 256 padded features, at most 8 up to 4096 features
#: and 16 above (H200, top-K prologue amortized: 8.6-9.0 µs with 8 warps vs 9.7-10.0 µs with 16 at 4096;
#: 16 best at 14336); an int; or ``(warps for d <= 8192, warps above)`` (tools/bench_decode.py knob).
PROLOGUE_WARPS: int | tuple[int, int] | None = None


def _prologue_warps(d: int) -> int:
    pw = PROLOGUE_WARPS
    if isinstance(pw, tuple):
        pw = pw[0] if d <= 8192 else pw[1]
    block = triton.next_power_of_2(d)
    return pw or max(1, min(8 if block <= 4096 else 16, block // 256))


@triton.jit
def _prologue_kernel(
    in_ptr, res_ptr, normw_ptr, y_ptr, q_ptr, s_ptr, idx_ptr,
    D, k, in_stride, norm_eps, q_eps,
    ADD_RES: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, DO_TOPK: tl.constexpr,
    QUANT: tl.constexpr, IS_BF16: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_IDX: tl.constexpr,  # batch 1: write the kept list (idx, values or codes) for gather_gemv
    RADIX: tl.constexpr = True,  # select with 8-bit-digit histograms (2 passes bf16) instead of bit bisection
):
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
    if DO_TOPK:
        if RADIX:
            keep = radix_topk_keep(xr, inb, k, KEY_BITS)[None, :]
        else:
            keep = topk_keep(xt, inb[None, :], k, KEY_BITS, 1)
        xt = tl.where(keep, xt, tl.zeros_like(xt))
        if WRITE_IDX:
            kept = keep & inb[None, :]
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
    radix: bool | None = None,
) -> None:
    """Fused row op writing the next projection's input into ``out`` (or int8 codes into ``q_out``).

    ``inp [B, d]`` (``[B, 2d]`` = [gate ‖ up] with ``act``); ``residual`` float32 ``[B, d]``:
    with ``add_residual`` it becomes ``residual + inp`` (stored) before the norm, without it and
    without ``act`` the input is read as is.  ``k``: keep the top-k ``|x|`` (None = all).
    ``idx_out`` (batch 1, with ``k``): int32 ``[k]`` kept indices; ``out`` / the codes of
    ``q_out`` then receive the ``k`` kept values in that order (compacted, for ``gather_gemv``).
    """
    bsz = inp.shape[0]
    if act is not None and act not in _ACTS:
        raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
    q, s = q_out if q_out is not None else (out, out)
    radix = RADIX_SELECT if radix is None else radix
    radix = (q_out is not None if radix is None else radix) and d < 32768  # radix counts are packed in 16 bits
    do_topk = k is not None and k < d
    _prologue_kernel[(bsz,)](
        inp, residual if residual is not None else inp, norm_weight if norm_weight is not None else inp,
        out, q, s, idx_out if idx_out is not None else out, d, k if do_topk else d, inp.stride(0), norm_eps, ACT_EPS,
        ADD_RES=add_residual, NORM=norm_weight is not None, ACT=_ACTS[act] if act else 0,
        DO_TOPK=do_topk, QUANT=q_out is not None, IS_BF16=out.dtype == torch.bfloat16,
        KEY_BITS=15 if out.dtype in (torch.bfloat16, torch.float16) else 31,
        BLOCK_D=triton.next_power_of_2(d), WRITE_IDX=idx_out is not None and do_topk, RADIX=radix,
        num_warps=_prologue_warps(d),
    )


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr,
    NH, NG, max_len,
    HD: tl.constexpr,
):
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
):
    """One query head, keys 0..pos of its KV group, online softmax (flash-decoding, no split)."""
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


class DecodeLinear:
    """One projection at decode time, from the latent weight ``[N, K]`` and its recipe.

    dense: cuBLAS on ``W`` (output in the activation dtype); qsparse: :func:`sparse_gemv` on
    ``Wᵀ`` (or :func:`gather_gemv` on the kept list); bitnet / bitnet_qsparse: ``ternary="k4"``
    (default) :func:`~.ternary_dp4a.ternary_gemv_k4` (dp4a over 4 inputs per byte), ``"float"`` the
    float-decoding :func:`ternary_gemv` / ternary :func:`gather_gemv` on feature-major codes.
    The caller provides the input already sparsified (and int8-quantized for BitNet).
    """

    def __init__(self, weight: torch.Tensor, recipe: LinearRecipe, dtype: torch.dtype,
                 config: GemvConfig | None = None, gather: bool = True, ternary: str = "k4") -> None:
        if recipe.block_size is not None:
            raise ValueError("N:M (block_size) projections are not supported by the kernel decoder")
        if ternary not in ("k4", "float"):
            raise ValueError(f"ternary must be 'k4' (dp4a kernel) or 'float' (float decoding), got {ternary!r}")
        self.recipe = recipe
        self.out_features, self.in_features = weight.shape
        self.k = kept_count(self.in_features, recipe.sparsity) if recipe.uses_topk else None
        self.mode = "ternary" if recipe.quantized else ("sparse" if recipe.uses_topk else "dense")
        if self.mode == "ternary" and ternary == "k4" and self.in_features % 4 == 0:
            self.mode = "ternary_k4"
        w = weight.detach()
        self.config = config
        if self.mode == "dense":
            self.w = w.to(dtype).contiguous()
        elif self.mode == "sparse":
            self.wt = w.to(dtype).t().contiguous()
        else:
            w_q, s = quantize_weight_ternary(w)
            if self.mode == "ternary_k4":
                self.p4 = pack_k4(pack_ternary(w_q))
            else:
                self.wt_packed = pack_ternary(w_q.t().contiguous())
            self.w_scale = s.reshape(()).to(w.device)
        # batch 1 with top-K: loop over the compacted kept list (work ∝ kept features)
        self.gather = gather and self.k is not None and (
            self.mode == "sparse" or (self.mode == "ternary" and self.out_features % 16 == 0))
        if self.mode == "ternary_k4" and config is None:
            self.config = default_k4_config(self.in_features, self.out_features, w.device)
        elif self.mode in ("sparse", "ternary") and config is None:
            self.config = default_config(self.k if self.gather else self.in_features, self.out_features, 1,
                                         w.device, ternary=self.mode == "ternary")

    @property
    def quantized_input(self) -> bool:
        return self.mode.startswith("ternary")

    def __call__(self, x, out: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` float32 ``[B, N]`` slice, zeroed beforehand (split-K adds into it).  With
        ``self.gather``, ``x`` holds the compacted kept values (or codes) and ``idx`` their indices."""
        if self.gather:
            if self.mode == "sparse":
                return gather_gemv(x, idx, self.wt, self.out_features, config=self.config, out=out,
                                   out_is_zeroed=True)
            q, s = x
            return gather_gemv(q, idx, self.wt_packed, self.out_features, x_scale=s, w_scale=self.w_scale,
                               config=self.config, out=out, out_is_zeroed=True)
        if self.mode == "dense":
            return F.linear(x, self.w)
        if self.mode == "ternary_k4":
            q, s = x
            return ternary_gemv_k4(q, s, self.p4, self.w_scale, skip_zeros=self.k is not None, config=self.config,
                                   out=out, out_is_zeroed=True)
        if self.mode == "sparse":
            return sparse_gemv(x, self.wt, config=self.config, out=out, out_is_zeroed=True)
        q, s = x
        return ternary_gemv(q, s, self.wt_packed, self.w_scale, self.out_features, skip_zeros=self.k is not None,
                            config=self.config, out=out, out_is_zeroed=True)


class KernelDecoder:
    """Batch-1 greedy decode of a dense-FFN :class:`QSparseGPT` with the Triton kernels.

    ``step(token [1] int64, pos [1] int64) -> logits [1, V]`` (float32) reads and writes only
    preallocated buffers, so ``GraphedStep(decoder.step, (token, pos))`` captures it.
    """

    def __init__(self, model, max_len: int, *, dense: bool = False, dtype: torch.dtype | None = None,
                 configs: dict[str, GemvConfig] | None = None, gather: bool = True, radix: bool | None = None,
                 ternary: str = "k4") -> None:
        m, sp = model.config, model.sparsity
        self.radix = radix
        if m.moe is not None:
            raise ValueError("KernelDecoder supports dense-FFN models only (model.moe is set)")
        if getattr(m, "qkv_bias", False):
            raise ValueError("KernelDecoder does not support model.qkv_bias yet")
        dev = model.embed.weight.device
        self.dtype = dtype or model.embed.weight.dtype
        self.nh, self.ng, self.hd, self.h = m.num_attention_heads, m.query_groups, m.head_dim, m.hidden_size
        self.ffn, self.act, self.eps, self.max_len = m.ffn_size, m.ffn_activation, m.norm_eps, max_len
        configs = configs or {}
        recipes = {p: (LinearRecipe() if dense else sp.recipe(p)) for p in ("qkv", "out", "up", "down")}
        self.embed = model.embed.weight.detach().to(self.dtype)
        head = model.embed.weight if model.lm_head is None else model.lm_head.weight
        self.lm_head = head.detach().to(self.dtype).contiguous()
        self.final_norm = model.final_norm.weight.detach().float()
        self.layers = []
        for blk in model.layers:
            self.layers.append({
                "attn_norm": blk.attn_norm.weight.detach().float(),
                "ffn_norm": blk.ffn_norm.weight.detach().float(),
                "qkv": DecodeLinear(blk.attn.qkv.weight, recipes["qkv"], self.dtype, configs.get("qkv"), gather, ternary),
                "out": DecodeLinear(blk.attn.out.weight, recipes["out"], self.dtype, configs.get("out"), gather, ternary),
                "fc1": DecodeLinear(blk.ffn.fc1.weight, recipes["up"], self.dtype, configs.get("up"), gather, ternary),
                "fc2": DecodeLinear(blk.ffn.fc2.weight, recipes["down"], self.dtype, configs.get("down"), gather, ternary),
            })
        nqkv = (self.nh + 2 * self.ng) * self.hd
        sizes = [nqkv, self.h, 2 * self.ffn, self.h]
        self.workspace = torch.zeros(len(self.layers), sum(sizes), device=dev, dtype=torch.float32)
        self.outs = [dict(zip(("qkv", "out", "fc1", "fc2"), ws.split(sizes))) for ws in self.workspace]
        self.residual = torch.zeros(1, self.h, device=dev, dtype=torch.float32)
        width = max(self.h, self.ffn, self.nh * self.hd)
        self.act_buf = torch.zeros(1, width, device=dev, dtype=self.dtype)
        self.q_buf = torch.zeros(1, width, device=dev, dtype=torch.int8)
        self.s_buf = torch.zeros(1, device=dev, dtype=torch.float32)
        self.idx_buf = torch.zeros(width, device=dev, dtype=torch.int32)
        self.q_rot = torch.zeros(self.nh * self.hd, device=dev, dtype=torch.float32)
        self.attn_out = torch.zeros(1, self.nh * self.hd, device=dev, dtype=self.dtype)
        cache_dtype = self.dtype
        self.k_cache = torch.zeros(len(self.layers), self.ng, max_len, self.hd, device=dev, dtype=cache_dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        from ...model.reference import rope_cache

        self.cos, self.sin = (t.contiguous() for t in rope_cache(max_len, self.hd, m.rope_theta, dev))

    def _input(self, lin: DecodeLinear, d: int, **kw):
        """Prologue for ``lin``'s input; returns what ``lin`` takes (and the kept indices)."""
        y = self.act_buf[:, :d]
        idx = self.idx_buf[: lin.k] if lin.gather else None
        if lin.quantized_input:
            q = self.q_buf[:, :d]
            prologue(kw.pop("inp"), y, d=d, k=lin.k, q_out=(q, self.s_buf), idx_out=idx, radix=self.radix, **kw)
            return ((q[0, : lin.k] if lin.gather else q), self.s_buf), idx
        prologue(kw.pop("inp"), y, d=d, k=lin.k, idx_out=idx, radix=self.radix, **kw)
        return (y[0, : lin.k] if lin.gather else y), idx

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.workspace.zero_()
        self.residual.copy_(self.embed.index_select(0, token).float())
        h, prev = self.h, None
        for i, (lay, outs) in enumerate(zip(self.layers, self.outs)):
            if prev is None:
                x, idx = self._input(lay["qkv"], h, inp=self.residual, norm_weight=lay["attn_norm"],
                                     norm_eps=self.eps)
            else:
                x, idx = self._input(lay["qkv"], h, inp=prev, residual=self.residual, add_residual=True,
                                     norm_weight=lay["attn_norm"], norm_eps=self.eps)
            qkv = lay["qkv"](x, outs["qkv"].view(1, -1), idx)
            _rope_cache_kernel[(self.nh + 2 * self.ng,)](
                qkv, self.q_rot, self.k_cache[i], self.v_cache[i], self.cos, self.sin, pos,
                self.nh, self.ng, self.max_len, HD=self.hd, num_warps=1)
            _decode_attention_kernel[(self.nh,)](
                self.q_rot, self.k_cache[i], self.v_cache[i], self.attn_out, pos,
                self.nh // self.ng, self.max_len, 1.0 / math.sqrt(self.hd), HD=self.hd, BLOCK_T=64, num_warps=4)
            x, idx = self._input(lay["out"], self.nh * self.hd, inp=self.attn_out)
            a = lay["out"](x, outs["out"].view(1, -1), idx)
            x, idx = self._input(lay["fc1"], h, inp=a, residual=self.residual, add_residual=True,
                                 norm_weight=lay["ffn_norm"], norm_eps=self.eps)
            f = lay["fc1"](x, outs["fc1"].view(1, -1), idx)
            x, idx = self._input(lay["fc2"], self.ffn, inp=f, act=self.act)
            prev = lay["fc2"](x, outs["fc2"].view(1, -1), idx)
        y = self.act_buf[:, :h]
        prologue(prev, y, d=h, residual=self.residual, add_residual=True, norm_weight=self.final_norm,
                 norm_eps=self.eps)
        return F.linear(y, self.lm_head).float()

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
