"""The directory ``qsparse-dist import-hf`` writes, and how training reads it back.

    OUT/config.yaml                    a complete RunConfig: ``model`` from the HF config, ``sparsity``
                                       from the command line (dense unless asked), rest defaults
    OUT/model.safetensors              reference-layout weights (``model-0000i-of-0000n.safetensors`` +
                                       ``model.safetensors.index.json`` past ``max_shard_bytes``)
    OUT/tokenizer/                     the original tokenizer files (and chat template)
    OUT/hf_config.json                 the source ``config.json``, verbatim (for export back to HF)
    OUT/import.json                    provenance: source dir, model_type, dtype, notes, parameter count

The directory is written under ``OUT.partial`` and renamed at the end, so a crash never leaves a
half-written import behind a valid-looking name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config.load import ConfigError, config_from_dict, dump_config, load_config
from ..config.schema import ModelConfig, RunConfig
from .hf_import import (
    SUPPORTED_ARCHITECTURES,
    HFImportError,
    SafetensorsSource,
    copy_tokenizer,
    model_config_from_hf,
    read_hf_config,
    reference_tensors,
)

__all__ = ["import_hf", "load_imported", "check_model_matches", "IMPORTED_CONFIG", "DTYPES"]

IMPORTED_CONFIG = "config.yaml"
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MODEL_FIELDS_FREE = {"seq_length", "init_std"}
"""Model fields a run may change relative to the import (RoPE tables are computed for any length;
the init std is unused when weights are loaded)."""


def _flush(shard: dict[str, torch.Tensor], tmp: Path, index: int) -> list[str]:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in shard.items()}, str(tmp / f"shard-{index}.safetensors"),
              metadata={"format": "pt", "layout": "qsparse-dist-reference"})
    return list(shard)


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    seq_length: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> dict:
    """Convert ``hf_dir`` into ``out_dir`` (layout in the module docstring); return ``import.json``.

    ``overrides`` are ``key.path=value`` config overrides for the written ``config.yaml`` (e.g.
    ``sparsity.linear=qsparse``, ``sparsity.down=0.5``, ``parallel.tp=8``)."""
    if dtype not in DTYPES:
        raise HFImportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf_cfg = read_hf_config(hf_dir)
    model, notes = model_config_from_hf(hf_cfg, seq_length)
    run = config_from_dict(
        {"model": model.model_dump(mode="json"),
         "sparsity": {"linear": "dense", "qkv": 0.0, "out": 0.0, "up": 0.0, "down": 0.0}},
        overrides,
    )
    if run.model != model:
        raise ConfigError("import-hf overrides may not change the model section (it comes from config.json)")
    src = SafetensorsSource(hf_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise HFImportError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    want = DTYPES[dtype]
    shard: dict[str, torch.Tensor] = {}
    shards: list[list[str]] = []
    size = total = n_params = 0
    src_dtypes: set[str] = set()
    for name, t in reference_tensors(src, model):
        src_dtypes.add(str(t.dtype).removeprefix("torch."))
        t = t.to(want) if want is not None else t
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            shards.append(_flush(shard, tmp, len(shards)))
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
        total += nbytes
        n_params += t.numel()
    shards.append(_flush(shard, tmp, len(shards)))
    weight_map = {}
    for i, names in enumerate(shards):
        final = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (tmp / f"shard-{i}.safetensors").rename(tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    tokenizer = copy_tokenizer(hf_dir, tmp / "tokenizer")
    if not any(n in tokenizer for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        notes.append("no tokenizer files found next to the weights: prepare data with your own tokenizer")
    shutil.copy2(hf_dir / "config.json", tmp / "hf_config.json")
    (tmp / IMPORTED_CONFIG).write_text(dump_config(run), encoding="utf-8")
    meta = {
        "source": str(hf_dir.resolve()),
        "model_type": hf_cfg["model_type"],
        "architecture": SUPPORTED_ARCHITECTURES[hf_cfg["model_type"]],
        "source_dtype": sorted(src_dtypes),
        "dtype": dtype if want is None else str(want).removeprefix("torch."),
        "num_parameters": n_params,
        "num_shards": len(shards),
        "tokenizer_files": tokenizer,
        "notes": notes,
    }
    (tmp / "import.json").write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def check_model_matches(imported: ModelConfig, run: ModelConfig, where: str = "checkpoint.init_from") -> None:
    """Raise :class:`ConfigError` naming every ``model.*`` field where the run differs from the import
    (except :data:`_MODEL_FIELDS_FREE`)."""
    a, b = imported.model_dump(), run.model_dump()
    diffs = [f"model.{k}: run has {b[k]!r}, the import at {where} has {a[k]!r}"
             for k in a if k not in _MODEL_FIELDS_FREE and a[k] != b[k]]
    if diffs:
        raise ConfigError("the run's model section does not match the imported weights:\n  " + "\n  ".join(diffs))


def load_imported(path: str | Path, run_model: ModelConfig | None = None) -> tuple[RunConfig, SafetensorsSource]:
    """Open an import directory: its RunConfig and a lazy reference-layout state dict (tensors are
    read on access, so a rank cutting its TP/PP/EP shard reads only what it needs).  With
    ``run_model`` given, check that the run's model section matches (:func:`check_model_matches`)."""
    path = Path(path)
    if not (path / IMPORTED_CONFIG).is_file():
        raise ConfigError(f"checkpoint.init_from={str(path)!r}: no {IMPORTED_CONFIG} (not a directory "
                          "written by `qsparse-dist import-hf`)")
    cfg = load_config(path / IMPORTED_CONFIG)
    if run_model is not None:
        check_model_matches(cfg.model, run_model, str(path))
    return cfg, SafetensorsSource(path)
