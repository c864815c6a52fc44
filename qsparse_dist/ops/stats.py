"""Cheap activation-sparsity statistics for logging.

``zero_fraction(x)`` = (#exact zeros) / numel, computed without autograd and without a host sync;
callers accumulate the returned 0-dim tensors and convert to Python floats once per log interval.
"""

from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["zero_fraction", "SparsityMeter"]


@torch.no_grad()
def zero_fraction(x: torch.Tensor) -> torch.Tensor:
    """Fraction of exact zeros in ``x`` as a 0-dim float32 tensor on ``x``'s device."""
    n = x.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return 1.0 - torch.count_nonzero(x).float() / n


class SparsityMeter:
    """Running mean of zero fractions per key (e.g. ``"layers.0.qkv"``)."""

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = defaultdict(int)

    def update(self, key: str, frac: torch.Tensor) -> None:
        frac = frac.detach().float()
        self._sum[key] = self._sum[key] + frac if key in self._sum else frac
        self._count[key] += 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / self._count[k] for k, v in sorted(self._sum.items())}

    def reset(self) -> None:
        self._sum.clear()
        self._count.clear()
