"""The runtime's kernel backend: ``make_decode_linear(recipe, W_eff, bias, packed)``.

Decode steps (at most 16 rows) go through the Triton GEMVs; prefill and anything else falls back to
the torch path of :class:`~qsparse_dist.infer.runtime.InferenceLinear`, whose semantics both follow:

    qsparse / block_qsparse   y = sparse_gemv(x ⊙ M, Wᵀ)          (rows of dropped features never read)
    bitnet / bitnet_qsparse   y = s_x · s_w · ternary_gemv(Q8(x ⊙ M), W_q)   (2-bit packed weights;
                              batch 1: the dp4a kernel of :mod:`.ternary_dp4a`)
    dense                     declined (``None``): cuBLAS is the baseline

``W_eff`` is the effective weight (``s_w · W_q`` for BitNet kinds), so the ternary codes are recovered
exactly as ``round(W_eff / s_w)`` with ``s_w = max|W_eff|`` when no packed tensor is given.
"""

from __future__ import annotations

import torch

from ...ops import LinearRecipe, quantize_activation_int8, zero_fraction
from ...ops.packing import PackedTernary, pack_ternary, to_feature_major
from ..runtime import InferenceLinear
from . import use_triton
from .gemv import sparse_gemv, ternary_gemv
from .ternary_dp4a import pack_k4, ternary_gemv_k4

__all__ = ["KernelLinear", "make_decode_linear", "MAX_DECODE_ROWS"]

MAX_DECODE_ROWS = 16


class KernelLinear(InferenceLinear):
    """An :class:`InferenceLinear` whose small-batch calls run the sparse / ternary GEMV kernels."""

    def __init__(self, recipe: LinearRecipe, weight: torch.Tensor, bias: torch.Tensor | None,
                 packed: PackedTernary | None) -> None:
        super().__init__(recipe, weight, bias)
        self.out_features, self.in_features = weight.shape
        if recipe.quantized:
            if packed is not None:
                rows_packed, scale = packed.packed.to(weight.device), packed.scale.float()
            else:
                scale = weight.detach().abs().amax().float()
                w_q = torch.clamp(torch.round(weight.detach().float() / scale), -1, 1).to(torch.int8)
                rows_packed = pack_ternary(w_q)  # [N, ceil(K/4)], the export layout
            self.register_buffer("wt_packed", to_feature_major(rows_packed, self.in_features).contiguous())
            self.register_buffer("w_scale", scale.reshape(()).to(weight.device))
            # batch 1: the dp4a kernel reads [K/4, N] bytes (the row-packed codes, transposed)
            self.register_buffer("p4", pack_k4(rows_packed) if self.in_features % 4 == 0 else None)
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
            if rows == 1 and self.p4 is not None:
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


def make_decode_linear(recipe: LinearRecipe, weight: torch.Tensor, bias: torch.Tensor | None,
                       packed: PackedTernary | None) -> KernelLinear | None:
    """Runtime backend factory; ``None`` (torch path) for dense projections."""
    if not (recipe.uses_topk or recipe.quantized):
        return None
    return KernelLinear(recipe, weight, bias, packed)
