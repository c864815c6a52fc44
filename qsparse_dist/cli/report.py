"""``qsparse-dist report RUN_DIR... --out DIR [--baseline NAME]``."""

from __future__ import annotations

import argparse
import sys

HELP = "quality report over training runs: markdown table (val loss, gap to dense, sparsity) and plots"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or folders holding them)")
    p.add_argument("--out", required=True, metavar="DIR", help="where report.md, loss.png, sparsity.png go")
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="run directory name the gaps are measured against (default: the dense run)")


def run(args: argparse.Namespace) -> int:
    from ..analysis.quality_report import write_report

    try:
        md = write_report(args.runs, args.out, args.baseline)
    except (ValueError, OSError) as e:
        print(f"qsparse-dist report: error: {e}", file=sys.stderr)
        return 2
    print(md.read_text().split("\n\n![", 1)[0])
    print(f"report: {md}")
    return 0
