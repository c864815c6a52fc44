"""Which fused GPU kernels the megatron layers use, and the thin wrappers that call them.

On CUDA tensors the megatron model (:mod:`qsparse_dist.model.megatron.specs`) replaces its eager elementwise
code by fused kernels; on CPU (and with ``QSPARSE_FUSED=0``) it runs the eager code, which is the
reference (the CPU equality tests compare megatron with :mod:`qsparse_dist.model.reference` there).

=========  =========================================================  ===================================
piece      fused kernel (CUDA)                                         vs the eager path
=========  =========================================================  ===================================
RMSNorm    liger-kernel ``LigerRMSNormFunction``, casting mode          float32 math like the reference;
           ``gemma`` (x, w and the product in float32, one rounding)   row mean / rsqrt rounding differ
GLU        :func:`qsparse_dist.kernels.glu.fused_glu`                   ReLU²GLU, dReLU bit-identical
RoPE       liger-kernel ``LigerRopeFunction`` (rotate-half, float32    megatron's unfused RoPE rounds
           math on bf16 q/k, one rounding) inside the core attention   cos/sin and each product to bf16
=========  =========================================================  ===================================

The tolerances are checked on the GPU by ``tests/test_fused_layers.py`` (skipped without CUDA) and the
GLU kernel also on CPU through the Triton interpreter.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

__all__ = ["fused_enabled", "liger_enabled", "rms_norm", "glu", "rope_bhsd"]


@cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def fused_enabled(x: torch.Tensor) -> bool:
    """True for CUDA tensors when Triton is installed, unless ``QSPARSE_FUSED=0`` (then every layer
    runs the eager path)."""
    return x.is_cuda and os.environ.get("QSPARSE_FUSED", "1") != "0" and _installed("triton")


def liger_enabled(x: torch.Tensor) -> bool:
    """:func:`fused_enabled` and liger-kernel installed (the fused RMSNorm and RoPE come from it; the
    ``liger-kernel`` package is optional: without it those two stay eager)."""
    return fused_enabled(x) and _installed("liger_kernel")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) · w`` in float32, cast to ``x``'s dtype; one kernel each way."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "gemma", False)


def glu(h: torch.Tensor, name: str) -> torch.Tensor:
    """The named GLU activation of the fused ``[gate ‖ up]`` tensor in one pass."""
    from ..kernels.glu import fused_glu

    return fused_glu(h, name)


def rope_bhsd(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of ``q``/``k`` given as ``[b, heads, s, hd]`` (any strides) with megatron's
    ``freqs [s, 1, 1, hd]`` (float32 angles): ``x·cos + rotate_half(x)·sin`` in float32.  Returns
    ``[b, heads, s, hd]`` views of new ``[b, s, heads, hd]``-contiguous tensors (SDPA takes them)."""
    from liger_kernel.ops.rope import LigerRopeFunction

    if freqs.shape[-1] != q.shape[-1]:
        raise ValueError(f"rotary dim {freqs.shape[-1]} != head dim {q.shape[-1]} (partial RoPE unsupported)")
    f = freqs.reshape(1, freqs.shape[0], freqs.shape[-1]).float()
    return LigerRopeFunction.apply(q, k, f.cos(), f.sin())
