"""The registry through which faster implementations (the Triton kernels of ``qsparse_dist.kernels``)
take over ops work — without ``ops`` importing them.

The torch code in this package stays the reference and the CPU path.  A kernel package calls
:func:`register_kernels` when it is imported, with a gate (``gate(x) -> bool``: may tensor ``x`` go
through the kernels?) and named implementations that compute identical values (same mask, same tie
rule, same fake-quant arithmetic).  An op asks :func:`triton_kernels_for` and then :func:`kernel`:

    triton_kernels_for(x) = x is a bf16/fp16/fp32 tensor  and  a gate is registered  and  gate(x)

Nothing registered (this file copied into an export's remote code, or a process that never imported
``qsparse_dist.kernels``) means the torch path.  ``QSPARSE_TRITON=0`` turns dispatch off (the
registered gate, ``qsparse_dist.kernels.use_triton``, reads it).

Names in use: ``topk_mask(x, sparsity, *, block_size)`` and
``topk_sparsify(x, sparsity, *, block_size, ste, quantize=False)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = ["triton_kernels_for", "register_kernels", "kernel"]

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_gate: Callable[[torch.Tensor], bool] | None = None
_impls: dict[str, Callable] = {}


def register_kernels(gate: Callable[[torch.Tensor], bool], impls: Mapping[str, Callable]) -> None:
    """Install ``gate`` and add/replace the implementations ``impls`` (name -> callable)."""
    global _gate
    _gate = gate
    _impls.update(impls)


def triton_kernels_for(x: torch.Tensor) -> bool:
    """True when ``x`` should go through the registered kernels."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _KERNEL_DTYPES or _gate is None:
        return False
    return bool(_gate(x))


def kernel(name: str) -> Callable:
    """The registered implementation ``name`` (ask :func:`triton_kernels_for` first)."""
    try:
        return _impls[name]
    except KeyError:
        raise LookupError(f"no kernel registered under {name!r} (registered: {sorted(_impls)})") from None
