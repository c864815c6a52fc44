"""Atomic, checksummed, pickle-safe training checkpoints (layout: ``docs/checkpoints.md``).

One module per job: :mod:`.store` (the atomic directory store: temporary directory, manifest,
verification, ``latest``, keep-last-N), :mod:`.safe_load` (weights-only unpickling of DeepSpeed's
pickles), :mod:`.shards` (which tensors go in which safetensors file), :mod:`.rng` (RNG states) and
:mod:`.save_load` (save/restore a training runtime through them).  The public names are re-exported
here, so ``from qsparse_dist.train.checkpoint import …`` keeps working.
"""

from .safe_load import safe_torch_load
from .save_load import check_compatible, check_compatible_config, load_checkpoint, save_checkpoint
from .shards import shard_key
from .store import (
    FORMAT,
    CheckpointError,
    _hash_files,
    checkpoint_root,
    list_checkpoints,
    read_checkpoint_meta,
    remove_stale_temporaries,
    resolve_checkpoint,
    step_dirname,
    verify_checkpoint,
)

__all__ = ["CheckpointError", "FORMAT", "checkpoint_root", "list_checkpoints", "resolve_checkpoint",
           "save_checkpoint", "load_checkpoint", "verify_checkpoint", "read_checkpoint_meta",
           "safe_torch_load", "shard_key", "step_dirname", "check_compatible", "check_compatible_config",
           "remove_stale_temporaries", "_hash_files"]
