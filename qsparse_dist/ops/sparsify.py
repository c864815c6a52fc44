"""Q-Sparse top-K activation sparsification (Wang et al., arXiv 2407.10969).

For an activation row ``x ∈ R^d`` (one token), Q-Sparse computes

    M = Top_k(|x|)          (1 for the k entries of largest magnitude, 0 elsewhere)
    y = x ⊙ M

and trains through the non-differentiable mask with the straight-through estimator
``∂L/∂x = ∂L/∂y`` (the gradient is *not* masked).  **Block Q-Sparse** applies the same rule inside
every block of ``M`` consecutive features (N:M sparsity, e.g. 16:32), which is what batched
inference hardware can exploit.

Rounding of ``k``: ``k = d - round_half_up(sparsity · d)``, i.e. the number of *dropped* features is
``floor(sparsity · d + 0.5)``.  With ``sparsity = 0.5`` and odd ``d = 5``, 3 features are dropped and
2 kept.  ``k = 0`` is an error (a linear layer with an all-zero input is not a model).

Ties: when several entries share the k-th largest magnitude, the ones with the **lowest feature
index** are kept.  This rule is deterministic on every device and is what the tensor-parallel global
top-K (``qsparse_dist.layers.global_topk``) reproduces across shards.
"""

from __future__ import annotations

import math

import torch

from .dispatch import kernel, triton_kernels_for

__all__ = [
    "apply_mask",
    "kept_count",
    "validate_sparsity",
    "topk_threshold",
    "mask_from_threshold",
    "topk_mask",
    "topk_sparsify",
    "l2_rescale",
]


def validate_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as float or raise ``ValueError`` naming the argument."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return s


def kept_count(d: int, sparsity: float, name: str = "sparsity") -> int:
    """Number of features kept out of ``d``: ``k = d - floor(sparsity·d + 0.5)``; ``k >= 1``."""
    s = validate_sparsity(sparsity, name)
    if d <= 0:
        raise ValueError(f"feature dim must be positive, got {d}")
    k = d - int(math.floor(s * d + 0.5))
    if k <= 0:
        raise ValueError(f"{name}={sparsity} keeps k=0 of {d} features; lower the sparsity")
    return k


def _check_input(x: torch.Tensor, block_size: int | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (features last)")
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if x.shape[-1] % block_size:
            raise ValueError(
                f"block_size={block_size} does not divide the feature dim {x.shape[-1]}"
            )


def topk_threshold(a: torch.Tensor, k: int, method: str = "topk") -> torch.Tensor:
    """The k-th largest value of ``a`` along the last dim, shape ``[..., 1]``.

    ``method="topk"`` uses ``torch.topk``; ``"kthvalue"`` uses ``torch.kthvalue`` on the
    (d-k+1)-th smallest.  Both return the same value; speed differs by device and shape
    (``tools/bench_ops.py``).
    """
    d = a.shape[-1]
    if method == "topk":
        return a.topk(k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
    if method == "kthvalue":
        return a.kthvalue(d - k + 1, dim=-1, keepdim=True).values
    raise ValueError(f"method must be 'topk' or 'kthvalue', got {method!r}")


def mask_from_threshold(
    a: torch.Tensor, threshold: torch.Tensor, ties_to_keep: torch.Tensor
) -> torch.Tensor:
    """Keep ``a > threshold`` plus the first ``ties_to_keep`` entries equal to the threshold.

    ``ties_to_keep`` broadcasts against ``a[..., :1]``.  "First" = lowest index, the tie rule of
    :func:`topk_mask`.
    """
    gt = a > threshold
    eq = a == threshold
    return gt | (eq & (eq.cumsum(dim=-1) <= ties_to_keep))


def _row_mask(a: torch.Tensor, k: int, method: str) -> torch.Tensor:
    if k >= a.shape[-1]:
        return torch.ones_like(a, dtype=torch.bool)
    t = topk_threshold(a, k, method)
    need = k - (a > t).sum(dim=-1, keepdim=True)
    return mask_from_threshold(a, t, need)


def topk_mask(
    x: torch.Tensor,
    sparsity: float,
    *,
    block_size: int | None = None,
    method: str = "topk",
) -> torch.Tensor:
    """Boolean mask of the kept entries: top-k of ``|x|`` per row (or per block of ``block_size``)."""
    _check_input(x, block_size)
    if method in ("topk", "kthvalue") and triton_kernels_for(x):
        return kernel("topk_mask")(x, sparsity, block_size=block_size)
    with torch.no_grad():
        a = x.detach().abs()
        if block_size is None:
            return _row_mask(a, kept_count(a.shape[-1], sparsity), method)
        k = kept_count(block_size, sparsity)
        blocks = a.reshape(*a.shape[:-1], a.shape[-1] // block_size, block_size)
        return _row_mask(blocks, k, method).reshape(a.shape)


class _MaskSTE(torch.autograd.Function):
    """y = x ⊙ M; backward passes the gradient unmasked (STE) or masked."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, ste: bool) -> torch.Tensor:
        ctx.ste = ste
        if not ste:
            ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.ste:
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def apply_mask(x: torch.Tensor, mask: torch.Tensor, ste: bool = True) -> torch.Tensor:
    """``x ⊙ mask`` with the straight-through (``ste=True``) or masked backward."""
    return _MaskSTE.apply(x, mask, ste)


def l2_rescale(y: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rescale each row of the sparsified ``y`` to the L2 norm of the dense ``x``.

    ``y · ‖x‖₂ / ‖y‖₂`` per token, so top-K does not shrink the activation scale.  The paper
    mentions re-scaling after top-K without a formula; this norm-preserving form is our reading.
    """
    return y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True).clamp_min(eps))


def topk_sparsify(
    x: torch.Tensor,
    sparsity: float,
    *,
    block_size: int | None = None,
    ste: bool = True,
    rescale: bool = False,
    method: str = "topk",
) -> torch.Tensor:
    """Q-Sparse: keep the top-k ``|x|`` per token (or per N:M block), zero the rest.

    Args:
        x: floating tensor ``[..., d]``, features last.
        sparsity: fraction of features dropped, in ``[0, 1)``; ``k = d - round(sparsity·d)``.
        block_size: ``M`` for Block Q-Sparse (N:M); must divide ``d``.
        ste: straight-through backward (``∂L/∂x = ∂L/∂y``); ``False`` masks the gradient.
        rescale: L2 re-scaling after top-K (:func:`l2_rescale`), off by default.
        method: threshold selection, ``"topk"`` or ``"kthvalue"``.
    """
    if not rescale and method in ("topk", "kthvalue") and triton_kernels_for(x):
        _check_input(x, block_size)
        return kernel("topk_sparsify")(x, sparsity, block_size=block_size, ste=ste)
    mask = topk_mask(x, sparsity, block_size=block_size, method=method)
    y = apply_mask(x, mask, ste)
    return l2_rescale(y, x) if rescale else y
