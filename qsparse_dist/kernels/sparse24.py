"""Block Q-Sparse 2:4 on sparse tensor cores: ``Y = (X ⊙ M) Wᵀ`` with the activation as the
2:4-sparse operand of a semi-structured sparse matmul.

**The mask.**  ``M`` is Block Q-Sparse with ``block_size=4`` and 50 % sparsity — exactly
``qsparse_dist.ops.topk_mask(x, 0.5, block_size=4)``: in every group of 4 consecutive features keep the 2
of largest ``|x|``, ties to the lower index.  For group ``(a0, a1, a2, a3)`` entry ``i`` is kept iff
fewer than two entries beat it, where ``j`` beats ``i`` when ``a_j > a_i`` or (``a_j == a_i`` and
``j < i``).  (NaN is treated as +inf.)

**The product.**  ``X`` is ``tokens × K`` and the 2:4 groups run along ``K``, the reduction dim of
``X Wᵀ``, so ``X ⊙ M`` is the first (sparse) operand ``A`` of ``A·B`` with ``B = Wᵀ`` (a column-major
view of ``W``, no copy).  Two torch backends:

* ``cslt`` (cuSPARSELt): our Triton kernel writes ``X ⊙ M``, ``torch._cslt_compress`` packs it
  (cuSPARSELt's layout is opaque, so this pass cannot be fused), ``torch._cslt_sparse_mm`` multiplies.
* ``cutlass`` (sm8x only: torch's CUTLASS sparse GEMM refuses Hopper): ONE Triton pass writes ``X ⊙ M`` (kept for the weight gradient), the packed values
  ``[tokens, K/2]`` and the int16 metadata in CUTLASS's reordered layout (the layout of
  ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``: 2 bits per
  kept index, 4 groups per int16, ``ColumnMajorInterleaved<2>`` reordering);
  ``torch._sparse_semi_structured_mm`` multiplies.

**Backward** (straight-through, as the dense masked path):
``dX = dY·W`` (dense; the STE does not mask it) and ``dW = dYᵀ·(X ⊙ M)`` — dense too: that product
reduces over the *tokens*, and the 2:4 groups of ``X ⊙ M`` run along ``K``, so neither ``X ⊙ M`` nor
its transpose is a 2:4 operand along the tokens (re-sparsifying ``(X ⊙ M)ᵀ`` to 2:4 along the tokens
would drop further values — a different gradient; ``tools/bench_sparse24.py`` times what that GEMM
would gain).

cuSPARSELt's algorithm id matters (its default is not the fastest for every shape): the first call
for a shape times ids ``0..`` (:func:`cslt_alg`, a few launches each, cached per shape) unless
``QSPARSE_SPARSE24_ALG`` fixes one.

Measured on the H200 (torch 2.11, ``tools/bench_sparse24.py``, docs/ops.md): the selection runs at ~3 TB/s
(5× the generic top-K kernel on blocks of 4, so the ops dispatch uses it for every 2-of-4
``topk_sparsify``), but ``_cslt_compress`` costs 0.6–2 ms per activation, more than the dense GEMM, and
torch's CUTLASS sparse GEMM runs on sm8x only — the layers therefore use the sparse matmul only with
``sparsity.sparse_tensor_cores="on"``.

Entry points: :func:`sparse24_mask_dense` (``X ⊙ M``), :func:`sparse24_sparsify_ste` (the same with the
STE), :func:`sparse24_compress_cutlass`
(``X ⊙ M``, packed, meta), :func:`sparse24_linear` (the autograd op), :func:`sparse24_supported`.
Backend choice: ``QSPARSE_SPARSE24_BACKEND=cslt|cutlass`` (default :data:`DEFAULT_BACKEND`).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["sparse24_sparsify_ste", "cslt_alg", "DEFAULT_BACKEND", "MIN_CAPABILITY", "sparse24_backend", "sparse24_mask_dense",
           "sparse24_compress_cutlass", "sparse24_linear", "sparse24_supported", "sparse24_shape_ok",
           "sparse24_mm"]

DEFAULT_BACKEND = "cslt"
MIN_CAPABILITY = (8, 0)
"""Sparse tensor cores: Ampere (sm80) and later; Hopper (sm90) runs them through wgmma."""

_BLOCK_R = 32
_BLOCK_K = 128


@triton.jit
def _split4(v, BLOCK_R: tl.constexpr, G: tl.constexpr):
    """``[R, 4G]`` → the four ``[R, G]`` members ``(v0, v1, v2, v3)`` of each group of 4 columns."""
    v4 = tl.reshape(v, (BLOCK_R, G, 2, 2))  # [..., a, b] = member 2a + b
    ev, od = tl.split(v4)  # b = 0: [v0, v2]; b = 1: [v1, v3]
    v0, v2 = tl.split(ev)
    v1, v3 = tl.split(od)
    return v0, v1, v2, v3


@triton.jit
def _join4(v0, v1, v2, v3, BLOCK_R: tl.constexpr, W: tl.constexpr):
    """Inverse of :func:`_split4`: ``[R, G]`` × 4 → ``[R, W]`` with ``W = 4G``."""
    ev = tl.join(v0, v2)
    od = tl.join(v1, v3)
    return tl.reshape(tl.join(ev, od), (BLOCK_R, W))


@triton.jit
def _sparse24_kernel(x_ptr, xm_ptr, packed_ptr, meta_ptr, R, K, stride_x,
                     WRITE_PACKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    G: tl.constexpr = BLOCK_K // 4
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    rmask = rows[:, None] < R
    m = rmask & (cols[None, :] < K)
    r64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=m, other=0.0)
    a = tl.abs(x.to(tl.float32))
    a = tl.where(a != a, float("inf"), a)
    x0, x1, x2, x3 = _split4(x, BLOCK_R, G)
    a0, a1, a2, a3 = _split4(a, BLOCK_R, G)
    # number of group members that beat each one (greater, or equal at a lower index)
    c0 = (a1 > a0).to(tl.int32) + (a2 > a0).to(tl.int32) + (a3 > a0).to(tl.int32)
    c1 = (a0 >= a1).to(tl.int32) + (a2 > a1).to(tl.int32) + (a3 > a1).to(tl.int32)
    c2 = (a0 >= a2).to(tl.int32) + (a1 >= a2).to(tl.int32) + (a3 > a2).to(tl.int32)
    c3 = (a0 >= a3).to(tl.int32) + (a1 >= a3).to(tl.int32) + (a2 >= a3).to(tl.int32)
    k0, k1, k2, k3 = c0 < 2, c1 < 2, c2 < 2, c3 < 2
    zero = tl.zeros_like(x0)
    y = _join4(tl.where(k0, x0, zero), tl.where(k1, x1, zero), tl.where(k2, x2, zero),
               tl.where(k3, x3, zero), BLOCK_R, BLOCK_K)
    tl.store(xm_ptr + r64 * K + cols[None, :], y, mask=m)
    if WRITE_PACKED:
        # the two kept members in index order, and their indices (CUTLASS nibble idx0 | idx1 << 2)
        v0 = tl.where(k0, x0, tl.where(k1, x1, x2))
        v1 = tl.where(k3, x3, tl.where(k2, x2, x1))
        i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
        i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
        pcols = col0 // 2 + tl.arange(0, BLOCK_K // 2)
        pv = tl.reshape(tl.join(v0, v1), (BLOCK_R, BLOCK_K // 2))
        tl.store(packed_ptr + r64 * (K // 2) + pcols[None, :], pv, mask=rmask & (pcols[None, :] < K // 2))
        nib = i0 | (i1 << 2)
        C: tl.constexpr = BLOCK_K // 16
        n0, n1, n2, n3 = _split4(nib, BLOCK_R, C)
        meta = n0 | (n1 << 4) | (n2 << 8) | (n3 << 12)
        # CUTLASS reordering (torch.sparse._semi_structured_conversions._calculate_meta_reordering_
        # scatter_offsets, int16 meta): rows interleaved by 32/8, 2x2 swizzle, ColumnMajorInterleaved<2>
        mc = col0 // 16 + tl.arange(0, C)
        r = rows[:, None]
        c = mc[None, :]
        dr = r // 32 * 32 + (r % 8) * 4 + (r % 32) // 8
        swz = ((dr % 2 == 0) & (c % 2 == 1)).to(tl.int32) - ((dr % 2 == 1) & (c % 2 == 0)).to(tl.int32)
        dr = dr + swz
        dc = c - swz
        off = (dc // 2).to(tl.int64) * R * 2 + dr * 2 + dc % 2
        meta16 = (meta & 0xFFFF).to(tl.int16, bitcast=False)
        tl.store(meta_ptr + off, meta16, mask=rmask & (c < K // 16))


def sparse24_shape_ok(tokens: int, k: int) -> bool:
    """Shapes both backends take: ``K`` a multiple of 64 (CUTLASS bf16 tile; cuSPARSELt needs 16) and
    the token count a multiple of 32 (CUTLASS meta interleave; cuSPARSELt 16)."""
    return k % 64 == 0 and tokens % 32 == 0 and tokens > 0


def _launch(x2: torch.Tensor, write_packed: bool):
    r, k = x2.shape
    xm = torch.empty_like(x2)
    if xm.numel() == 0:
        return xm, xm.new_empty(r, k // 2), xm.new_empty(r, k // 16, dtype=torch.int16)
    if write_packed:
        packed = torch.empty(r, k // 2, dtype=x2.dtype, device=x2.device)
        meta = torch.empty(r, k // 16, dtype=torch.int16, device=x2.device)
    else:
        packed, meta = xm, xm
    grid = (triton.cdiv(r, _BLOCK_R), triton.cdiv(k, _BLOCK_K))
    _sparse24_kernel[grid](x2, xm, packed, meta, r, k, x2.stride(0), WRITE_PACKED=write_packed,
                           BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K, num_warps=4)
    return xm, packed, meta


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    if k % 4:
        raise ValueError(f"2:4 sparsity needs the feature dim divisible by 4, got {k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def sparse24_mask_dense(x: torch.Tensor) -> torch.Tensor:
    """``x ⊙ M`` (2:4, no autograd), same shape and dtype; one Triton pass."""
    return _launch(_as_rows(x), False)[0].view(x.shape)


class _MaskSTE24(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return sparse24_mask_dense(x)

    @staticmethod
    def backward(ctx, g):
        return g


def sparse24_sparsify_ste(x: torch.Tensor) -> torch.Tensor:
    """``x ⊙ M`` (2:4) with the straight-through backward — ``topk_sparsify(x, 0.5, block_size=4)``'s
    value through the 2:4 selection kernel (for the dense-GEMM path)."""
    return _MaskSTE24.apply(x)


def sparse24_compress_cutlass(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over 2-D ``x2 [R, K]`` (bf16/fp16, ``R % 32 == 0``, ``K % 64 == 0``):
    ``(x ⊙ M, packed [R, K/2], meta [R, K/16] int16)``, packed/meta in CUTLASS's layout."""
    r, k = x2.shape
    if r % 32 or k % 64 or x2.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"CUTLASS 2:4 layout needs bf16/fp16, rows % 32 == 0 and K % 64 == 0; got "
                         f"{tuple(x2.shape)} {x2.dtype}")
    return _launch(_as_rows(x2), True)


