"""Quality report over training runs: a markdown table and loss/sparsity plots.

For each run directory (``metrics.jsonl`` + its resolved config, see :mod:`.runs`) the table gives the
final validation loss, its gap to the baseline in percent ``100·(L − L_base)/L_base`` (the baseline is
the ``dense`` run unless named; BitNet runs also get the gap to the plain ``bitnet`` run when there is
one, the same-precision comparison the paper makes), the measured input sparsity per projection (the
last logged ``sparsity`` record: the fraction of exact zeros of each projection's input), the tokens
seen and the median tokens/s.  The plots are the validation (and smoothed training) loss against
tokens, and the measured sparsity per projection.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_config
from ..config.schema import PROJECTIONS
from .runs import count_params, discover_runs, find_run_config, read_metrics

__all__ = ["RunSummary", "summarize_run", "quality_table", "plot_quality", "write_report"]


@dataclass
class RunSummary:
    name: str
    run_dir: str
    linear: str
    configured: dict[str, float]
    n_params: int
    tokens: int
    steps: int
    val_loss: float | None
    tokens_per_s: float | None
    sparsity: dict[str, float] = field(default_factory=dict)
    curve_tokens: list[int] = field(default_factory=list)
    curve_loss: list[float] = field(default_factory=list)
    val_tokens: list[int] = field(default_factory=list)
    val_curve: list[float] = field(default_factory=list)


def summarize_run(run_dir: str | Path) -> RunSummary:
    run_dir = Path(run_dir)
    cfg = load_config(find_run_config(run_dir))
    recs = read_metrics(run_dir / "metrics.jsonl")
    if not recs:
        raise ValueError(f"run {run_dir}: metrics.jsonl holds no step records")
    vals = [r for r in recs if isinstance(r.get("val_loss"), (int, float))]
    sparse = [r["sparsity"] for r in recs if isinstance(r.get("sparsity"), dict) and r["sparsity"]]
    speeds = [r["tokens_per_s"] for r in recs[1:] if isinstance(r.get("tokens_per_s"), (int, float))]
    configured = {p: getattr(cfg.sparsity, p) for p in PROJECTIONS} if cfg.sparsity.linear != "dense" else {}
    return RunSummary(
        name=run_dir.name, run_dir=str(run_dir), linear=cfg.sparsity.linear, configured=configured,
        n_params=count_params(cfg.model), tokens=int(recs[-1].get("tokens", 0)), steps=recs[-1]["step"],
        val_loss=float(vals[-1]["val_loss"]) if vals else None,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        sparsity=dict(sparse[-1]) if sparse else {},
        curve_tokens=[int(r.get("tokens", 0)) for r in recs], curve_loss=[float(r["loss"]) for r in recs],
        val_tokens=[int(r.get("tokens", 0)) for r in vals], val_curve=[float(r["val_loss"]) for r in vals],
    )


def _gap(loss: float | None, base: RunSummary | None) -> str:
    if loss is None or base is None or base.val_loss is None:
        return "—"
    return f"{100 * (loss - base.val_loss) / base.val_loss:+.2f}%"


def quality_table(runs: list[RunSummary], baseline: str | None = None) -> str:
    """The markdown table; ``baseline`` names a run (directory name), default the ``dense`` one."""
    by_name = {r.name: r for r in runs}
    if baseline is not None and baseline not in by_name:
        raise ValueError(f"--baseline {baseline}: no such run among {sorted(by_name)}")
    base = by_name[baseline] if baseline else next((r for r in runs if r.linear == "dense"), None)
    ternary = next((r for r in runs if r.linear == "bitnet"), None)
    head = ("| run | linear | configured sparsity q/o/u/d | N (non-emb.) | tokens | val loss | gap to "
            f"{base.name if base else 'dense'} | gap to bitnet | measured sparsity q/o/u/d | tokens/s |")
    lines = [head, "|" + "---|" * 10]
    for r in runs:
        conf = "/".join(f"{r.configured[p]:.2f}" for p in PROJECTIONS) if r.configured else "—"
        meas = "/".join(f"{r.sparsity.get(p, float('nan')):.3f}" for p in PROJECTIONS) if r.sparsity else "—"
        tern = _gap(r.val_loss, ternary) if r.linear.startswith("bitnet") and r is not ternary else "—"
        lines.append(
            f"| {r.name} | {r.linear} | {conf} | {r.n_params / 1e6:.1f}M | {r.tokens / 1e6:.1f}M | "
            f"{'—' if r.val_loss is None else f'{r.val_loss:.4f}'} | {_gap(r.val_loss, base) if r is not base else '—'} "
            f"| {tern} | {meas} | {'—' if r.tokens_per_s is None else f'{r.tokens_per_s:,.0f}'} |")
    return "\n".join(lines) + "\n"


def plot_quality(runs: list[RunSummary], out_dir: str | Path) -> list[Path]:
    """``loss.png`` (validation loss, and training loss as a moving average, against tokens) and
    ``sparsity.png`` (measured sparsity per projection, one bar group per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        w = max(1, len(r.curve_loss) // 50)
        smooth = np.convolve(r.curve_loss, np.ones(w) / w, mode="valid")
        line, = ax1.plot(np.asarray(r.curve_tokens[w - 1:]) / 1e6, smooth, label=r.name, lw=1)
        if r.val_curve:
            ax2.plot(np.asarray(r.val_tokens) / 1e6, r.val_curve, "o-", color=line.get_color(), label=r.name)
    for ax, title in ((ax1, "training loss (moving average)"), (ax2, "validation loss")):
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    loss_png = out_dir / "loss.png"
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(PROJECTIONS))
    for i, r in enumerate(runs):
        ax.bar(x + i * width, [r.sparsity.get(p, 0.0) for p in PROJECTIONS], width, label=r.name)
    ax.set_xticks(x + width * (len(runs) - 1) / 2, PROJECTIONS)
    ax.set_ylabel("measured input sparsity")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    sparsity_png = out_dir / "sparsity.png"
    fig.savefig(sparsity_png, dpi=110)
    plt.close(fig)
    return [loss_png, sparsity_png]


def write_report(paths: list[str | Path], out_dir: str | Path, baseline: str | None = None) -> Path:
    """``report.md`` (the table and the figures) plus ``loss.png`` and ``sparsity.png`` in ``out_dir``."""
    runs = [summarize_run(d) for d in discover_runs(list(paths))]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run directory names must differ (they label the table): {names}")
    table = quality_table(runs, baseline)
    figs = plot_quality(runs, out_dir)
    md = Path(out_dir) / "report.md"
    md.write_text("# Quality report\n\n" + table + "\n" + "".join(f"![{f.stem}]({f.name})\n" for f in figs))
    return md
