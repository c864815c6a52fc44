"""Consolidate a ``qsparse-dist train`` checkpoint (layout: ``docs/checkpoints.md``,
``qsparse_dist/train/checkpoint.py``) into the reference state dict.

The training checkpoint stores, beside DeepSpeed's engine state, the model weights as safetensors
shards that are already full tensors per (TP, PP, EP) position — ZeRO partitions (stages 1–3) are
gathered when the checkpoint is written, so no DeepSpeed state needs to be unpickled here:

    model/tp{t}_pp{p}.safetensors          non-expert weights of TP rank t, pipeline stage p
    model/experts_pp{p}_ep{e}.safetensors  experts of stage p held by EP rank e

Keys are megatron-core ``GPTModel`` parameter names with the GLOBAL layer and expert index.  We turn
them back into each rank's local names (``qsparse_dist.model.adapters.megatron.local_key``) and hand
the shards to ``qsparse_dist.model.adapters.megatron.megatron_to_reference`` (fused-QKV group interleave, gate/up
TP stride, vocab/column splits).  Before anything is read the checkpoint's ``manifest.json`` (sha256
of every file) is verified; after the merge the result is validated against the config.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config import ConfigError, config_from_dict
from ..model.adapters.megatron import local_key, megatron_to_reference
from .consolidated import Consolidated, read_json
from .errors import CheckpointError
from .layout import validate_reference_state_dict

__all__ = ["find_checkpoint", "consolidate", "load_megatron_shards"]

_STEP_DIR = re.compile(r"^step_\d+$")  # train/checkpoint.py names checkpoints step_00000042


def find_checkpoint(path: Path) -> Path | None:
    """A checkpoint directory from a run dir, a ``checkpoints/`` root or a checkpoint itself."""
    if (path / "manifest.json").is_file() and (path / "meta.json").is_file():
        return path
    if looks_like_one_checkpoint(path):
        if not (path / "manifest.json").is_file():
            raise CheckpointError(
                f"{path}/manifest.json is missing: the checkpoint is incomplete or damaged (training writes the "
                "manifest last, and it holds the sha256 of every file, so nothing here can be verified); "
                "export a complete checkpoint or the run directory"
            )
        raise CheckpointError(f"{path}/meta.json is missing: the checkpoint's config and layout are unknown")
    from ..train.checkpoint import CheckpointError as TrainCkptError
    from ..train.checkpoint import resolve_checkpoint

    for root in (path / "checkpoints", path):
        if (root / "latest").is_file() or any(root.glob("step_*")):
            try:
                found = resolve_checkpoint(root)
            except TrainCkptError as e:
                raise CheckpointError(str(e)) from None
            if found is None:
                steps = sorted(p.name for p in root.glob("step_*"))
                raise CheckpointError(
                    f"{root}: no complete checkpoint (step directories without manifest.json: {steps or 'none'}); "
                    "a checkpoint is complete once training wrote its manifest"
                )
            return found
    return None


def looks_like_one_checkpoint(path: Path) -> bool:
    """A ``step_N`` directory or one holding a training checkpoint's ``meta.json`` / ``model/`` (as
    opposed to a run directory or a ``checkpoints/`` root, which hold ``step_*`` folders)."""
    if (path / "checkpoints").is_dir() or any(path.glob("step_*")):
        return False
    return bool(_STEP_DIR.match(path.name)) or (path / "meta.json").is_file() or (path / "model").is_dir()


def load_megatron_shards(ckpt: Path, cfg, parallel: dict) -> dict[tuple[int, int, int], dict]:
    """``{(tp_rank, pp_rank, ep_rank): local megatron state dict}`` for every position of the layout."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tp, pp, ep = (int(parallel.get(k, 1)) for k in ("tp", "pp", "ep"))
    per_stage = cfg.model.num_layers // pp
    moe = cfg.model.moe is not None
    local = cfg.model.moe.num_experts // ep if moe else 0
    model_dir = ckpt / "model"
    want = [model_dir / f"tp{t:02d}_pp{p:02d}.safetensors" for p in range(pp) for t in range(tp)]
    if moe:
        want += [model_dir / f"experts_pp{p:02d}_ep{e:02d}.safetensors" for p in range(pp) for e in range(ep)]
    missing = [str(w.relative_to(ckpt)) for w in want if not w.is_file()]
    if missing:
        raise CheckpointError(
            f"{ckpt}: incomplete checkpoint for tp={tp} pp={pp} ep={ep}: missing {', '.join(missing)}"
        )

    def read(path: Path, p: int, e: int) -> dict:
        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: cannot be read ({err})") from None
        return {local_key(k, per_stage, p, local, e): v for k, v in sd.items()}

    dense = {(t, p): read(model_dir / f"tp{t:02d}_pp{p:02d}.safetensors", p, 0) for p in range(pp) for t in range(tp)}
    experts = {}
    if moe:
        experts = {(p, e): read(model_dir / f"experts_pp{p:02d}_ep{e:02d}.safetensors", p, e)
                   for p in range(pp) for e in range(ep)}
    shards = {}
    for p in range(pp):
        for t in range(tp):
            for e in range(ep):
                shards[(t, p, e)] = {**dense[(t, p)], **experts.get((p, e), {})}
    return shards


def consolidate(ckpt: Path):
    """Verify and merge one training checkpoint into a :class:`~.consolidated.Consolidated`."""
    from ..train.checkpoint import CheckpointError as TrainCkptError
    from ..train.checkpoint import verify_checkpoint

    try:
        verify_checkpoint(ckpt)
    except TrainCkptError as e:
        raise CheckpointError(str(e)) from None
    meta = read_json(ckpt / "meta.json")
    try:
        cfg = config_from_dict(meta["config"])
    except KeyError:
        raise CheckpointError(f"{ckpt}/meta.json has no 'config'") from None
    except ConfigError as e:
        raise CheckpointError(f"{ckpt}/meta.json: {e}") from None
    parallel = meta.get("parallel") or {}
    shards = load_megatron_shards(ckpt, cfg, parallel)
    try:
        sd = megatron_to_reference(shards, cfg)
    except KeyError as e:
        raise CheckpointError(f"{ckpt}: a model shard lacks tensor {e}; the shards do not match the config") from None
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: shards do not merge for this config ({e})") from None
    validate_reference_state_dict(sd, cfg.model, cfg.sparsity, source=str(ckpt))

    tok_file, special = None, {}
    tok = meta.get("tokenizer") or {}
    if tok.get("kind") == "sentencepiece" and (ckpt / tok.get("path", "")).is_file():
        tok_file = ckpt / tok["path"]
    elif tok.get("kind") == "hf" and tok.get("path") and (ckpt / tok["path"]).is_dir():
        tok_file = ckpt / tok["path"]  # a Hugging Face tokenizer folder, re-saved as is
    data = meta.get("data") or {}
    for name in ("eos", "bos"):
        v = data.get(f"{name}_id", tok.get(f"{name}_id"))
        if isinstance(v, int) and v >= 0:
            special[name] = v
    return Consolidated(cfg, sd, ckpt, f"training (tp={parallel.get('tp', 1)} pp={parallel.get('pp', 1)} "
                        f"ep={parallel.get('ep', 1)} zero={parallel.get('zero_stage', 0)})",
                        tok_file, int(meta.get("step", 0)) or None, special)

