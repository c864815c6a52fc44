"""Linear layers: the plain-PyTorch reference (``SparseLinear``) and megatron-core parallel ones."""

from .. import kernels as _kernels  # noqa: F401  registers the Triton kernels into ops.dispatch (CUDA)
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear"]
