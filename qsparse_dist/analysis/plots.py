"""Figures of a scaling-law fit (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .scaling_law import FitResult

__all__ = ["plot_scaling_law"]


def plot_scaling_law(
    N: Sequence[float],
    S: Sequence[float],
    L: Sequence[float],
    fit: FitResult,
    path: str | Path,
    n_active: Sequence[float] = (),
    title: str = "",
) -> Path:
    """Left: observed loss vs N per sparsity level with the fitted curves.  Right: the fitted
    ``L(N_a, S)`` vs S at fixed activated-parameter budgets, with the optimum ``S*`` (and its
    bootstrap interval when the fit has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N, S, L = (np.asarray(v, dtype=float) for v in (N, S, L))
    law = fit.law
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    levels = np.unique(np.round(S, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(levels)))
    n_grid = np.geomspace(N.min() / 2, N.max() * 2, 200)
    for lvl, col in zip(levels, colors):
        sel = np.isclose(S, lvl, atol=5e-5)
        ax1.scatter(N[sel], L[sel], color=col, zorder=3)
        ax1.plot(n_grid, law.loss(n_grid, lvl), color=col, label=f"S={lvl:.2f}")
    ax1.set_xscale("log")
    ax1.set_xlabel("N (non-embedding parameters)")
    ax1.set_ylabel("loss")
    ax1.set_title("fit: L(N,S) = E + A(S)/N^α")
    ax1.legend(fontsize=8)

    budgets = list(n_active) or [float(np.median(N * (1 - S)))]
    s_grid = np.linspace(0.0, 0.95, 400)
    for b in budgets:
        ax2.plot(s_grid, law.loss_at_active(b, s_grid), label=f"N_a={b:.3g}")
    s_star = fit.optimal_sparsity
    ax2.axvline(s_star, color="k", ls="--", label=f"S*={100 * s_star:.2f}%")
    if "optimal_sparsity" in fit.ci:
        lo, hi = fit.ci["optimal_sparsity"]
        ax2.axvspan(lo, hi, color="k", alpha=0.1, label=f"95% CI [{100 * lo:.1f}, {100 * hi:.1f}]%")
    ax2.set_xlabel("sparsity S")
    ax2.set_ylabel("L(N_a, S)")
    ax2.set_title("inference-optimal sparsity at fixed activated parameters")
    ax2.legend(fontsize=8)
    c = law
    fig.suptitle(title or f"E={c.E:.3g} B={c.B:.3g} C={c.C:.3g} α={c.alpha:.3g} β={c.beta:.3g}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
