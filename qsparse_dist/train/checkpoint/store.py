"""The checkpoint store: atomic, checksummed directories under ``{train.run_dir}/checkpoints/``
(layout: ``docs/checkpoints.md``).

``{train.run_dir}/checkpoints/``::

    latest                       name of the newest complete checkpoint (written last, atomically)
    step_00000100/
      manifest.json              sha256 + size of every other file (verified before any load)
      ...                        what :mod:`.save_load` writes (meta, DeepSpeed state, shards, RNG)
    .tmp-step_00000100/          a checkpoint being written (never read; removed on the next start)

Write protocol (:func:`begin_checkpoint` … :func:`commit_checkpoint`): all ranks write into
``.tmp-step_N`` → every file is fsync'ed and hashed (the work split over ranks) → rank 0 writes
``manifest.json``, renames the directory to ``step_N`` (atomic on POSIX), fsyncs the parent, then
replaces ``latest`` via a temp file + rename.  A crash at any point leaves either the previous
``latest`` or the new complete checkpoint.  Keep-last-N prunes older ``step_*`` directories after
``latest`` moved.

Verification (:func:`verify_checkpoint`): every file's sha256 and size against the manifest, before
anything is deserialized; a mismatch raises :class:`CheckpointError` naming the file and the earlier
checkpoints (``checkpoint.load=step_…`` resumes from one).

The checkpoint directory must be on a filesystem every rank sees (like DeepSpeed's and megatron's).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

__all__ = ["CheckpointError", "FORMAT", "checkpoint_root", "list_checkpoints", "resolve_checkpoint",
           "step_dirname", "begin_checkpoint", "commit_checkpoint", "remove_stale_temporaries",
           "read_checkpoint_meta", "verify_checkpoint", "rank_world", "write_json_atomic"]

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


def rank_world() -> tuple[int, int]:
    """``(rank, world)``; ``(0, 1)`` without a process group."""
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
    rank, world = rank_world()
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


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to a temporary file, fsync it, then rename over ``path`` (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# atomic write: temporary directory → manifest → rename → latest → prune
# ------------------------------------------------------------------------------------------------

def begin_checkpoint(root: Path, name: str) -> Path:
    """Collective: rank 0 creates an empty ``root/.tmp-{name}`` (replacing a leftover); returns it."""
    tmp = root / f".tmp-{name}"
    rank, _ = rank_world()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    return tmp


def commit_checkpoint(tmp: Path, final: Path, step: int, keep_last: int) -> Path:
    """Collective, after every rank wrote its files into ``tmp``: hash them (split over ranks), write
    the manifest, rename ``tmp`` to ``final``, point ``latest`` at it and prune to ``keep_last``."""
    root, name = final.parent, final.name
    rank, _ = rank_world()
    files = _bcast(_all_files(tmp) if rank == 0 else None)
    table = _hash_files(tmp, files, fsync=True)
    if rank == 0:
        bad = {k: v for k, v in table.items() if "error" in v}
        if bad:
            raise CheckpointError(f"could not read back checkpoint files: {bad}")
        write_json_atomic(tmp / "manifest.json", {"format": FORMAT, "step": step, "files": table})
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
        _prune(root, keep_last, keep=final)
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
# verify
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
    rank, _ = rank_world()
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
