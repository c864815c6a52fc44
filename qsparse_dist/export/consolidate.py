"""Rebuild the full reference state dict (``qsparse_dist/model/reference.py`` layout) from whatever a
run left on disk.

Layouts read:

* **reference checkpoint** — a directory with ``reference.safetensors`` (full tensors in the
  reference layout) and ``config.yaml`` (the resolved :class:`RunConfig`), optionally
  ``tokenizer.model``.  Written by :func:`save_reference_checkpoint`; the single-device format.
* **import-hf directory** — ``config.yaml`` + reference-layout ``model*.safetensors`` + ``import.json``
  (``qsparse_dist/convert/imported.py``), so an imported model can be exported again.
* **training checkpoint** — what ``qsparse-dist train`` writes (DeepSpeed engine state of the
  megatron-core model, sharded by TP/PP/EP and, with ZeRO-3, by data-parallel rank).  Reading it is
  delegated to :mod:`qsparse_dist.export.training_ckpt`, which gathers the per-(tp, pp, ep) megatron
  shards and maps them with ``qsparse_dist.model.adapters.megatron.megatron_to_reference``.

Either way the result is validated against the config (every tensor present, shapes right, values
finite) and a checkpoint that does not pass is refused with a :class:`CheckpointError` naming what is
missing.  ``RUN_OR_CKPT_DIR`` may be a run directory (its latest checkpoint is used) or one checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig, config_from_dict, dump_config
from . import training_ckpt
from .consolidated import Consolidated, read_json
from .errors import CheckpointError
from .layout import validate_reference_state_dict

__all__ = [
    "Consolidated",
    "load_checkpoint",
    "save_reference_checkpoint",
    "load_reference_checkpoint",
    "load_import_dir",
    "read_json",
    "REFERENCE_WEIGHTS",
    "CONFIG_FILE",
]

REFERENCE_WEIGHTS = "reference.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"


def _read_config(path: Path) -> RunConfig:
    import yaml

    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name} (the resolved run config) — not a checkpoint directory")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return config_from_dict(data)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid YAML ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def save_reference_checkpoint(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: RunConfig,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Write a single-device reference checkpoint (validated first)."""
    from safetensors.torch import save_file

    validate_reference_state_dict(state_dict, config.model, config.sparsity, source="state dict")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(out / REFERENCE_WEIGHTS))
    (out / CONFIG_FILE).write_text(dump_config(config), encoding="utf-8")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / TOKENIZER_FILE)
    return out


def load_reference_checkpoint(path: str | Path) -> Consolidated:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = _read_config(path / CONFIG_FILE)
    try:
        sd = load_file(str(path / REFERENCE_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / REFERENCE_WEIGHTS}: cannot be read ({e}); the file is corrupt or truncated") from None
    validate_reference_state_dict(sd, cfg.model, cfg.sparsity, source=str(path))
    tok = path / TOKENIZER_FILE
    return Consolidated(cfg, sd, path, "reference", tok if tok.is_file() else None)


def load_import_dir(path: Path) -> Consolidated:
    """A directory written by ``qsparse-dist import-hf`` (reference-layout ``model*.safetensors``)."""
    from ..convert.imported import load_imported

    try:
        cfg, source = load_imported(path)
        sd = {k: source[k] for k in source}
    except (ConfigError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the import directory ({e})") from None
    validate_reference_state_dict(sd, cfg.model, cfg.sparsity, source=str(path))
    tok = path / "tokenizer"
    if not tok.is_dir():
        tok = path / TOKENIZER_FILE
    return Consolidated(cfg, sd, path, "import-hf", tok if tok.exists() else None)


def load_checkpoint(path: str | Path) -> Consolidated:
    """Consolidate the checkpoint at ``path`` (a run directory or one checkpoint directory)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint must be a run or checkpoint directory, got the file {path}")
    if (path / REFERENCE_WEIGHTS).is_file():
        return load_reference_checkpoint(path)
    if (path / "import.json").is_file() and (path / CONFIG_FILE).is_file():
        return load_import_dir(path)
    found = training_ckpt.find_checkpoint(path)
    if found is None:
        listing = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "empty directory"
        raise CheckpointError(
            f"{path}: no checkpoint found (looked for {REFERENCE_WEIGHTS}, a training checkpoint, or a run "
            f"directory with checkpoints/); it contains: {listing}"
        )
    return training_ckpt.consolidate(found)
