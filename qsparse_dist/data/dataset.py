"""Read a prepared token directory (see :mod:`qsparse_dist.data.prepare` for the layout).

:class:`TokenFile` memory-maps one split and checks it against ``meta.json`` (format, sizes, index)
before training starts, so a truncated or mismatched file is reported by name instead of producing
garbage batches.  A *sample* is a window of ``seq_length + 1`` tokens starting at
``i · seq_length``: inputs are its first ``seq_length`` tokens, labels the last ``seq_length``
(documents are packed back to back with EOS between them, as in GPT pretraining).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .prepare import FORMAT
from .sources import DataError
from .tokenizer import file_sha256

__all__ = ["read_meta", "TokenFile", "SampleDataset"]


def read_meta(data_dir: str | Path, field: str = "data.path") -> dict:
    """``meta.json`` of a prepared directory, validated; errors name ``field``."""
    d = Path(data_dir)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        hint = " (run `qsparse-dist prepare-data --input ... --out DIR` first)"
        raise DataError(f"{field}={d}: no meta.json — not a prepared dataset{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{field}={d}: meta.json is corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{field}={d}: meta.json format is {got!r}, expected {FORMAT!r}")
    for key in ("vocab_size", "eos_id", "dtype", "tokenizer", "splits"):
        if key not in meta:
            raise DataError(f"{field}={d}: meta.json lacks {key!r}")
    if "train" not in meta["splits"]:
        raise DataError(f"{field}={d}: meta.json has no 'train' split")
    return meta


class TokenFile:
    """One split of a prepared directory as a read-only ``np.memmap``."""

    def __init__(self, data_dir: str | Path, split: str = "train", *, verify_checksum: bool = False,
                 field: str = "data.path") -> None:
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir, field)
        if split not in self.meta["splits"]:
            raise DataError(f"{field}={self.dir}: no {split!r} split (has {sorted(self.meta['splits'])})")
        info = self.meta["splits"][split]
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = int(self.meta["eos_id"])
        path = self.dir / info["file"]
        if not path.is_file():
            raise DataError(f"{field}={self.dir}: token file {path.name} is missing")
        expected = int(info["tokens"]) * self.dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise DataError(f"{field}={self.dir}: {path.name} has {size} bytes, meta.json says "
                            f"{info['tokens']} {self.dtype.name} tokens = {expected} bytes (truncated "
                            "or overwritten; re-run prepare-data)")
        if verify_checksum and file_sha256(path) != info["sha256"]:
            raise DataError(f"{field}={self.dir}: {path.name} does not match its sha256 in meta.json")
        idx_path = self.dir / info["index"]
        try:
            self.doc_offsets = np.load(idx_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{field}={self.dir}: document index {idx_path.name} unreadable ({e})") from None
        if (self.doc_offsets.ndim != 1 or len(self.doc_offsets) != int(info["documents"]) + 1
                or self.doc_offsets[-1] != int(info["tokens"])):
            raise DataError(f"{field}={self.dir}: document index {idx_path.name} disagrees with meta.json")
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r") if expected else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def num_samples(self, seq_length: int) -> int:
        return max(0, (len(self) - 1) // seq_length)

    def sample(self, i: int, seq_length: int) -> np.ndarray:
        start = i * seq_length
        return np.asarray(self.tokens[start:start + seq_length + 1], dtype=np.int64)


class SampleDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``seq_length + 1``-token windows (``int64`` tensors)."""

    def __init__(self, tokens: TokenFile, seq_length: int) -> None:
        self.tokens, self.seq_length = tokens, seq_length
        self.n = tokens.num_samples(seq_length)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens.sample(int(i), self.seq_length))
