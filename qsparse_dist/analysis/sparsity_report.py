"""Measured activation sparsity per layer × projection and MoE expert load of a model on data.

Runs the single-device reference model (``qsparse_dist.model.QSparseGPT``) with sparsity tracking on
(``set_track_sparsity`` / ``sparsity_stats``: the fraction of exact zeros of each projection's input,
i.e. top-K zeros plus any the activation itself produced) over a few batches and averages per batch.
MoE load = tokens routed to each expert (all top-k slots) / all routed slots, summed over the batches.

:func:`measure_batch_union` answers what a batched sparse decode GEMV must read: with ``g`` sequences
decoded together, a weight row (input feature) is needed when ANY of the ``g`` tokens of a step keeps
that feature, so the bytes of a step scale with the union of the ``g`` masks, not with one token's.
For independent masks keeping a fraction ``f`` the union is ``1 - (1 - f)^g`` (2:4 at ``g = 4``: 93.75 %);
trained activations share large features and may overlap more.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..config.schema import PROJECTIONS
from ..config.shapes import projection_of_module
from ..layers import SparseLinear
from ..model import QSparseGPT
from .runs import projection_sparsity

__all__ = ["SparsityReport", "measure_sparsity", "measure_batch_union", "token_batches", "plot_report",
           "format_report"]


@dataclass
class SparsityReport:
    layers: int
    sparsity: np.ndarray  # [layers, 4] in PROJECTIONS order, NaN where a projection never ran
    target: dict[str, float]  # configured top-K sparsity per projection (after rounding)
    expert_load: np.ndarray | None = None  # [layers, experts] fractions, rows sum to 1
    tokens: int = 0
    batches: int = 0
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {
            "projections": list(PROJECTIONS),
            "sparsity": [[None if np.isnan(v) else float(v) for v in row] for row in self.sparsity],
            "mean_per_projection": {p: _nanmean(self.sparsity[:, j]) for j, p in enumerate(PROJECTIONS)},
            "target": self.target,
            "tokens": self.tokens,
            "batches": self.batches,
            **self.meta,
        }
        if self.expert_load is not None:
            out["expert_load"] = self.expert_load.tolist()
            out["expert_load_max_over_mean"] = [float(r.max() * len(r)) for r in self.expert_load]
        return out


def _nanmean(a: np.ndarray) -> float | None:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else None


def token_batches(tokens: np.ndarray, seq_length: int, batch_size: int, batches: int) -> Iterable[torch.Tensor]:
    """``batches`` batches of ``[batch_size, seq_length]`` windows spread evenly over a token array."""
    n_windows = (len(tokens) - 1) // seq_length
    need = batch_size * batches
    if n_windows < 1:
        raise ValueError(f"the data holds {len(tokens)} tokens, fewer than one window of seq_length={seq_length}")
    starts = np.linspace(0, n_windows - 1, min(need, n_windows)).astype(int) * seq_length
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        yield torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_length], dtype=np.int64) for s in chunk]))


@torch.no_grad()
def measure_sparsity(model: QSparseGPT, cfg: RunConfig, batches: Iterable[torch.Tensor]) -> SparsityReport:
    """Forward each batch with tracking on; average the per-batch zero fractions."""
    n_layers = cfg.model.num_layers
    sums = np.zeros((n_layers, len(PROJECTIONS)))
    counts = np.zeros((n_layers, len(PROJECTIONS)))
    moe = cfg.model.moe
    load = np.zeros((n_layers, moe.num_experts)) if moe is not None else None
    model.eval()
    model.set_track_sparsity(True)
    tokens = n_batches = 0
    vocab = cfg.model.vocab_size
    try:
        for batch in batches:
            if int(batch.max()) >= vocab:
                raise ValueError(f"token id {int(batch.max())} is outside the model's vocab_size={vocab}: "
                                 "the data was prepared with another tokenizer")
            for mod in model.modules():  # no stale values from experts that get no token this batch
                if isinstance(mod, SparseLinear):
                    mod.last_input_zero_fraction = None
            model(batch)
            for key, frac in model.sparsity_stats().items():
                _, layer, proj = key.split(".")
                j = PROJECTIONS.index(proj)
                sums[int(layer), j] += frac
                counts[int(layer), j] += 1
            if load is not None:
                for i, blk in enumerate(model.layers):
                    load[i] += blk.ffn.last_tokens_per_expert.double().numpy()
            tokens += batch.numel()
            n_batches += 1
    finally:
        model.set_track_sparsity(False)
    if n_batches == 0:
        raise ValueError("no batches to measure")
    with np.errstate(invalid="ignore"):
        sparsity = sums / counts
    if load is not None:
        load = load / load.sum(axis=1, keepdims=True)
    target = projection_sparsity(cfg.model, cfg.sparsity)
    return SparsityReport(layers=n_layers, sparsity=sparsity, target=target, expert_load=load,
                          tokens=tokens, batches=n_batches)


def _union_fraction(mask: torch.Tensor, group: int) -> float:
    """``mask [B, T, K]`` bool; sequences taken ``group`` at a time at the same position (a batched
    decode step): the mean fraction of the K features kept by at least one of them."""
    b = mask.shape[0] // group * group
    m = mask[:b].reshape(b // group, group, *mask.shape[1:]).any(dim=1)
    return float(m.float().mean())


@torch.no_grad()
def measure_batch_union(model: QSparseGPT, batches: Iterable[torch.Tensor], group: int,
                        nm: tuple[int, int] = (2, 4)) -> dict[str, dict[str, float]]:
    """Per projection (averaged over layers and batches): the fraction of input features a batch of
    ``group`` decode streams must read — ``own``: union of the model's own masks (the nonzeros of its
    sparsified input); ``nm``: union of per-token ``N:M`` masks (``nm`` = (N, M), top-N of every M
    consecutive ``|x|``) computed on the same unsparsified inputs; ``single``: one token's own fraction.
    Batches must hold at least ``group`` sequences.  MoE expert projections are left out (their inputs
    are routed tokens, not one row per sequence and position)."""
    from ..ops import topk_mask

    n, m_blk = nm
    acc: dict[str, dict[str, list[float]]] = {}
    hooks = []

    def hook(name):
        proj = projection_of_module(name)

        def fn(mod, args):
            x = args[0]
            if x.dim() != 3:  # MoE experts see routed tokens, not [batch, position] rows
                return
            own = mod.recipe.sparsify(x) != 0
            blk = topk_mask(x, 1.0 - n / m_blk, block_size=m_blk) if x.shape[-1] % m_blk == 0 else own
            d = acc.setdefault(proj, {"single": [], "own": [], "nm": []})
            d["single"].append(float(own.float().mean()))
            d["own"].append(_union_fraction(own, group))
            d["nm"].append(_union_fraction(blk, group))
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    model.eval()
    try:
        for batch in batches:
            if batch.shape[0] < group:
                raise ValueError(f"--batch-size {batch.shape[0]} is smaller than the union group {group}")
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {p: {k: float(np.mean(v)) for k, v in d.items()} for p, d in acc.items()}


def format_report(rep: SparsityReport) -> str:
    """The report as a plain-text table."""
    head = f"{'layer':>5} " + " ".join(f"{p:>7}" for p in PROJECTIONS)
    lines = [f"activation sparsity (fraction of zero inputs), {rep.tokens} tokens in {rep.batches} batches",
             head, "-" * len(head)]
    for i, row in enumerate(rep.sparsity):
        lines.append(f"{i:>5} " + " ".join("    n/a" if np.isnan(v) else f"{v:>7.4f}" for v in row))
    lines.append("-" * len(head))
    means = [_nanmean(rep.sparsity[:, j]) for j in range(len(PROJECTIONS))]
    lines.append(f"{'mean':>5} " + " ".join("    n/a" if m is None else f"{m:>7.4f}" for m in means))
    lines.append(f"{'top-K':>5} " + " ".join(f"{rep.target[p]:>7.4f}" for p in PROJECTIONS))
    if rep.expert_load is not None:
        e = rep.expert_load.shape[1]
        lines += ["", f"MoE expert load (fraction of routed slots; uniform = {1 / e:.4f})",
                  f"{'layer':>5} " + " ".join(f"{'e' + str(k):>7}" for k in range(e)) + f" {'max/mean':>9}"]
        for i, row in enumerate(rep.expert_load):
            lines.append(f"{i:>5} " + " ".join(f"{v:>7.4f}" for v in row) + f" {row.max() * e:>9.3f}")
    return "\n".join(lines)


def plot_report(rep: SparsityReport, path: str | Path, title: str = "") -> Path:
    """Heat map(s): layers × projections activation sparsity, and layers × experts load for MoE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if rep.expert_load is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 1.2 + 0.45 * rep.layers), squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(rep.sparsity, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(PROJECTIONS)), [f"{p}\n(top-K {rep.target[p]:.2f})" for p in PROJECTIONS])
    ax.set_yticks(range(rep.layers))
    ax.set_ylabel("layer")
    ax.set_title("activation sparsity")
    for (i, j), v in np.ndenumerate(rep.sparsity):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=ax)
    if rep.expert_load is not None:
        ax = axes[0, 1]
        im = ax.imshow(rep.expert_load, cmap="viridis", aspect="auto", vmin=0.0)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(rep.layers))
        ax.set_title("MoE expert load")
        fig.colorbar(im, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
