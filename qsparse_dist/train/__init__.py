"""Distributed training: megatron-core GPT in a DeepSpeed engine (ZeRO 0–3), data, checkpoints, metrics.

Entry points: ``qsparse-dist train --config FILE [key.path=value ...]`` and
``python -m qsparse_dist.train --config FILE ...`` (what ``deepspeed --module`` and ``torchrun -m``
start; the launcher's ``--local_rank`` is accepted).  Heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "add_train_arguments", "run_from_args", "dry_run", "end_process_group"]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML run config (configs/*.yaml); defaults when omitted")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="change any config field, e.g. parallel.tp=2 train.steps=50")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and the data, print the resolved batch plan and DeepSpeed JSON, exit")
    p.add_argument("--verbose", action="store_true",
                   help="show every rank's library warnings and DeepSpeed's INFO lines (= logging.level=info)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run_from_args(args: argparse.Namespace) -> int:
    from ..compat import CompatError
    from ..config import ConfigError, load_config
    from .checkpoint import CheckpointError
    from .output import configure_output, rank_from_env

    rank = rank_from_env()
    code = 1  # an unexpected exception propagates (traceback) after the teardown below
    try:
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "verbose", False):
            cfg.logging.level = "info"
        configure_output(cfg.logging.level, rank)
        if args.dry_run:
            code = dry_run(cfg)
            return code
        from .loop import train

        train(cfg)
        code = 0
    except (ConfigError, CheckpointError, CompatError) as e:
        # every rank meets these at the same point (preflight is deterministic, the resume decision is
        # broadcast), so rank 0 alone speaks for the job
        if rank == 0:
            print(f"qsparse-dist train: error: {e}", file=sys.stderr, flush=True)
        code = 2
    except BaseException as e:
        if getattr(e, "qsd_peer_lost", False):
            code = -1  # a peer is gone: leave the group as it is (a teardown could block on the dead peer)
        raise
    finally:
        end_process_group(synchronize=code in (0, 2), destroy=code != -1)
    return code


def end_process_group(synchronize: bool = True, destroy: bool = True) -> None:
    """Leave ``torch.distributed`` cleanly (no "destroy_process_group() was not called" at exit, no rank
    torn down while a peer still talks to the store): barrier when every rank got here together,
    then destroy the default group."""
    import torch.distributed as dist

    if not (destroy and dist.is_available() and dist.is_initialized()):
        return
    try:
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def dry_run(cfg) -> int:
    """Everything :func:`qsparse_dist.train.loop.preflight` checks, without starting anything."""
    import json

    from .loop import preflight

    prep = preflight(cfg)  # everything, the deepspeed: section included, before the first line is printed
    p = prep.plan
    print(f"ok: world {p.dp * cfg.parallel.tp * cfg.parallel.pp} = dp {p.dp} × tp {cfg.parallel.tp} × pp "
          f"{cfg.parallel.pp}; global batch {p.global_batch} = micro {p.micro} × accum {p.accum} × dp {p.dp}; "
          f"vocab {prep.cfg.model.vocab_size}; train samples {prep.train_tokens.num_samples(cfg.model.seq_length)}")
    print(json.dumps(prep.ds_config, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qsparse_dist.train",
                                     description="train a Q-Sparse / BitNet / MoE GPT (one rank of a job)")
    add_train_arguments(parser)
    return run_from_args(parser.parse_args(argv))
