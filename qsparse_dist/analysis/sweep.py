"""Expand a sweep file (``configs/sweep/*.yaml``) into one training run per model size × sparsity.

Sweep file::

    base: ../sweep/base_cpu.yaml      # a run config (path relative to this file) — or an inline mapping
    overrides: [train.steps=200]      # applied to every run (key.path=value, as on the train command line)
    sizes:                            # name -> model overrides
      h64:  {model.hidden_size: 64, model.num_layers: 2, model.num_attention_heads: 4}
      h128: {model.hidden_size: 128, model.num_layers: 2, model.num_attention_heads: 4}
    sparsities: [0.0, 0.4, 0.6, 0.8]  # set on sparsity.qkv/out/up/down of every run

Each run gets ``train.run_dir = OUT_ROOT/<size>_s<sparsity>`` and is validated here (the whole
resolved config), so a bad grid fails before the first run starts.  ``launch/sweep.sh`` calls

    python -m qsparse_dist.analysis.sweep SWEEP.yaml OUT_ROOT [key.path=value ...]

which writes ``OUT_ROOT/base_config.yaml``, prints its path and then one line per run,
``<run name> <done|todo> <override> <override> ...`` (shell-quoted; the extra overrides come last;
``done`` = its ``metrics.jsonl`` already reached ``train.steps``).  The runs then feed
``qsparse-dist fit-scaling-law --runs OUT_ROOT``.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import ConfigError, config_from_dict, dump_config
from ..config.schema import PROJECTIONS

__all__ = ["SweepRun", "plan_sweep", "main"]


@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: tuple[str, ...]
    done: bool = False


def _finished(run_dir: Path, steps: int) -> bool:
    """The run's ``metrics.jsonl`` reached ``steps``."""
    from .runs import read_metrics

    metrics = run_dir / "metrics.jsonl"
    recs = read_metrics(metrics) if metrics.is_file() else []
    return bool(recs) and recs[-1]["step"] >= steps


def _fmt(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path}: the top level must be a mapping")
    unknown = set(data) - {"base", "overrides", "sizes", "sparsities"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {sorted(unknown)} "
                          "(allowed: base, overrides, sizes, sparsities)")
    return data


def plan_sweep(sweep_file: str | Path, out_root: str | Path,
               extra: list[str] | tuple[str, ...] = ()) -> tuple[dict, list[SweepRun]]:
    """``(base config mapping, runs)``; every run's resolved config (with ``extra`` overrides last)
    is validated."""
    path = Path(sweep_file)
    data = _load(path)
    base = data.get("base", {})
    if isinstance(base, str):
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"sweep file {path}: base config {base_path} not found")
        base = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
    if not isinstance(base, dict):
        raise ConfigError(f"sweep file {path}: base must be a config path or mapping")
    common = data.get("overrides") or []
    if not isinstance(common, list) or not all(isinstance(o, str) for o in common):
        raise ConfigError(f"sweep file {path}: overrides must be a list of key.path=value strings")
    sizes = data.get("sizes")
    if not isinstance(sizes, dict) or not sizes:
        raise ConfigError(f"sweep file {path}: sizes must map names to model overrides (at least one)")
    sparsities = data.get("sparsities")
    if not isinstance(sparsities, list) or len(sparsities) < 1:
        raise ConfigError(f"sweep file {path}: sparsities must be a non-empty list")
    runs = []
    for size, model_over in sizes.items():
        if not isinstance(model_over, dict):
            raise ConfigError(f"sweep file {path}: sizes.{size} must be a mapping of key.path: value")
        for s in sparsities:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
                raise ConfigError(f"sweep file {path}: sparsities: {s!r} is not in [0, 1)")
            name = f"{size}_s{round(100 * s):02d}"
            over = [*common, *(f"{k}={_fmt(v)}" for k, v in model_over.items()),
                    *(f"sparsity.{p}={s}" for p in PROJECTIONS),
                    f"train.run_dir={Path(out_root) / name}", *extra]
            try:
                cfg = config_from_dict(base, over)
            except ConfigError as e:
                raise ConfigError(f"sweep run {name}: {e}") from None
            runs.append(SweepRun(name, tuple(over), _finished(Path(cfg.train.run_dir), cfg.train.steps)))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep file {path}: two runs share a name (sparsities that round to the same %)")
    return base, runs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m qsparse_dist.analysis.sweep SWEEP.yaml OUT_ROOT [key.path=value ...]",
              file=sys.stderr)
        return 2
    try:
        base, runs = plan_sweep(argv[0], argv[1], argv[2:])
    except ConfigError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    base_file = out / "base_config.yaml"
    base_file.write_text(dump_config(config_from_dict(base)), encoding="utf-8")
    lines = [str(base_file)]
    lines += [" ".join([shlex.quote(r.name), "done" if r.done else "todo", *map(shlex.quote, r.overrides)])
              for r in runs]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
