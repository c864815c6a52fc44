"""Distributed training: megatron-core GPT in a DeepSpeed engine (ZeRO 0–3), data, checkpoints, metrics.

Entry points: ``qsparse-dist train --config FILE [key.path=value ...]`` and
``python -m qsparse_dist.train --config FILE ...`` (what ``deepspeed --module`` and ``torchrun -m``
start; the launcher's ``--local_rank`` is accepted).  Heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "add_train_arguments", "run_from_args", "dry_run"]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML run config (configs/*.yaml); defaults when omitted")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="change any config field, e.g. parallel.tp=2 train.steps=50")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and the data, print the resolved batch plan and DeepSpeed JSON, exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run_from_args(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from .checkpoint import CheckpointError

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg)
        from .loop import train

        train(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"qsparse-dist train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def dry_run(cfg) -> int:
    """Everything :func:`qsparse_dist.train.loop.preflight` checks, without starting anything."""
    import json

    from .ds_config import build_ds_config
    from .loop import preflight

    prep = preflight(cfg)
    p = prep.plan
    print(f"ok: world {p.dp * cfg.parallel.tp * cfg.parallel.pp} = dp {p.dp} × tp {cfg.parallel.tp} × pp "
          f"{cfg.parallel.pp}; global batch {p.global_batch} = micro {p.micro} × accum {p.accum} × dp {p.dp}; "
          f"vocab {prep.cfg.model.vocab_size}; train samples {prep.train_tokens.num_samples(cfg.model.seq_length)}")
    print(json.dumps(build_ds_config(prep.cfg, p), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qsparse_dist.train",
                                     description="train a Q-Sparse / BitNet / MoE GPT (one rank of a job)")
    add_train_arguments(parser)
    return run_from_args(parser.parse_args(argv))
