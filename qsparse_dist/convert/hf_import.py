"""Import a Hugging Face Llama / Mistral / Qwen2 / Mixtral checkpoint (local directory, safetensors)
into the project's reference layout (``qsparse_dist.model.reference`` docstring) plus a ``model``
config section, keeping the original tokenizer.

This module only reads files (``config.json``, ``*.safetensors``, the tokenizer); the name mapping,
the config mapping and every refusal (other architectures, non-SiLU activations, RoPE scaling,
decoupled ``head_dim``, output/MLP biases, misshapen / missing / leftover tensors) are
:mod:`qsparse_dist.model.adapters.hf` (:func:`~qsparse_dist.model.adapters.hf.from_hf`,
:func:`~qsparse_dist.model.adapters.hf.model_config_from_hf`), re-exported here under their import
names (``reference_tensors``, ``HFImportError``).

The imported directory is parallelism-agnostic: megatron TP/PP/EP shards are cut from it at load
time by ``qsparse_dist.model.adapters.megatron.reference_to_megatron`` for whatever ``parallel``
section the run uses, so one import serves every layout.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..config.schema import ModelConfig
from ..model.adapters.hf import SUPPORTED_ARCHITECTURES, HFMappingError, model_config_from_hf
from ..model.adapters.hf import from_hf as reference_tensors

__all__ = [
    "HFImportError",
    "SUPPORTED_ARCHITECTURES",
    "TOKENIZER_FILES",
    "SafetensorsSource",
    "model_config_from_hf",
    "read_hf_config",
    "reference_tensors",
    "hf_to_reference_state_dict",
]


HFImportError = HFMappingError
"""The Hugging Face checkpoint cannot be imported; the message says which field or tensor."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Files copied verbatim into ``OUT/tokenizer/`` (whichever exist), so the original tokenizer and its
chat template are used for data preparation, SFT and export."""


def read_hf_config(hf_dir: str | Path) -> dict:
    """``config.json`` of a local transformers checkpoint as a dict."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise HFImportError(f"--model {hf_dir}: not a directory")
    if not path.is_file():
        raise HFImportError(f"--model {hf_dir}: no config.json (expected a transformers checkpoint directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HFImportError(f"{path}: not valid JSON ({e})") from None


class SafetensorsSource(Mapping):
    """Read-only, lazy view of every tensor in a directory's ``*.safetensors`` files (sharded with a
    ``model.safetensors.index.json`` or not): tensors are read from disk only when accessed."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt"))
            hint = f" (found {found[:3]}: convert them to safetensors first)" if found else ""
            raise HFImportError(f"{self.directory}: no *.safetensors weight files{hint}")
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self._where: dict[str, Path] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                if k in self._where:
                    raise HFImportError(f"tensor {k!r} appears in both {self._where[k].name} and {f.name}")
                self._where[k] = f

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(key)
        return self._handles[self._where[key]].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def hf_to_reference_state_dict(
    hf_dir: str | Path, dtype: torch.dtype | None = None, seq_length: int | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """In-memory import (small models, tests): the reference state dict and its model section."""
    model, _ = model_config_from_hf(read_hf_config(hf_dir), seq_length)
    src = SafetensorsSource(hf_dir)
    sd = {k: (t.to(dtype) if dtype is not None else t) for k, t in reference_tensors(src, model)}
    return sd, model


def copy_tokenizer(hf_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files that exist (see :data:`TOKENIZER_FILES`); return their names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(hf_dir) / name
        if src.is_file():
            shutil.copy2(src, out / name)
            copied.append(name)
    return copied
