"""The runtime's kernel backend: ``make_decode_linear(recipe, W_eff, bias, packed)``.

Decode steps (at most 16 rows) go through the Triton GEMVs; prefill and anything else falls back to
the torch path of :class:`~qsparse_dist.infer.runtime.InferenceLinear`, whose semantics both follow:

    qsparse / block_qsparse   y = sparse_gemv(x ⊙ M, Wᵀ)          (rows of dropped features never read)
    bitnet / bitnet_qsparse   y = s_x · s_w · ternary_gemv(Q8(x ⊙ M), W_q)   (2-bit packed weights)
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
                codes, scale = packed.packed, packed.scale.float()
                wt = to_feature_major(codes.to(weight.device), self.in_features)
            else:
                scale = weight.detach().abs().amax().float()
                w_q = torch.clamp(torch.round(weight.detach().float() / scale), -1, 1).to(torch.int8)
                wt = pack_ternary(w_q.t().contiguous())
            self.register_buffer("wt_packed", wt.contiguous())
            self.register_buffer("w_scale", scale.reshape(()).to(weight.device))
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
