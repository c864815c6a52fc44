"""Which checkpoint a run resumes from, agreed by every rank before any model is built.

:func:`agree_on_resume` is collective: rank 0 resolves the checkpoint, every rank takes part in its
verification (:func:`~qsparse_dist.train.checkpoint.verify_checkpoint` hashes files split over the
ranks), rank 0 checks it against the config, and the outcome is broadcast — so a refusal is raised
on every rank at the same point (one message from rank 0, then a clean teardown; see
:func:`qsparse_dist.train.run_from_args`).

The learning-rate schedule is a pure function of the step and of ``train.steps``, ``schedule.*``,
``optimizer.lr`` / ``optimizer.min_lr`` (:mod:`qsparse_dist.train.schedules`); a resume under other
values would silently bend the curve of the remaining steps.  :func:`schedule_changes` names the
fields that differ when the curve (lr and weight-decay factor) of steps ``start … T−1`` differs from
the one the checkpoint was trained under; ``train.allow_schedule_change=true`` accepts it.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from ..config import RunConfig
from .checkpoint import (
    CheckpointError,
    check_compatible_config,
    read_checkpoint_meta,
    resolve_checkpoint,
    verify_checkpoint,
)
from .schedules import lr_at, weight_decay_factor_at

__all__ = ["SCHEDULE_FIELDS", "schedule_changes", "agree_on_resume"]

SCHEDULE_FIELDS = ("train.steps", "schedule.kind", "schedule.warmup_steps", "schedule.stage_split",
                   "schedule.stage2_lr_ratio", "optimizer.lr", "optimizer.min_lr")


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def schedule_changes(old_config: dict, cfg: RunConfig, start: int) -> list[str]:
    """``field (checkpoint A, now B)`` for each schedule field that differs, when the lr or
    weight-decay factor of some remaining step ``t ∈ [start, train.steps)`` differs; else ``[]``."""
    now = cfg.model_dump(mode="json")
    diff = [(f, _get(old_config, f), _get(now, f)) for f in SCHEDULE_FIELDS
            if _get(old_config, f) is not None and _get(old_config, f) != _get(now, f)]
    if not diff:
        return []
    old = cfg.model_copy(deep=True)
    for field, value, _ in diff:
        section, name = field.split(".")
        setattr(getattr(old, section), name, value)
    if all(lr_at(old, t) == lr_at(cfg, t) and weight_decay_factor_at(old, t) == weight_decay_factor_at(cfg, t)
           for t in range(start, cfg.train.steps)):
        return []  # e.g. a constant schedule run for longer: the same curve
    return [f"{f} (checkpoint {a}, now {b})" for f, a, b in diff]


def _bcast(obj):
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_agreed(err: str | None) -> None:
    if err:
        raise CheckpointError(err)


def agree_on_resume(cfg: RunConfig, root: Path, world: int, global_batch: int) -> Path | None:
    """Collective: the verified checkpoint every rank resumes from (``None``: start from scratch)."""
    rank = dist.get_rank()
    found, err = None, None
    if rank == 0 and cfg.checkpoint.resume:
        try:
            path = resolve_checkpoint(root, cfg.checkpoint.load)
            found = str(path) if path else None
        except CheckpointError as e:
            err = str(e)
    found, err = _bcast((found, err))
    _raise_agreed(err)
    if found is None:
        return None
    path = Path(found)
    verify_checkpoint(path)  # collective; raises the same error on every rank
    err = None
    if rank == 0:
        try:
            meta = read_checkpoint_meta(path)
            check_compatible_config(meta, cfg, world, global_batch)
            changed = schedule_changes(meta.get("config", {}), cfg, int(meta.get("step", 0)))
            if changed and not cfg.train.allow_schedule_change:
                err = (f"cannot resume from {path}: the learning-rate schedule of the remaining steps would change: "
                       f"{'; '.join(changed)}. Resume with the checkpoint's values, or set "
                       "train.allow_schedule_change=true to accept the new curve")
        except CheckpointError as e:
            err = str(e)
    _raise_agreed(_bcast(err))
    return path
