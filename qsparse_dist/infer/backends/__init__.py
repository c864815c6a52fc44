"""Linear backends of the runtime and their registry.

A backend is a factory ``(recipe, W_eff, bias, packed) -> nn.Module | None`` whose module computes
``F.linear(recipe.prepare_input(x), W_eff, bias)`` — for the BitNet kinds the same value as the exact
integer-code product of :func:`qsparse_dist.ops.bitnet_linear` — (``None`` declines that projection;
the runtime then uses ``torch``).  ``torch`` (:mod:`.torch_backend`; not ``torch.py``, which would shadow the ``torch`` package in this namespace) is always there; ``kernels`` (:mod:`.kernels`, the
Triton GEMVs of :mod:`qsparse_dist.kernels`) is imported on first use, so the runtime loads without
Triton.  :func:`register_linear_backend` adds others.  Backends import downward only (ops, kernels);
the runtime (:mod:`qsparse_dist.infer.runtime`) picks one from :data:`LINEAR_BACKENDS`.
:mod:`.decoder` (``KernelDecoder``, the fused batch-1 step of the decode benchmark) lives here too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...ops import LinearRecipe, PackedTernary
from .torch_backend import make_linear as _torch_linear

__all__ = ["LinearFactory", "LINEAR_BACKENDS", "register_linear_backend", "auto_backend", "torch_linear"]

LinearFactory = Callable[[LinearRecipe, torch.Tensor, "torch.Tensor | None", "PackedTernary | None"], "nn.Module | None"]


def torch_linear(recipe, weight, bias, packed):
    """The ``torch`` backend (and the fallback for any projection another backend declines)."""
    return _torch_linear(recipe, weight, bias, packed)


def _kernels_linear(recipe, weight, bias, packed):
    from .kernels import make_linear

    return make_linear(recipe, weight, bias, packed)


LINEAR_BACKENDS: dict[str, LinearFactory] = {"torch": torch_linear, "kernels": _kernels_linear}


def register_linear_backend(name: str, factory: LinearFactory) -> None:
    """Add a backend: ``factory(recipe, W_eff, bias, packed)`` returns a module computing
    ``F.linear(recipe.prepare_input(x), W_eff, bias)`` (or ``None`` to decline that projection)."""
    LINEAR_BACKENDS[name] = factory


def auto_backend(device: torch.device) -> str:
    """``kernels`` on CUDA when Triton imports, else ``torch``."""
    if device.type != "cuda":
        return "torch"
    try:
        from ...kernels import triton_available
    except ImportError:  # pragma: no cover
        return "torch"
    return "kernels" if triton_available() else "torch"