@functools.cache
def _device_ok(index: int) -> bool:
    if torch.cuda.get_device_capability(index) < MIN_CAPABILITY:
        return False
    return True


def sparse24_supported(device: torch.device, backend: str | None = None) -> bool:
    """True when ``device`` is a CUDA device with sparse tensor cores (sm80+) and the backend's torch
    op is usable (cuSPARSELt compiled in, for ``cslt``)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    backend = backend or sparse24_backend()
    if backend == "cslt" and not torch.backends.cusparselt.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if backend == "cutlass" and torch.cuda.get_device_capability(index)[0] != 8:
        return False  # torch's CUTLASS sparse GEMM: "Supported only on GPUs with compute capability 8.x"
    return _device_ok(index)


def sparse24_backend() -> str:
    """``QSPARSE_SPARSE24_BACKEND`` (``cslt`` | ``cutlass``), default :data:`DEFAULT_BACKEND`."""
    b = os.environ.get("QSPARSE_SPARSE24_BACKEND", DEFAULT_BACKEND)
    if b not in ("cslt", "cutlass"):
        raise ValueError(f"QSPARSE_SPARSE24_BACKEND must be 'cslt' or 'cutlass', got {b!r}")
    return b


_ALGS: dict[tuple, int] = {}
_MAX_ALG_PROBE = 8


def _time_ms(fn, iters: int = 3) -> float:
    fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def cslt_alg(packed: torch.Tensor, b: torch.Tensor, m: int) -> int:
    """The fastest cuSPARSELt algorithm id for ``packed [m, K] · b [K, N]`` (timed once per shape and
    layout, then cached); ``QSPARSE_SPARSE24_ALG`` overrides."""
    forced = os.environ.get("QSPARSE_SPARSE24_ALG")
    if forced is not None:
        return int(forced)
    key = (m, *b.shape, b.stride(), b.dtype, b.device)
    alg = _ALGS.get(key)
    if alg is None:
        times = {}
        for i in range(_MAX_ALG_PROBE):
            try:
                times[i] = _time_ms(lambda i=i: torch._cslt_sparse_mm(packed, b, alg_id=i))
            except RuntimeError:  # past the last valid id
                break
        alg = min(times, key=times.get) if times else 0
        _ALGS[key] = alg
    return alg


def sparse24_mm(x2: torch.Tensor, weight: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``((x2 ⊙ M) Wᵀ, x2 ⊙ M)`` for 2-D ``x2 [T, K]`` and ``weight [N, K]`` on sparse tensor cores."""
    if backend == "cutlass":
        xm, packed, meta = sparse24_compress_cutlass(x2)
        return torch._sparse_semi_structured_mm(packed, meta, weight.t()), xm
    xm = _launch(x2, False)[0]
    packed = torch._cslt_compress(xm)
    wt = weight.t()
    return torch._cslt_sparse_mm(packed, wt, alg_id=cslt_alg(packed, wt, xm.shape[0])), xm


