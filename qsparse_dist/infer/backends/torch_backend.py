"""The torch backend of the runtime: :class:`InferenceLinear`, the reference every backend follows.

``y = F.linear(recipe.prepare_input(x), W_eff, bias)`` — the recipe's top-K / N:M mask and int8
quantization of the input from :mod:`qsparse_dist.ops` (which hand the top-K to the Triton kernels on
CUDA through ``ops.dispatch``), with ``W_eff`` the weight the training forward multiplies with,
computed once at load (BitNet: ``s · W_q``).  BitNet kinds compute the same value as the
training forward does, the exact integer product scaled afterwards,
``y = (X_q · W_qᵀ) · (s_x · s_w) + b`` (:func:`qsparse_dist.ops.bitnet_linear`), with ``W_q`` and ``s_w``
taken from the export's packed codes or recovered exactly from ``W_eff`` (``s_w = max|W_eff|``,
``W_q = sign(W_eff)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import LinearRecipe, PackedTernary, quantize_activation_int8, scale_codes_product, zero_fraction
from ...ops.quant import code_dtype

__all__ = ["InferenceLinear", "make_linear"]


class InferenceLinear(nn.Module):
    """``F.linear(recipe.prepare_input(x), weight, bias)`` with the effective weight precomputed
    (BitNet kinds keep its codes ``w_codes`` and scale ``w_codes_scale`` instead of ``weight``).

    With ``track_sparsity`` the zero fraction of each call's (sparsified) input is accumulated in
    ``zero_sum / calls`` — the measured activation sparsity of the decode."""

    def __init__(self, recipe: LinearRecipe, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 packed: PackedTernary | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", bias)
        self.track_sparsity = False
        self.zero_sum, self.calls = 0.0, 0
        if recipe.quantized:  # instead of W_eff: ternary codes (in the matmul's dtype), float32 scale
            if packed is not None:
                w_q, s_w = packed.unpack(), packed.scale.float()
            else:
                w_q, s_w = torch.sign(weight.detach()), weight.detach().abs().amax().float()
            self.register_buffer("w_codes", w_q.to(device=weight.device, dtype=code_dtype(weight.dtype)))
            self.register_buffer("w_codes_scale", s_w.reshape(()).to(weight.device))
        else:
            self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.quantized:
            x_q, s_x = quantize_activation_int8(self.recipe.sparsify(x))
            if self.track_sparsity:
                self.zero_sum += float(zero_fraction(x_q))
                self.calls += 1
            y_int = F.linear(x_q.to(self.w_codes.dtype), self.w_codes)
            y = scale_codes_product(y_int, s_x, self.w_codes_scale.float(), x.dtype)
            return y if self.bias is None else y + self.bias
        x_in = self.recipe.prepare_input(x)
        if self.track_sparsity:
            self.zero_sum += float(zero_fraction(x_in))
            self.calls += 1
        return F.linear(x_in, self.weight, self.bias)

    def extra_repr(self) -> str:
        r = self.recipe
        return f"out={self.out_features}, in={self.in_features}, kind={r.kind}, sparsity={r.sparsity}"


def make_linear(recipe: LinearRecipe, weight: torch.Tensor, bias: torch.Tensor | None,
                packed: PackedTernary | None) -> InferenceLinear:
    """Backend factory (never declines)."""
    return InferenceLinear(recipe, weight, bias, packed)
