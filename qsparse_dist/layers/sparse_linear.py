"""``SparseLinear``: the single-device reference linear layer (plain PyTorch).

It computes exactly :func:`qsparse_dist.ops.qsparse_linear` for its :class:`LinearRecipe`; the
megatron-core parallel linears must reproduce it.  With ``track_sparsity`` on, the fraction of exact
zeros of the (sparsified) input of the last forward is kept in ``last_input_zero_fraction``.

**2:4 on sparse tensor cores.**  A ``block_qsparse`` recipe with ``block_size=4`` keeping 2 of 4
(:func:`is_sparse24`) computes ``(x ⊙ M) Wᵀ`` with the activation as the 2:4 operand of a semi-structured
sparse matmul (:mod:`qsparse_dist.kernels.sparse24`, straight-through backward) when
:func:`use_sparse24` says so: ``sparse_tensor_cores="on"`` (CUDA bf16/fp16 tensors, a shape the kernels
take; a CUDA device without usable sparse tensor cores is an error).  ``"auto"`` (the default) uses them
only where they were measured to pay — :data:`AUTO_USES_SPARSE_TENSOR_CORES`, false so far: on the H200
with torch 2.11 cuSPARSELt's compression of each activation costs 0.6–2 ms, more than its GEMM saves,
and torch's CUTLASS sparse GEMM runs on sm8x only (docs/ops.md) — and ``"off"`` never.  Otherwise —
CPU, other recipes, ``auto``/``off`` — the layer computes the dense ``(x ⊙ M) Wᵀ`` exactly as before
(on CUDA the 2:4 mask itself comes from the one-pass selection kernel of :mod:`~qsparse_dist.kernels.sparse24`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import LinearRecipe, bitnet_linear, dispatch, int8_codes_ste, kept_count, zero_fraction

__all__ = ["SPARSE_TENSOR_CORE_MODES", "SparseLinear", "check_sparse_tensor_cores", "is_sparse24", "use_sparse24"]

SPARSE_TENSOR_CORE_MODES = ("auto", "on", "off")
AUTO_USES_SPARSE_TENSOR_CORES = False
"""Whether ``sparse_tensor_cores="auto"`` takes the sparse-tensor-core path: only once a backend is measured
faster than the dense GEMM including the compression (``tools/bench_sparse24.py``); not on the H200 yet."""


def check_sparse_tensor_cores(mode: str) -> str:
    """``mode`` if it is one of :data:`SPARSE_TENSOR_CORE_MODES`, else ``ValueError`` naming the field."""
    if mode not in SPARSE_TENSOR_CORE_MODES:
        raise ValueError(f"sparsity.sparse_tensor_cores must be one of {SPARSE_TENSOR_CORE_MODES}, got {mode!r}")
    return mode


def is_sparse24(recipe: LinearRecipe) -> bool:
    """``recipe`` is Block Q-Sparse 2:4 with the STE: ``block_qsparse``, ``block_size=4``, keeps 2 of 4
    (``kept_count(4, sparsity) == 2``, i.e. sparsity in [0.375, 0.625)), ``ste=True``, no re-scale."""
    return (recipe.kind == "block_qsparse" and recipe.block_size == 4 and recipe.sparsity > 0
            and kept_count(4, recipe.sparsity) == 2 and recipe.ste and not recipe.rescale)


def _registered(name: str) -> bool:
    try:
        dispatch.kernel(name)
    except LookupError:
        return False
    return True


def use_sparse24(recipe: LinearRecipe, mode: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this forward runs on sparse tensor cores (see the module docstring).  ``mode="on"`` on
    a device without sparse tensor cores raises ``RuntimeError`` naming the config field."""
    if mode == "off" or (mode == "auto" and not AUTO_USES_SPARSE_TENSOR_CORES):
        return False
    if not is_sparse24(recipe) or not x.is_cuda:
        return False
    if not dispatch.triton_kernels_for(x) or not _registered("sparse24_linear"):
        return False
    from ..kernels.sparse24 import sparse24_shape_ok, sparse24_supported

    if not sparse24_supported(x.device):
        if mode == "on":
            raise RuntimeError(
                f"sparsity.sparse_tensor_cores='on' but {torch.cuda.get_device_name(x.device)} has no sparse "
                "tensor cores usable by torch (needs sm80+ and cuSPARSELt); use 'auto' or 'off'"
            )
        return False
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and sparse24_shape_ok(tokens, x.shape[-1]))


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
        sparse_tensor_cores: str = "auto",
    ) -> None:
        super().__init__()
        self.sparse_tensor_cores = check_sparse_tensor_cores(sparse_tensor_cores)
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
        if use_sparse24(r, self.sparse_tensor_cores, x, self.weight):
            y, x_in = dispatch.kernel("sparse24_linear")(x, self.weight, self.bias)
            if self.track_sparsity:
                self.last_input_zero_fraction = zero_fraction(x_in)
            return y
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

