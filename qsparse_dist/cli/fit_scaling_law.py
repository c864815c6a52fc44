"""``qsparse-dist fit-scaling-law --runs DIR... [--out DIR]`` — fit the Q-Sparse scaling law
``L(N, S) = E + (B + C·exp(β/(1−S)))/N^α`` to finished runs, report the constants with bootstrap
confidence intervals and the inference-optimal sparsity, and plot the fit
(``qsparse_dist.analysis``; method in ``docs/scaling_law.md``).  ``--paper`` evaluates the paper's
published constants instead."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "fit L(N,S) = E + A(S)/N^α to finished runs; report constants, CIs and the optimal sparsity"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", metavar="DIR",
                   help="run directories (with metrics.jsonl), or folders searched for them (e.g. a sweep root)")
    p.add_argument("--out", metavar="DIR", help="write fit.json, runs.json and scaling_law.png here")
    p.add_argument("--loss", choices=["val", "train"], default="val",
                   help="val: the last val_loss of each run (default); train: mean loss of the last 10%% of steps")
    p.add_argument("--precision", choices=["fp", "1.58"],
                   help="fit only full-precision or only 1.58-bit (bitnet*) runs (required when mixed)")
    p.add_argument("--allow-unfinished", action="store_true", help="also use runs that stopped before train.steps")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the 95%% CIs (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-active", type=float, nargs="*", default=[], metavar="N_A",
                   help="activated-parameter budgets at which to report L(N_a, S*) (default: median of the runs)")
    p.add_argument("--paper", action="store_true",
                   help="evaluate the paper's published full-precision constants (no runs needed)")


def _paper(out) -> int:
    from ..analysis.scaling_law import PAPER_FULL_PRECISION, optimal_sparsity, optimal_sparsity_range

    law = PAPER_FULL_PRECISION
    s_star = optimal_sparsity(law)
    lo, hi = optimal_sparsity_range(law, 0.005)
    report = {"constants": law.as_dict(), "optimal_sparsity": s_star, "paper_optimal_sparsity": 0.4558,
              "range_over_rounding": [lo, hi]}
    print(f"published constants: {law.as_dict()}")
    print(f"S* from the formula: {100 * s_star:.2f}%   (paper: 45.58%)")
    print(f"S* over all constants that round to these (±0.005): [{100 * lo:.2f}%, {100 * hi:.2f}%]")
    if out:
        from pathlib import Path

        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "paper_check.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.paper:
        return _paper(args.out)
    if not args.runs:
        print("qsparse-dist fit-scaling-law: give --runs DIR... (or --paper)", file=sys.stderr)
        return 2
    if args.bootstrap < 0:
        print("qsparse-dist fit-scaling-law: --bootstrap must be >= 0", file=sys.stderr)
        return 2
    from pathlib import Path

    import numpy as np

    from ..analysis import fit_scaling_law, load_runs
    from ..analysis.plots import plot_scaling_law

    try:
        points = load_runs(args.runs, loss=args.loss, allow_unfinished=args.allow_unfinished,
                           precision=args.precision)
        N = np.array([p.n_params for p in points], dtype=float)
        S = np.array([p.sparsity for p in points])
        L = np.array([p.loss for p in points])
        fit = fit_scaling_law(N, S, L, bootstrap=args.bootstrap, seed=args.seed)
    except ValueError as e:
        print(f"qsparse-dist fit-scaling-law: {e}", file=sys.stderr)
        return 2

    print(f"{len(points)} runs ({points[0].precision} precision, loss={args.loss}):")
    print(f"  {'N':>12} {'S':>7} {'loss':>8} {'fit':>8}  run")
    for p in sorted(points, key=lambda p: (p.n_params, p.sparsity)):
        print(f"  {p.n_params:>12,d} {p.sparsity:>7.4f} {p.loss:>8.4f} {float(fit.law.loss(p.n_params, p.sparsity)):>8.4f}"
              f"  {p.run_dir}")
    print(f"constants (95% CI from {fit.bootstrap_samples} bootstrap fits):")
    for k, v in fit.law.as_dict().items():
        ci = fit.ci.get(k)
        print(f"  {k:>6} = {v:.6g}" + (f"   [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
    ci = fit.ci.get("optimal_sparsity")
    print(f"inference-optimal sparsity S* = {100 * fit.optimal_sparsity:.2f}%"
          + (f"   [{100 * ci[0]:.2f}%, {100 * ci[1]:.2f}%]" if ci else "")
          + "  (independent of the budget N_a)")
    budgets = args.n_active or [float(np.median(N * (1 - S)))]
    for b in budgets:
        print(f"  N_a={b:.4g}: L(N_a, S*) = {float(fit.law.loss_at_active(b, fit.optimal_sparsity)):.4f}, "
              f"dense L(N_a, 0) = {float(fit.law.loss_at_active(b, 0.0)):.4f}")
    for w in fit.warnings:
        print(f"warning: {w}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = fit.as_dict()
        report["loss"] = args.loss
        report["n_active"] = {f"{b:.6g}": float(fit.law.loss_at_active(b, fit.optimal_sparsity)) for b in budgets}
        (out / "fit.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "runs.json").write_text(json.dumps([p.as_dict() for p in points], indent=1) + "\n")
        png = plot_scaling_law(N, S, L, fit, out / "scaling_law.png", n_active=budgets)
        print(f"wrote {out / 'fit.json'}, {out / 'runs.json'}, {png}")
    return 0
