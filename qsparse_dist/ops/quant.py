"""BitNet b1.58 quantizers (Ma et al., arXiv 2402.17764) and their straight-through fake-quant.

Weights, per tensor (absmean):
    s_w = mean(|W|) + eps,   W_q = clamp(round(W / s_w), -1, 1) ∈ {-1, 0, 1},   W ≈ s_w · W_q

Activations, per token (absmax, int8):
    s_x = max(|x|, eps) / 127,   x_q = clamp(round(x / s_x), -128, 127),   x ≈ s_x · x_q

Training keeps latent full-precision weights; the forward uses the de-quantized values and the
backward passes gradients straight through the rounding:  ``fq(w) = deq(q(w)) + (w - w.detach())``
(forward value exactly ``deq``, so packed exports reproduce training bit for bit; gradient 1).
With Q-Sparse the top-K mask is taken from the *unquantized* ``|x|`` first; quantizing a sparsified
row keeps its zeros (round(0) = 0) and its absmax (the largest entry is always kept).

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
    return m.float().clamp_min(eps) / 127.0


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
