"""BitNet b1.58 quantizers (Ma et al., arXiv 2402.17764) and their straight-through fake-quant.

Weights, per tensor (absmean):
    s_w = mean(|W|) + eps,   W_q = clamp(round(W / s_w), -1, 1) ∈ {-1, 0, 1},   W ≈ s_w · W_q

Activations, per token (absmax, int8):
    s_x = max(|x|, eps) / 127,   x_q = clamp(round(x / s_x), -128, 127),   x ≈ s_x · x_q

Training keeps latent full-precision weights; the forward uses the de-quantized values and the
backward passes gradients straight through the rounding:  ``fq(w) = deq(q(w)) + (w - w.detach())``
(forward value exactly ``deq``; gradient 1).
With Q-Sparse the top-K mask is taken from the *unquantized* ``|x|`` first; quantizing a sparsified
row keeps its zeros (round(0) = 0) and its absmax (the largest entry is always kept).

Linear layers do not multiply the de-quantized values: :func:`int8_codes_ste` and
:func:`ternary_codes_ste` return the integer codes (as float tensors) and their scales, and the
linear computes ``y = (X_q · W_qᵀ) · (s_x · s_w)`` (:func:`qsparse_dist.ops.linear.bitnet_linear`).
The codes carry the straight-through gradient of ``round(x / s)``, ``∂X_q/∂x = 1/s``, so the chain
rule through the scaled product gives the same gradients as the de-quantized product
(``∂y/∂x = s_w·W_q``, ``∂y/∂W = s_x·X_q``).

Callers that hold only a shard of a tensor (tensor parallelism) pass the global statistic through
``scale=`` / ``absmax=`` so that every shard quantizes exactly as the unsharded tensor would.
"""

from __future__ import annotations

import torch

__all__ = [
    "WEIGHT_EPS",
    "ACT_EPS",
    "ternary_scale",
    "quantize_weight_ternary",
    "quantize_activation_int8",
    "fake_quant_weight_ternary",
    "fake_quant_activation_int8",
    "code_dtype",
    "codes_ste",
    "int8_codes_ste",
    "ternary_codes_ste",
]

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {got}")


def ternary_scale(w: torch.Tensor, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """Absmean scale ``mean(|W|) + eps`` (0-dim, float32 accumulate)."""
    _check_float(w, "w")
    return w.detach().abs().float().mean() + eps


def quantize_weight_ternary(
    w: torch.Tensor, eps: float = WEIGHT_EPS, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(w_q, scale)``: ``w_q`` int8 in {-1, 0, 1}, ``scale`` 0-dim float32."""
    _check_float(w, "w")
    s = ternary_scale(w, eps) if scale is None else scale.detach().float()
    w_q = torch.clamp(torch.round(w.detach().float() / s), -1, 1).to(torch.int8)
    return w_q, s


def _act_scale(x: torch.Tensor, eps: float, absmax: torch.Tensor | None) -> torch.Tensor:
    m = x.detach().abs().amax(dim=-1, keepdim=True) if absmax is None else absmax.detach()
    m = m.float().clamp_min(eps)
    # divide by a tensor on m's device, not a Python scalar: CUDA turns ``t / scalar`` into
    # ``t * (1/scalar)``, 1 ulp off the true quotient for ~5 % of rows; the kernels divide exactly
    return m / m.new_full((), 127.0)


def quantize_activation_int8(
    x: torch.Tensor, eps: float = ACT_EPS, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_q, scale)``: ``x_q`` int8 per-token absmax, ``scale`` float32 ``[..., 1]``."""
    _check_float(x, "x")
    s = _act_scale(x, eps, absmax)
    x_q = torch.clamp(torch.round(x.detach().float() / s), -128, 127).to(torch.int8)
    return x_q, s


def fake_quant_weight_ternary(
    w: torch.Tensor, eps: float = WEIGHT_EPS, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``s_w · W_q`` in ``w``'s dtype with the straight-through gradient ``∂/∂w = 1``."""
    w_q, s = quantize_weight_ternary(w, eps, scale)
    deq = (w_q.float() * s).to(w.dtype)
    return deq + (w - w.detach())


def fake_quant_activation_int8(
    x: torch.Tensor, eps: float = ACT_EPS, absmax: torch.Tensor | None = None
) -> torch.Tensor:
    """``s_x · x_q`` in ``x``'s dtype with the straight-through gradient ``∂/∂x = 1``."""
    x_q, s = quantize_activation_int8(x, eps, absmax)
    deq = (x_q.float() * s).to(x.dtype)
    return deq + (x - x.detach())


def code_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float dtype holding the integer codes in a matmul: ``dtype`` itself, float32 for float16
    (an fp16 sum of ``K`` int8×ternary products overflows 65504 beyond ``K ≈ 512``)."""
    return torch.float32 if dtype == torch.float16 else dtype


class _CodesSTE(torch.autograd.Function):
    """Forward: the integer codes ``q = round(t / s)`` (no copy); backward: ``grad / s`` (the STE of
    the rounding, ``∂q/∂t = 1/s``)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        ctx.dtype = t.dtype
        return codes

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return (grad / scale).to(ctx.dtype), None, None


def codes_ste(t: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes`` (precomputed ``round(t / scale)``) with the straight-through gradient ``1/scale`` to ``t``."""
    return _CodesSTE.apply(t, codes, scale)


def int8_codes_ste(
    x: torch.Tensor, eps: float = ACT_EPS, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X_q, s_x)``: the per-token int8 codes of ``x`` as a float tensor of
    :func:`code_dtype` (values in [-128, 127]) with the gradient ``∂X_q/∂x = 1/s_x``, and the
    float32 scale ``[..., 1]`` (detached).  ``s_x · X_q`` is :func:`fake_quant_activation_int8`."""
    x_q, s = quantize_activation_int8(x, eps, absmax)
    return _CodesSTE.apply(x, x_q.to(code_dtype(x.dtype)), s), s


def ternary_codes_ste(
    w: torch.Tensor, eps: float = WEIGHT_EPS, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_q, s_w)``: the ternary codes of ``w`` as a float tensor of :func:`code_dtype` with the
    gradient ``∂W_q/∂w = 1/s_w``, and the 0-dim float32 scale (detached).  ``s_w · W_q`` is
    :func:`fake_quant_weight_ternary`."""
    w_q, s = quantize_weight_ternary(w, eps, scale)
    return _CodesSTE.apply(w, w_q.to(code_dtype(w.dtype)), s), s
