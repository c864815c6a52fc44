"""The one definition of what a Q-Sparse / BitNet linear layer computes, shared by the reference
layer, the megatron-core parallel layers, the exported Hugging Face model and the runtime.

    dense            y = x Wᵀ
    qsparse          y = (x ⊙ M) Wᵀ                      M = Top_k(|x|) per token
    block_qsparse    y = (x ⊙ M_N:M) Wᵀ                  top-k inside each block of block_size
    bitnet           y = Q8(x) · (s_w W_q)ᵀ              ternary weights, int8 activations
    bitnet_qsparse   y = Q8(x ⊙ M) · (s_w W_q)ᵀ          mask from the unquantized |x|

with ``Q8`` the per-token absmax int8 fake-quant and ``s_w W_q`` the absmean ternary fake-quant
(``qsparse_dist.ops.quant``); all non-differentiable steps use the straight-through estimator.

The BitNet kinds are computed as the integer product, scaled afterwards (:func:`bitnet_linear`):

    y = (X_q · W_qᵀ) · (s_x · s_w)        X_q ∈ [-128, 127], W_q ∈ {-1, 0, 1} (float tensors)

Every partial sum of ``X_q · W_qᵀ`` is an integer of magnitude ≤ 128·K (K = in_features), so in
float32 the product is *exact*, whatever the summation order (matmul blocking, row count, the
tensor-parallel split), as long as 128·K < 2^24, i.e. K < 131,072.  A sum that is 0 in exact
arithmetic is exactly 0, so e.g. ``relu′`` of it does not depend on the matmul's shape.  In bfloat16
the fp32-accumulated exact sum is rounded once to bfloat16 (still order-independent).  This matches
the decode kernels (``qsparse_dist.kernels.gemv``: ``acc · (s_w · s_x)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import kernel, triton_kernels_for
from .quant import fake_quant_activation_int8, fake_quant_weight_ternary, int8_codes_ste, ternary_codes_ste
from .sparsify import topk_sparsify, validate_sparsity

__all__ = ["LINEAR_KINDS", "EXACT_K_MAX", "LinearRecipe", "bitnet_linear", "qsparse_linear", "scale_codes_product"]

EXACT_K_MAX = (1 << 24) // 128
"""Largest ``in_features`` for which the float32 int8×ternary sum is exact (``128·K ≤ 2^24``)."""

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


def scale_codes_product(
    y_int: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``y_int · (s_x · s_w)`` in ``dtype``: the scales of an integer-code product, applied after
    the (exact) sum; ``s_x`` per token ``[..., 1]`` float32, ``s_w`` 0-dim float32.  On the GPU the
    registered kernel ``scale_codes_product`` computes the same float32 arithmetic in one pass each way."""
    if (triton_kernels_for(y_int) and y_int.dtype == dtype and dtype in (torch.bfloat16, torch.float32)
            and s_x.dim() == y_int.dim() and s_x.shape[:-1] == y_int.shape[:-1] and s_x.shape[-1] == 1
            and s_x.dtype == s_w.dtype == torch.float32 and s_w.dim() == 0
            and not (s_x.requires_grad or s_w.requires_grad)):
        return kernel("scale_codes_product")(y_int, s_x, s_w, dtype)
    return (y_int * (s_x * s_w)).to(dtype)


def bitnet_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    absmax: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    codes: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``y = (X_q · W_qᵀ) · (s_x · s_w) + b`` (module docstring: exact in float32 while
    ``in_features`` ≤ :data:`EXACT_K_MAX`).  ``x`` is the (already sparsified) input; ``absmax`` /
    ``weight_scale`` override the statistics (tensor parallelism); ``codes`` = precomputed
    ``int8_codes_ste(x)``.  Gradients (straight-through): ``∂y/∂x = s_w·W_q``, ``∂y/∂W = s_x·X_q``,
    the de-quantized product's."""
    x_q, s_x = codes if codes is not None else int8_codes_ste(x, absmax=absmax)
    w_q, s_w = ternary_codes_ste(weight, scale=weight_scale)
    y = scale_codes_product(F.linear(x_q, w_q.to(x_q.dtype)), s_x, s_w, x.dtype)
    return y if bias is None else y + bias


def qsparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: LinearRecipe = LinearRecipe(),
) -> torch.Tensor:
    """``y = prepare_input(x) · weight(W)ᵀ + b`` for the given :class:`LinearRecipe` (BitNet kinds:
    :func:`bitnet_linear` of the sparsified input, the same value computed exactly)."""
    if recipe.quantized:
        return bitnet_linear(recipe.sparsify(x), weight, bias)
    return F.linear(recipe.prepare_input(x), recipe.weight(weight), bias)
