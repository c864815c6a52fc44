"""``qsparse-dist`` command line.  Each subcommand lives in its own module exposing ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run`` so that
``--help`` and config errors are instant.

Contract (external checks rely on these names): ``prepare-data``, ``train``, ``export``,
``generate``; further: ``import-hf``, ``fit-scaling-law``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "COMMANDS"]

COMMANDS: dict[str, str] = {
    "prepare-data": "qsparse_dist.cli.prepare_data",
    "train": "qsparse_dist.cli.train",
    "export": "qsparse_dist.cli.export",
    "generate": "qsparse_dist.cli.generate",
    "import-hf": "qsparse_dist.cli.import_hf",
    "fit-scaling-law": "qsparse_dist.cli.fit_scaling_law",
    "report": "qsparse_dist.cli.report",
    "serve": "qsparse_dist.cli.serve",
}


def _available() -> dict[str, object]:
    mods = {}
    for name, modname in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
    return mods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qsparse-dist",
        description="Train, export and serve fully sparsely-activated LLMs (Q-Sparse, BitNet b1.58, MoE).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    mods = _available()
    for name, mod in mods.items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
    args = parser.parse_args(argv)
    from ..config import ConfigError

    try:
        return int(mods[args.command].run(args) or 0)
    except ConfigError as e:
        print(f"qsparse-dist {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
