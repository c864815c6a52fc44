"""The one definition of what a Q-Sparse / BitNet linear layer computes, shared by the reference
layer, the megatron-core parallel layers, the exported Hugging Face model and the runtime.

    dense            y = x Wᵀ
    qsparse          y = (x ⊙ M) Wᵀ                      M = Top_k(|x|) per token
    block_qsparse    y = (x ⊙ M_N:M) Wᵀ                  top-k inside each block of block_size
    bitnet           y = Q8(x) · (s_w W_q)ᵀ              ternary weights, int8 activations
    bitnet_qsparse   y = Q8(x ⊙ M) · (s_w W_q)ᵀ          mask from the unquantized |x|

with ``Q8`` the per-token absmax int8 fake-quant and ``s_w W_q`` the absmean ternary fake-quant
(``qsparse_dist.ops.quant``); all non-differentiable steps use the straight-through estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import kernel, triton_kernels_for
from .quant import fake_quant_activation_int8, fake_quant_weight_ternary
from .sparsify import topk_sparsify, validate_sparsity

__all__ = ["LINEAR_KINDS", "LinearRecipe", "qsparse_linear"]

LINEAR_KINDS = ("dense", "qsparse", "block_qsparse", "bitnet", "bitnet_qsparse")


@dataclass(frozen=True)
class LinearRecipe:
    """How one projection treats its input and weight.

    ``sparsity`` is ignored (treated as 0) by the kinds without top-K (``dense``, ``bitnet``).
    ``block_size`` is required by ``block_qsparse`` and optional for ``bitnet_qsparse`` (N:M).
    """

    kind: str = "dense"
    sparsity: float = 0.0
    block_size: int | None = None
    ste: bool = True
    rescale: bool = False

    def __post_init__(self) -> None:
        if self.kind not in LINEAR_KINDS:
            raise ValueError(f"kind must be one of {LINEAR_KINDS}, got {self.kind!r}")
        validate_sparsity(self.sparsity)
        if self.kind == "block_qsparse" and self.block_size is None:
            raise ValueError("block_size is required for kind='block_qsparse'")
        if self.block_size is not None and self.kind in ("dense", "bitnet", "qsparse"):
            raise ValueError(
                f"block_size is only valid for block_qsparse / bitnet_qsparse, not kind={self.kind!r}"
            )
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0
        ):
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")

    @property
    def uses_topk(self) -> bool:
        return self.kind in ("qsparse", "block_qsparse", "bitnet_qsparse") and self.sparsity > 0

    @property
    def quantized(self) -> bool:
        return self.kind.startswith("bitnet")

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        """Top-K (or N:M) mask on the unquantized input; identity without top-K."""
        if not self.uses_topk:
            return x
        return topk_sparsify(
            x, self.sparsity, block_size=self.block_size, ste=self.ste, rescale=self.rescale
        )

    def quantize_input(self, x: torch.Tensor, absmax: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token int8 fake-quant for BitNet kinds; identity otherwise."""
        return fake_quant_activation_int8(x, absmax=absmax) if self.quantized else x

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized and self.uses_topk and not self.rescale and triton_kernels_for(x):
            # mask + STE + int8 fake-quant, fused
            return kernel("topk_sparsify")(x, self.sparsity, block_size=self.block_size, ste=self.ste, quantize=True)
        return self.quantize_input(self.sparsify(x))

    def weight(self, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Ternary fake-quant of the latent weight for BitNet kinds; identity otherwise."""
        return fake_quant_weight_ternary(w, scale=scale) if self.quantized else w


def qsparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: LinearRecipe = LinearRecipe(),
) -> torch.Tensor:
    """``y = prepare_input(x) · weight(W)ᵀ + b`` for the given :class:`LinearRecipe`."""
    return F.linear(recipe.prepare_input(x), recipe.weight(weight), bias)
