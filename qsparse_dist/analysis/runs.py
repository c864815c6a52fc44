"""Read finished training runs into scaling-law observations ``(N, S, L)``.

A run directory (``train.run_dir``) holds ``metrics.jsonl`` (one JSON object per optimizer step with
``step`` and ``loss``; eval steps add ``val_loss``, see ``qsparse_dist.train.metrics``) and the
resolved run config, either as ``config.yaml`` at its top or inside its checkpoints
(``checkpoints/latest`` → ``checkpoints/step_*/config.yaml``, ``qsparse_dist.train.checkpoint``).

``N`` = non-embedding parameters (:func:`~qsparse_dist.config.shapes.count_params`, re-exported here:
norms, attention, FFN/MoE incl. the router; not the token embedding nor the LM head), as in the paper's
scaling law.  ``S`` = the overall
activation sparsity (:func:`overall_sparsity`): each projection's effective sparsity (after the
``kept_count`` rounding, per N:M block for Block Q-Sparse) weighted by that projection's weight count.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config
from ..config.schema import PROJECTIONS, ModelConfig, SparsityConfig
from ..config.shapes import count_params, projection_params, projection_table
from ..ops import kept_count

__all__ = ["RunPoint", "count_params", "projection_params", "projection_sparsity", "overall_sparsity",
           "find_run_config", "read_metrics", "load_run", "load_runs", "discover_runs", "precision_of"]


def projection_sparsity(m: ModelConfig, s: SparsityConfig) -> dict[str, float]:
    """Fraction of each projection's input features that top-K drops, after rounding
    (``1 − k/d`` with ``k = kept_count(d, s)``, ``d`` = the block size for N:M); 0 without top-K."""
    out, table = {}, projection_table(m)
    for proj in PROJECTIONS:
        recipe = s.recipe(proj)
        if not recipe.uses_topk:
            out[proj] = 0.0
            continue
        d = recipe.block_size or table[proj].in_features
        out[proj] = 1.0 - kept_count(d, recipe.sparsity, name=f"sparsity.{proj}") / d
    return out


def overall_sparsity(cfg: RunConfig) -> float:
    """Parameter-weighted activation sparsity ``Σ_p s_p·n_p / Σ_p n_p`` over qkv/out/up/down."""
    n = projection_params(cfg.model)
    s = projection_sparsity(cfg.model, cfg.sparsity)
    return sum(s[p] * n[p] for p in PROJECTIONS) / sum(n.values())


def precision_of(cfg: RunConfig) -> str:
    """``"1.58"`` for the BitNet kinds (ternary weights), else ``"fp"``: the paper fits them separately."""
    return "1.58" if cfg.sparsity.linear.startswith("bitnet") else "fp"


@dataclass(frozen=True)
class RunPoint:
    run_dir: str
    n_params: int
    sparsity: float
    loss: float
    precision: str
    linear: str
    step: int
    steps: int

    def as_dict(self) -> dict:
        return asdict(self)


def find_run_config(run_dir: Path) -> Path:
    """``config.yaml`` of a run: at its top, else in the checkpoint ``latest`` names, else the newest."""
    top = run_dir / "config.yaml"
    if top.is_file():
        return top
    ckpts = run_dir / "checkpoints"
    latest = ckpts / "latest"
    if latest.is_file():
        cand = ckpts / latest.read_text().strip() / "config.yaml"
        if cand.is_file():
            return cand
    found = sorted(ckpts.glob("step_*/config.yaml"))
    if found:
        return found[-1]
    raise ValueError(f"run {run_dir}: no config.yaml (looked at the top and in checkpoints/)")


def read_metrics(path: Path) -> list[dict]:
    """Records of ``metrics.jsonl`` sorted by step; a line cut by a kill is skipped."""
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            recs.append(rec)
    return sorted(recs, key=lambda r: r["step"])


def load_run(run_dir: str | Path, *, loss: str = "val", allow_unfinished: bool = False,
             train_tail: float = 0.1) -> RunPoint:
    """One observation.  ``loss="val"``: the last ``val_loss``; ``"train"``: the mean ``loss`` of the
    last ``train_tail`` fraction of steps (at least one)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"run {run_dir}: no metrics.jsonl (not a run directory)")
    try:
        cfg = load_config(find_run_config(run_dir))
    except ConfigError as e:
        raise ValueError(f"run {run_dir}: {e}") from None
    recs = read_metrics(metrics)
    if not recs:
        raise ValueError(f"run {run_dir}: metrics.jsonl holds no step records")
    last = recs[-1]["step"]
    if last < cfg.train.steps and not allow_unfinished:
        raise ValueError(f"run {run_dir}: unfinished (step {last} of train.steps={cfg.train.steps}); "
                         "finish it or pass --allow-unfinished")
    if loss == "val":
        vals = [r for r in recs if isinstance(r.get("val_loss"), (int, float))]
        if not vals:
            raise ValueError(f"run {run_dir}: no val_loss in metrics.jsonl (set train.eval_interval, or "
                             "use --loss train)")
        value = float(vals[-1]["val_loss"])
    elif loss == "train":
        tail = recs[-max(1, int(len(recs) * train_tail)):]
        value = sum(float(r["loss"]) for r in tail) / len(tail)
    else:
        raise ValueError(f"loss must be 'val' or 'train', got {loss!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"run {run_dir}: loss {value} is not a positive finite number")
    return RunPoint(run_dir=str(run_dir), n_params=count_params(cfg.model), sparsity=overall_sparsity(cfg),
                    loss=value, precision=precision_of(cfg), linear=cfg.sparsity.linear, step=last,
                    steps=cfg.train.steps)


def discover_runs(paths: list[str | Path]) -> list[Path]:
    """Each path is a run directory (holds ``metrics.jsonl``) or a folder searched for run directories."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ValueError(f"--runs {p}: no such directory")
        if (p / "metrics.jsonl").is_file():
            found.append(p)
        else:
            found.extend(sorted(m.parent for m in p.rglob("metrics.jsonl")))
    unique = list(dict.fromkeys(found))
    if not unique:
        raise ValueError(f"no runs found in {', '.join(map(str, paths))} (a run directory holds metrics.jsonl)")
    return unique


def load_runs(paths: list[str | Path], *, loss: str = "val", allow_unfinished: bool = False,
              precision: str | None = None) -> list[RunPoint]:
    """All runs under ``paths``; with mixed full-precision and 1.58-bit runs ``precision`` must pick one."""
    points = [load_run(d, loss=loss, allow_unfinished=allow_unfinished) for d in discover_runs(paths)]
    if precision is not None:
        if precision not in ("fp", "1.58"):
            raise ValueError(f"precision must be 'fp' or '1.58', got {precision!r}")
        points = [p for p in points if p.precision == precision]
        if not points:
            raise ValueError(f"no runs with precision {precision} (sparsity.linear "
                             f"{'bitnet*' if precision == '1.58' else 'dense/qsparse/block_qsparse'})")
    elif len({p.precision for p in points}) > 1:
        raise ValueError("the runs mix full-precision and 1.58-bit (bitnet*) models, which follow different "
                         "laws; fit them separately with --precision fp or --precision 1.58")
    return points
