"""The math of qsparse-dist: Q-Sparse top-K, BitNet b1.58 quantizers, FFN activations, statistics.

Shared by training (``qsparse_dist.layers``), export and inference (``qsparse_dist.infer``).
"""

from .activations import GLU_ACTIVATIONS, drelu, glu_activation, relu2, relu2glu, split_gate_up, swiglu
from .linear import (
    EXACT_K_MAX,
    LINEAR_KINDS,
    LinearRecipe,
    bitnet_linear,
    qsparse_linear,
    scale_codes_product,
)
from .packing import PackedTernary, pack_ternary, pack_ternary_weight, to_feature_major, unpack_ternary
from .quant import (
    fake_quant_activation_int8,
    fake_quant_weight_ternary,
    int8_codes_ste,
    quantize_activation_int8,
    quantize_weight_ternary,
    ternary_codes_ste,
    ternary_scale,
)
from .sparsify import (
    apply_mask,
    kept_count,
    l2_rescale,
    mask_from_threshold,
    topk_mask,
    topk_sparsify,
    topk_threshold,
    validate_sparsity,
)
from .stats import SparsityMeter, zero_fraction

__all__ = [
    "EXACT_K_MAX",
    "GLU_ACTIVATIONS",
    "LINEAR_KINDS",
    "LinearRecipe",
    "PackedTernary",
    "SparsityMeter",
    "apply_mask",
    "bitnet_linear",
    "drelu",
    "fake_quant_activation_int8",
    "fake_quant_weight_ternary",
    "glu_activation",
    "int8_codes_ste",
    "kept_count",
    "l2_rescale",
    "mask_from_threshold",
    "pack_ternary",
    "pack_ternary_weight",
    "qsparse_linear",
    "quantize_activation_int8",
    "quantize_weight_ternary",
    "relu2",
    "relu2glu",
    "scale_codes_product",
    "split_gate_up",
    "swiglu",
    "ternary_codes_ste",
    "ternary_scale",
    "to_feature_major",
    "topk_mask",
    "topk_sparsify",
    "topk_threshold",
    "unpack_ternary",
    "validate_sparsity",
    "zero_fraction",
]
