"""The runtime's kernel backend: ``make_linear(recipe, W_eff, bias, packed)`` (formerly
``qsparse_dist.infer.kernels.decode_linear.make_decode_linear``).

Decode steps (at most 16 rows) go through the Triton GEMVs of :mod:`qsparse_dist.kernels`; prefill
and anything else falls back to the torch path of :class:`~.torch_backend.InferenceLinear`, whose semantics
both follow:

    qsparse / block_qsparse   y = sparse_gemv(x ⊙ M, Wᵀ)          (rows of dropped features never read)
    bitnet / bitnet_qsparse   y = s_x · s_w · ternary_gemv(Q8(x ⊙ M), W_q)   (2-bit packed weights;
                              batch 1: the dp4a kernels of :mod:`.ternary_dp4a`, "k16" packing)
    dense                     declined (``None``): cuBLAS is the baseline

``W_eff`` is the effective weight (``s_w · W_q`` for BitNet kinds), so the ternary codes are recovered
exactly (:func:`qsparse_dist.ops.packing.pack_effective_ternary`) when no packed tensor is given.

Why this and :class:`qsparse_dist.kernels.decoder.DecodeLinear` both exist: this one is a drop-in
``nn.Module`` for the runtime's model (any batch of ≤ 16 rows, sparsifies and quantizes its own input,
torch fallback for prefill and N:M, takes an export's packed codes); ``DecodeLinear`` is one projection
of the fused batch-1 :class:`~.decoder.KernelDecoder` step (input already sparsified/quantized by the
prologue kernel, gather GEMV over the compacted kept list, writes into preallocated split-K slices,
tuned tile configs, built from the latent weight).  Both pack their weights with the ops' one
definition (:mod:`qsparse_dist.ops.packing`) and call the same GEMVs.
"""

from __future__ import annotations

import torch

from ...kernels import use_triton
from ...kernels.gemv import sparse_gemv, ternary_gemv
from ...kernels.ternary_dp4a import pack_k4, pack_k16, ternary_gemv_k4, ternary_gemv_k16, tile_counters
from ...ops import LinearRecipe, quantize_activation_int8, zero_fraction
from ...ops.packing import PackedTernary, pack_effective_ternary, to_feature_major
from .torch_backend import InferenceLinear

__all__ = ["KernelLinear", "make_linear", "MAX_DECODE_ROWS"]

MAX_DECODE_ROWS = 16


class KernelLinear(InferenceLinear):
    """An :class:`InferenceLinear` whose small-batch calls run the sparse / ternary GEMV kernels."""

    def __init__(self, recipe: LinearRecipe, weight: torch.Tensor, bias: torch.Tensor | None,
                 packed: PackedTernary | None) -> None:
        super().__init__(recipe, weight, bias)
        self.out_features, self.in_features = weight.shape
        if recipe.quantized:
            if packed is None:
                packed = pack_effective_ternary(weight)  # [N, ceil(K/4)], the export layout
            rows_packed, scale = packed.packed.to(weight.device), packed.scale.float()
            self.register_buffer("wt_packed", to_feature_major(rows_packed, self.in_features).contiguous())
            self.register_buffer("w_scale", scale.reshape(()).to(weight.device))
            # batch 1: the dp4a kernels, over 16 pre-permuted codes per int32 word (K % 16 == 0, "k16") or
            # the row-packed bytes transposed ([K/4, N], "k4")
            k16 = self.in_features % 16 == 0
            self.register_buffer("p16", pack_k16(rows_packed, self.in_features) if k16 else None)
            self.register_buffer("p4", pack_k4(rows_packed) if self.in_features % 4 == 0 and not k16 else None)
            tile_counters(weight.device, 1)  # split-K arrival counters, allocated outside any graph capture
        else:
            self.register_buffer("wt", weight.detach().t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > MAX_DECODE_ROWS or not use_triton(x):
            return super().forward(x)
        x2 = x.reshape(rows, self.in_features)
        x_in = self.recipe.sparsify(x2)
        if self.track_sparsity:
            self.zero_sum += float(zero_fraction(x_in))
            self.calls += 1
        if self.recipe.quantized:
            q, s = quantize_activation_int8(x_in)
            if rows == 1 and self.p16 is not None:
                y = ternary_gemv_k16(q, s.reshape(-1), self.p16, self.w_scale, skip_zeros=self.recipe.uses_topk)
            elif rows == 1 and self.p4 is not None:
                y = ternary_gemv_k4(q, s.reshape(-1), self.p4, self.w_scale, skip_zeros=self.recipe.uses_topk)
            else:
                y = ternary_gemv(q, s.reshape(-1), self.wt_packed, self.w_scale, self.out_features,
                                 skip_zeros=self.recipe.uses_topk)
        else:
            y = sparse_gemv(x_in.to(self.wt.dtype), self.wt)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def make_linear(recipe: LinearRecipe, weight: torch.Tensor, bias: torch.Tensor | None,
                packed: PackedTernary | None) -> KernelLinear | None:
    """Runtime backend factory; ``None`` (torch path) for dense projections."""
    if not (recipe.uses_topk or recipe.quantized):
        return None
    return KernelLinear(recipe, weight, bias, packed)
