"""Linear layers: the plain-PyTorch reference (``SparseLinear``) and megatron-core parallel ones."""

from .sparse_linear import SparseLinear

__all__ = ["SparseLinear"]
