"""Per-projection sparsity schedule for continue-training a pretrained dense model with Q-Sparse.

Switching a pretrained SiLU model to 50–70 % top-K at once is a shock to the loss; ramping each
projection's sparsity from dense to its target lets the model adapt::

    s_p(t) = s_p^target · min(1, t / ramp_steps)          (t = optimizer steps already taken)

so step 0 runs dense and step ``ramp_steps`` onward runs at the configured ``sparsity.{qkv,out,up,down}``.
Each projection ramps towards its *own* target, so the per-projection ratios of the paper's tables
hold at every step.  BitNet quantization, when configured, is on from the start (only the top-K ramps).

Works on any module tree whose sparse linears keep their :class:`~qsparse_dist.ops.LinearRecipe` in a
``recipe`` attribute (the reference :class:`~qsparse_dist.layers.SparseLinear` and the megatron-core
parallel linears); the training loop calls :meth:`SparsityRamp.apply` once before each step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import nn

from ..ops import LinearRecipe

__all__ = ["ramp_fraction", "SparsityRamp"]


def ramp_fraction(step: int, ramp_steps: int) -> float:
    """``min(1, step / ramp_steps)``; 1 when ``ramp_steps == 0`` (no ramp)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


class SparsityRamp:
    """Remembers every sparse linear's target recipe, then sets ``recipe.sparsity`` for a step."""

    def __init__(self, models: nn.Module | Iterable[nn.Module], ramp_steps: int) -> None:
        if isinstance(models, nn.Module):
            models = [models]
        self.ramp_steps = int(ramp_steps)
        self._targets: list[tuple[nn.Module, LinearRecipe]] = [
            (mod, mod.recipe)
            for m in models
            for mod in m.modules()
            if isinstance(getattr(mod, "recipe", None), LinearRecipe)
        ]
        self.fraction: float | None = None

    @property
    def active(self) -> bool:
        return self.ramp_steps > 0 and any(t.uses_topk for _, t in self._targets)

    def apply(self, step: int) -> float:
        """Set every linear's sparsity for optimizer step ``step``; return the ramp fraction."""
        frac = ramp_fraction(step, self.ramp_steps)
        if frac != self.fraction:
            for mod, target in self._targets:
                mod.recipe = dataclasses.replace(target, sparsity=target.sparsity * frac)
            self.fraction = frac
        return frac
