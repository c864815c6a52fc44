"""``SparseLinear``: the single-device reference linear layer (plain PyTorch).

It computes exactly :func:`qsparse_dist.ops.qsparse_linear` for its :class:`LinearRecipe`; the
megatron-core parallel linears must reproduce it.  With ``track_sparsity`` on, the fraction of exact
zeros of the (sparsified) input of the last forward is kept in ``last_input_zero_fraction``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import LinearRecipe, bitnet_linear, int8_codes_ste, zero_fraction

__all__ = ["SparseLinear"]


class SparseLinear(nn.Module):
    """Linear layer of kind dense | qsparse | block_qsparse | bitnet | bitnet_qsparse."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        recipe: LinearRecipe | None = None,
        *,
        init_std: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.recipe = recipe or LinearRecipe()
        if self.recipe.block_size and in_features % self.recipe.block_size:
            raise ValueError(
                f"block_size={self.recipe.block_size} does not divide in_features={in_features}"
            )
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.track_sparsity = False
        self.last_input_zero_fraction: torch.Tensor | None = None
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float | None = None) -> None:
        if init_std is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.weight, mean=0.0, std=init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.recipe
        if r.quantized:  # exact integer product, scaled after the sum (ops.linear.bitnet_linear)
            codes = int8_codes_ste(r.sparsify(x))
            if self.track_sparsity:
                self.last_input_zero_fraction = zero_fraction(codes[0])
            return bitnet_linear(x, self.weight, self.bias, codes=codes)
        x_in = r.prepare_input(x)
        if self.track_sparsity:
            self.last_input_zero_fraction = zero_fraction(x_in)
        return torch.nn.functional.linear(x_in, r.weight(self.weight), self.bias)

    def extra_repr(self) -> str:
        r = self.recipe
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kind={r.kind}, sparsity={r.sparsity}, block_size={r.block_size}"
        )

