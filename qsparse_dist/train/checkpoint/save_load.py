"""Save and restore a training :class:`~qsparse_dist.train.engine.Runtime` (collective): DeepSpeed's
engine state per pipeline stage, the model shards (:mod:`.shards`), RNG (:mod:`.rng`), ``meta.json``,
the config and the tokenizer, written through the atomic store (:mod:`.store`) and loaded after
verification with the safe unpickler (:mod:`.safe_load`).

Directory of one checkpoint (``docs/checkpoints.md``)::

    step_00000100/
      manifest.json              sha256 + size of every other file (verified before any load)
      meta.json                  step, consumed samples, config, parallel layout, tokenizer, versions
      config.yaml                the run config (YAML)
      tokenizer.model | tokenizer/   copy of the data's tokenizer
      stage_00/ds/…              DeepSpeed engine state of pipeline stage 0 (engine.save_checkpoint)
      stage_01/ds/…              … one directory per pipeline stage
      model/tp00_pp00.safetensors               non-expert weights of one (TP, PP) shard
      model/experts_pp00_ep00.safetensors       expert weights of one (PP, EP) shard
      rng/rank_00000.safetensors                RNG states of every rank
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch.distributed as dist

from ...config.rules import check_resume_layout
from .rng import rng_state, set_rng_state
from .safe_load import safe_torch_load
from .shards import restore_experts, save_model_shards
from .store import (
    FORMAT,
    CheckpointError,
    begin_checkpoint,
    checkpoint_root,
    commit_checkpoint,
    rank_world,
    read_checkpoint_meta,
    step_dirname,
    verify_checkpoint,
    write_json_atomic,
)

__all__ = ["save_checkpoint", "load_checkpoint", "check_compatible", "check_compatible_config"]


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("qsparse-dist", "torch", "deepspeed", "megatron-core"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _copy_tokenizer(data_dir: Path, tok_entry: dict, out: Path) -> dict:
    src = data_dir / tok_entry["path"]
    dst = out / Path(tok_entry["path"]).name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return {**tok_entry, "path": dst.name}


def save_checkpoint(rt, step: int, *, consumed_samples: int, data_meta: dict | None,
                    extra: dict | None = None) -> Path:
    """Collective: every rank calls it.  Returns the final checkpoint directory."""
    from ...config import dump_config

    cfg = rt.cfg
    root = checkpoint_root(cfg)
    name = step_dirname(step)
    final = root / name
    tmp = begin_checkpoint(root, name)
    rank, _ = rank_world()
    stage_dir = tmp / f"stage_{rt.pp_rank:02d}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    rt.engine.save_checkpoint(str(stage_dir), tag="ds", save_latest=False)
    save_model_shards(rt, tmp / "model")
    from safetensors.torch import save_file

    (tmp / "rng").mkdir(exist_ok=True)
    save_file(rng_state(), str(tmp / "rng" / f"rank_{rank:05d}.safetensors"))
    dist.barrier()
    if rank == 0:
        p = cfg.parallel
        meta = {
            "format": FORMAT, "step": step, "consumed_samples": consumed_samples,
            "config": cfg.model_dump(mode="json"),
            "parallel": {"world_size": rt.world, "tp": p.tp, "pp": p.pp, "ep": p.ep, "sp": p.sp,
                         "dp": rt.plan.dp, "zero_stage": p.zero_stage, "expert_tp": 1},
            "batch": {"micro": rt.plan.micro, "global": rt.plan.global_batch, "accum": rt.plan.accum},
            "dtype": cfg.train.dtype,
            "deepspeed": {"tag": "ds", "stage_dirs": [f"stage_{s:02d}" for s in range(p.pp)],
                          "moe_path": bool(rt.ds_moe), "config": rt.ds_config},
            "model_shards": {"dir": "model", "dense": "tp{tp:02d}_pp{pp:02d}.safetensors",
                             "experts": "experts_pp{pp:02d}_ep{ep:02d}.safetensors",
                             "keys": "global layer index, global expert index"},
            "versions": _versions(),
            **(extra or {}),
        }
        if data_meta is not None:
            meta["data"] = {k: data_meta[k] for k in ("vocab_size", "eos_id", "bos_id") if k in data_meta}
            meta["data"]["path"] = str(Path(cfg.data.path).resolve())
            meta["tokenizer"] = _copy_tokenizer(Path(cfg.data.path), data_meta["tokenizer"], tmp)
        write_json_atomic(tmp / "meta.json", meta)
        (tmp / "config.yaml").write_text(dump_config(cfg))
    dist.barrier()
    return commit_checkpoint(tmp, final, step, cfg.checkpoint.keep_last)


def check_compatible(meta: dict, rt) -> None:
    """Resuming needs the same model and parallel layout (DeepSpeed shards are layout-specific)."""
    check_compatible_config(meta, rt.cfg, rt.world, rt.plan.global_batch)


def check_compatible_config(meta: dict, cfg, world: int, global_batch: int) -> None:
    """:func:`check_compatible` from the config alone (before any model exists); the rule:
    :func:`qsparse_dist.config.rules.check_resume_layout`."""
    check_resume_layout(meta, cfg, world, global_batch, error=CheckpointError)


def load_checkpoint(rt, path: Path, verify: bool = True) -> dict:
    """Collective: verify (unless the caller just did), check compatibility, restore DeepSpeed state,
    expert weights and RNG."""
    from safetensors.torch import load_file

    if verify:
        verify_checkpoint(path)
    meta = read_checkpoint_meta(path)
    check_compatible(meta, rt)
    stage_dir = path / f"stage_{rt.pp_rank:02d}"
    with safe_torch_load():
        loaded, _ = rt.engine.load_checkpoint(str(stage_dir), tag="ds", load_module_strict=not rt.ds_moe,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {stage_dir}")
    if rt.ds_moe:
        restore_experts(rt, path / "model")
    rank, _ = rank_world()
    set_rng_state(load_file(str(path / "rng" / f"rank_{rank:05d}.safetensors")))
    dist.barrier()
    return meta
