"""When the ops hand work to the Triton kernels (``qsparse_dist.infer.kernels``).

The torch code in this package stays the reference and the CPU path; on CUDA tensors of dtype
bf16/fp16/fp32 the top-K ops run the fused Triton kernels, which compute identical values (same
mask, same tie rule, same fake-quant arithmetic).  ``QSPARSE_TRITON=0`` turns this off.
"""

from __future__ import annotations

import torch

__all__ = ["triton_kernels_for"]

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_kernels_for(x: torch.Tensor) -> bool:
    """True when ``x`` should go through the Triton kernels."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _KERNEL_DTYPES:
        return False
    try:
        from ..infer.kernels import use_triton
    except ImportError:  # pragma: no cover
        return False
    return use_triton(x)
