"""The torch backend of the runtime: :class:`InferenceLinear`, the reference every backend follows.

``y = F.linear(recipe.prepare_input(x), W_eff, bias)`` — the recipe's top-K / N:M mask and int8
quantization of the input from :mod:`qsparse_dist.ops` (which hand the top-K to the Triton kernels on
CUDA through ``ops.dispatch``), with ``W_eff`` the weight the training forward multiplies with,
computed once at load (BitNet: ``s · W_q``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import LinearRecipe, PackedTernary, zero_fraction

__all__ = ["InferenceLinear", "make_linear"]


class InferenceLinear(nn.Module):
    """``F.linear(recipe.prepare_input(x), weight, bias)`` with the effective weight precomputed.

    With ``track_sparsity`` the zero fraction of each call's (sparsified) input is accumulated in
    ``zero_sum / calls`` — the measured activation sparsity of the decode."""

    def __init__(self, recipe: LinearRecipe, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.track_sparsity = False
        self.zero_sum, self.calls = 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.recipe.prepare_input(x)
        if self.track_sparsity:
            self.zero_sum += float(zero_fraction(x_in))
            self.calls += 1
        return F.linear(x_in, self.weight, self.bias)

    def extra_repr(self) -> str:
        r = self.recipe
        return f"out={self.weight.shape[0]}, in={self.weight.shape[1]}, kind={r.kind}, sparsity={r.sparsity}"


def make_linear(recipe: LinearRecipe, weight: torch.Tensor, bias: torch.Tensor | None,
                packed: PackedTernary | None) -> InferenceLinear:
    """Backend factory (never declines)."""
    return InferenceLinear(recipe, weight, bias)