class _Sparse24Linear(torch.autograd.Function):
    """Forward ``y = (x ⊙ M) Wᵀ + b`` on sparse tensor cores; backward ``dx = dy·W`` (STE),
    ``dW = dyᵀ·(x ⊙ M)``, ``db = Σ dy``.  Also returns ``x ⊙ M`` (no gradient; for statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        k = x.shape[-1]
        y2, xm = sparse24_mm(_as_rows(x), weight, backend)
        if bias is not None:
            y2 = y2 + bias
        ctx.save_for_backward(xm, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(xm)
        return y2.view(*x.shape[:-1], weight.shape[0]), xm.view(*x.shape[:-1], k)

    @staticmethod
    def backward(ctx, dy, _dxm):
        xm, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ weight).view(*dy.shape[:-1], weight.shape[1]) if ctx.needs_input_grad[0] else None
        dw = dy2.t() @ xm if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def sparse24_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``((x ⊙ M) Wᵀ + b, x ⊙ M)`` with ``M`` the 2:4 Block Q-Sparse mask, on sparse tensor cores
    (straight-through backward).  ``x [..., K]`` and ``weight [N, K]`` share a bf16/fp16 dtype; the
    token count must satisfy :func:`sparse24_shape_ok` (callers fall back to the dense path)."""
    return _Sparse24Linear.apply(x, weight, bias, backend or sparse24_backend())
