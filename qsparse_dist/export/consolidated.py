"""What every checkpoint reader in ``export`` returns — a full model in the reference layout — and the
JSON reader they share.  A leaf module: ``consolidate.py`` (which layout is this?) and
``training_ckpt.py`` (the training layout) both import it, and not each other in a circle."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig
from .errors import CheckpointError

__all__ = ["Consolidated", "read_json"]


@dataclass
class Consolidated:
    """A full model: config, reference-layout tensors, tokenizer and where they came from."""

    config: RunConfig
    state_dict: dict[str, torch.Tensor]
    source: Path
    layout: str
    tokenizer_file: Path | None = None  # SentencePiece .model, or a Hugging Face tokenizer folder
    step: int | None = None
    special_tokens: dict[str, int] = field(default_factory=dict)  # e.g. {"eos": 2} from prepare-data


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None
