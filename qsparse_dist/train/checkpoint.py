"""Atomic, checksummed, pickle-safe training checkpoints (layout: ``docs/checkpoints.md``).

``{train.run_dir}/checkpoints/``::

    latest                       name of the newest complete checkpoint (written last, atomically)
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
    .tmp-step_00000100/          a checkpoint being written (never read; removed on the next start)

Write protocol: all ranks write into ``.tmp-step_N`` → every file is fsync'ed and hashed (the work
split over ranks) → rank 0 writes ``manifest.json``, renames the directory to ``step_N`` (atomic on
POSIX), fsyncs the parent, then replaces ``latest`` via a temp file + rename.  A crash at any point
leaves either the previous ``latest`` or the new complete checkpoint.  Keep-last-N prunes older
``step_*`` directories after ``latest`` moved.

Load protocol: the manifest is verified (every file's sha256, missing files) before anything is
deserialized; a mismatch raises :class:`CheckpointError` naming the file and the earlier checkpoints
(``checkpoint.load=step_…`` resumes from one).  DeepSpeed's files are pickles and DeepSpeed 0.19 loads
them with ``torch.load(weights_only=False)``; here every ``torch.load`` during the load runs with
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (the safe unpickler, no arbitrary code) and an explicit
allow-list of DeepSpeed's plain data classes; our own files are JSON and safetensors.

The checkpoint directory must be on a filesystem every rank sees (like DeepSpeed's and megatron's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..model.adapters.megatron import shard_key

__all__ = ["CheckpointError", "FORMAT", "checkpoint_root", "list_checkpoints", "resolve_checkpoint",
           "save_checkpoint", "load_checkpoint", "verify_checkpoint", "read_checkpoint_meta",
           "safe_torch_load", "shard_key", "step_dirname"]

FORMAT = "qsparse-dist-checkpoint/1"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible; the message says which file and what to do."""


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(cfg) -> Path:
    return Path(cfg.train.run_dir) / "checkpoints"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_RE.match(p.name)) and (p / "manifest.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(root: Path, name: str | None = None) -> Path | None:
    """The checkpoint to resume from: ``name`` (a directory name under ``root`` or a path) when given,
    else the one ``latest`` names, else the newest complete one; ``None`` when there is none."""
    if name:
        p = Path(name)
        cand = p if p.is_dir() else root / name
        if not cand.is_dir():
            raise CheckpointError(f"checkpoint.load={name}: no such checkpoint (looked in {root}); have "
                                  f"{[c.name for c in list_checkpoints(root)]}")
        return cand
    latest = root / "latest"
    if latest.is_file():
        cand = root / latest.read_text().strip()
        if cand.is_dir():
            return cand
    found = list_checkpoints(root)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------
# hashing / fsync, split over ranks
# ------------------------------------------------------------------------------------------------

def _sha256(path: Path, fsync: bool) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest(), path.stat().st_size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _bcast(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _hash_files(base: Path, rel_files: list[str], fsync: bool) -> dict[str, dict]:
    """sha256/size of ``rel_files`` under ``base``; rank ``r`` hashes files ``r, r+W, …``; all ranks
    get the full table.  Unreadable files map to ``{"error": …}``."""
    rank, world = _world()
    mine: dict[str, dict] = {}
    for rel in rel_files[rank::world]:
        try:
            sha, size = _sha256(base / rel, fsync)
            mine[rel] = {"sha256": sha, "bytes": size}
        except OSError as e:
            mine[rel] = {"error": f"{type(e).__name__}: {e}"}
    if world == 1:
        return mine
    parts: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(parts, mine)
    out: dict[str, dict] = {}
    for p in parts:
        out.update(p)
    return out


def _all_files(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------
# safe loading of DeepSpeed's pickles
# ------------------------------------------------------------------------------------------------

def _deepspeed_safe_globals() -> list:
    """Plain data classes DeepSpeed 0.19 stores in its checkpoint pickles (no code runs to restore them)."""
    out = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    return out


@contextlib.contextmanager
def safe_torch_load():
    """Every ``torch.load`` inside runs the weights-only unpickler, even where the caller (DeepSpeed)
    passes ``weights_only=False``; DeepSpeed's data classes are allow-listed."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    saved = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    except Exception as e:
        import pickle

        if isinstance(e, pickle.UnpicklingError):
            raise CheckpointError(f"refused to unpickle a checkpoint object outside the allow-list: {e}") from None
        raise
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


# ------------------------------------------------------------------------------------------------
# model shards (safetensors) and RNG
# ------------------------------------------------------------------------------------------------

def _is_expert(p) -> bool:
    return bool(getattr(p, "qsd_expert", False)) or getattr(p, "allreduce", True) is False


def _param_info(p) -> dict:
    return {
        "tensor_model_parallel": bool(getattr(p, "tensor_model_parallel", False)),
        "partition_dim": int(getattr(p, "partition_dim", -1)),
        "partition_stride": int(getattr(p, "partition_stride", 1)),
        "sequence_parallel": bool(getattr(p, "sequence_parallel", False)),
        "expert": _is_expert(p),
    }


@contextlib.contextmanager
def _full_param(p, zero3: bool):
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            yield p.data
    else:
        yield p.data


def _save_model_shards(rt, out_dir: Path) -> None:
    from safetensors.torch import save_file

    zero3 = rt.cfg.parallel.zero_stage == 3
    dense, experts, info = {}, {}, {}
    for name, p in rt.module.named_parameters():
        key = shard_key(name, rt.module, rt.ep_rank)
        with _full_param(p, zero3) as data:
            t = data.detach().to("cpu", copy=True).contiguous()
        (experts if _is_expert(p) else dense)[key] = t
        info[key] = _param_info(p)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = {"tp_rank": rt.tp_rank, "pp_rank": rt.pp_rank, "ep_rank": rt.ep_rank,
              "tp": rt.cfg.parallel.tp, "pp": rt.cfg.parallel.pp, "ep": rt.cfg.parallel.ep}
    if rt.dp_rank == 0 and dense:
        meta = {"qsparse_dist": json.dumps({**layout, "params": {k: info[k] for k in dense}})}
        save_file(dense, str(out_dir / f"tp{rt.tp_rank:02d}_pp{rt.pp_rank:02d}.safetensors"), metadata=meta)
    if rt.expert_dp_rank == 0 and experts:
        meta = {"qsparse_dist": json.dumps({**layout, "params": {k: info[k] for k in experts}})}
        save_file(experts, str(out_dir / f"experts_pp{rt.pp_rank:02d}_ep{rt.ep_rank:02d}.safetensors"),
                  metadata=meta)


def _restore_experts(rt, model_dir: Path) -> None:
    """Copy expert weights back from the shard files (DeepSpeed's MoE checkpoint path only knows its
    own MoE layer classes, so megatron's experts are restored from our safetensors)."""
    from safetensors.torch import load_file

    path = model_dir / f"experts_pp{rt.pp_rank:02d}_ep{rt.ep_rank:02d}.safetensors"
    tensors = load_file(str(path))
    for name, p in rt.module.named_parameters():
        if _is_expert(p):
            key = shard_key(name, rt.module, rt.ep_rank)
            if key not in tensors:
                raise CheckpointError(f"{path}: no tensor {key}")
            with torch.no_grad():
                p.data.copy_(tensors[key])
    if hasattr(rt.engine.optimizer, "refresh_fp32_params"):
        rt.engine.optimizer.refresh_fp32_params()


def _rng_state() -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    for name, st in get_cuda_rng_tracker().get_states().items():
        states[f"tracker.{name}"] = st.clone()
    return states


def _set_rng_state(states: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(states["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in states:
        torch.cuda.set_rng_state(states["torch_cuda"])
    tracker = {k[len("tracker."):]: v for k, v in states.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


# ------------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------------

def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("qsparse-dist", "torch", "deepspeed", "megatron-core"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


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
    from ..config import dump_config

    cfg = rt.cfg
    root = checkpoint_root(cfg)
    name = step_dirname(step)
    tmp, final = root / f".tmp-{name}", root / name
    rank, _ = _world()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    stage_dir = tmp / f"stage_{rt.pp_rank:02d}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    rt.engine.save_checkpoint(str(stage_dir), tag="ds", save_latest=False)
    _save_model_shards(rt, tmp / "model")
    from safetensors.torch import save_file

    (tmp / "rng").mkdir(exist_ok=True)
    save_file(_rng_state(), str(tmp / "rng" / f"rank_{rank:05d}.safetensors"))
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
        _write_json(tmp / "meta.json", meta)
        (tmp / "config.yaml").write_text(dump_config(cfg))
    dist.barrier()
    files = _bcast(_all_files(tmp) if rank == 0 else None)
    table = _hash_files(tmp, files, fsync=True)
    if rank == 0:
        bad = {k: v for k, v in table.items() if "error" in v}
        if bad:
            raise CheckpointError(f"could not read back checkpoint files: {bad}")
        _write_json(tmp / "manifest.json", {"format": FORMAT, "step": step, "files": table})
        for d in sorted({(tmp / f).parent for f in files} | {tmp}, key=lambda x: -len(x.parts)):
            _fsync_dir(d)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        latest_tmp = root / "latest.tmp"
        with open(latest_tmp, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)
        _prune(root, cfg.checkpoint.keep_last, keep=final)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    found = list_checkpoints(root)
    for old in found[:-keep_last] if keep_last > 0 else []:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(root: Path) -> None:
    """Rank 0 at start: drop ``.tmp-*`` directories of checkpoints a crash left half-written."""
    if root.is_dir():
        for p in root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# verify / load
# ------------------------------------------------------------------------------------------------

def _others_hint(path: Path) -> str:
    others = [p.name for p in list_checkpoints(path.parent) if p != path]
    if not others:
        return "no other checkpoint exists"
    return (f"earlier checkpoints: {', '.join(others)} — resume from one with "
            f"checkpoint.load={others[-1]}")


def read_checkpoint_meta(path: Path) -> dict:
    """``meta.json`` of a checkpoint (not verified; use :func:`verify_checkpoint` first)."""
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json unreadable ({e}); {_others_hint(path)}") from None


def verify_checkpoint(path: Path) -> dict:
    """Check every file against ``manifest.json`` (collective when distributed); return the manifest."""
    rank, _ = _world()
    manifest = None
    err = None
    if rank == 0:
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
                err = f"manifest.json has format {manifest.get('format')!r}, expected {FORMAT!r}"
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            err = f"manifest.json unreadable ({type(e).__name__}: {e})"
    manifest, err = _bcast((manifest, err))
    if err:
        raise CheckpointError(f"checkpoint {path} is corrupt: {err}; {_others_hint(path)}")
    files = sorted(manifest["files"])
    table = _hash_files(path, files, fsync=False)
    problems = []
    for rel in files:
        want, got = manifest["files"][rel], table.get(rel, {})
        if "error" in got:
            problems.append(f"{rel}: missing or unreadable ({got['error']})")
        elif got.get("bytes") != want.get("bytes"):
            problems.append(f"{rel}: size {got.get('bytes')} bytes, manifest says {want.get('bytes')}")
        elif got.get("sha256") != want.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch (manifest {want.get('sha256', '')[:12]}…, "
                            f"file {got.get('sha256', '')[:12]}…)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"checkpoint {path} is corrupt: {shown}; {_others_hint(path)}")
    return manifest


def check_compatible(meta: dict, rt) -> None:
    """Resuming needs the same model and parallel layout (DeepSpeed shards are layout-specific)."""
    check_compatible_config(meta, rt.cfg, rt.world, rt.plan.global_batch)


def check_compatible_config(meta: dict, cfg, world: int, global_batch: int) -> None:
    """:func:`check_compatible` from the config alone (before any model exists)."""
    p = meta.get("parallel", {})
    want = {"world_size": world, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep,
            "zero_stage": cfg.parallel.zero_stage}
    diff = {k: (p.get(k), v) for k, v in want.items() if p.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"cannot resume: the checkpoint was written with another parallel layout ({what}); "
                              "resume with the same parallel.* settings and world size")
    old_model = meta.get("config", {}).get("model")
    if old_model is not None and old_model != cfg.model.model_dump(mode="json"):
        keys = sorted(k for k in old_model if old_model[k] != cfg.model.model_dump(mode="json").get(k))
        raise CheckpointError(f"cannot resume: model.* differs from the checkpoint ({', '.join('model.' + k for k in keys)})")
    if meta.get("batch", {}).get("global") not in (None, global_batch):
        raise CheckpointError(
            f"cannot resume: data.global_batch_size {global_batch} differs from the checkpoint's "
            f"{meta['batch']['global']} (the data position would not line up)")


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
        _restore_experts(rt, path / "model")
    rank, _ = _world()
    _set_rng_state(load_file(str(path / "rng" / f"rank_{rank:05d}.safetensors")))
    dist.barrier()
    return meta
