"""``qsparse-dist train --config FILE [key.path=value ...]`` — one process, or one rank under
``deepspeed`` / ``torchrun`` (see ``qsparse_dist.train``)."""

from __future__ import annotations

import argparse

HELP = "train (or resume) a model; run under deepspeed/torchrun for several processes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train import add_train_arguments

    add_train_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..train import run_from_args

    return run_from_args(args)
