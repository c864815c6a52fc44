"""``prepare-data``: documents → tokenizer → token ids (``datasets.map``) → packed binary splits.

On-disk layout of ``--out DIR`` (read by :class:`qsparse_dist.data.TokenFile`):

``meta.json``
    ``{"format": "qsparse-dist-tokens/1", "vocab_size", "eos_id", "bos_id", "dtype",
    "tokenizer": {"kind", "path", "sha256", ...}, "splits": {"train": {...}, "valid": {...}},
    "sources", "text_unit", "seed"}``; each split has ``file``, ``index``, ``tokens``, ``documents``
    and the ``sha256`` of its token file.  ``meta.json`` is written last: its presence means the
    directory is complete.
``{split}.bin``
    all token ids of the split, one document after another, each followed by ``eos_id``
    (``uint16`` when the vocabulary fits, else ``uint32``; native byte order = little-endian).
``{split}.idx.npy``
    ``int64[documents + 1]``: offset of each document's first token in ``{split}.bin`` (the last
    entry is the token count).
``tokenizer.model`` (sentencepiece) or ``tokenizer/`` (Hugging Face)

Documents: every input's documents (see :mod:`.sources`; ``globs`` select files of folder inputs),
exact duplicates dropped (first occurrence kept, :mod:`.dedup`) unless ``keep_duplicates``.
Train/valid split: a ``seed``-ed permutation of the document indices picks
``round(valid_fraction · documents)`` (at least one) validation documents — whole documents, so no
document is split between the two; both splits keep the original document order.  ``meta.json``'s
``summary`` gives files read/skipped, documents, duplicates dropped, UTF-8 bytes and tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dedup import drop_exact_duplicates
from .sources import DataError, load_documents
from .tokenizer import Tokenizer, load_tokenizer, open_tokenizer, save_tokenizer, train_sentencepiece

__all__ = ["prepare_data", "FORMAT", "token_dtype", "DocumentEncoder"]

FORMAT = "qsparse-dist-tokens/1"
TOKENIZER_TRAIN_DOCS = 500_000
"""At most this many documents (every k-th) train the tokenizer (up to 2M lines of them)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass
class DocumentEncoder:
    """The ``datasets.map`` function: ``{"text": [...]}`` → ``{"ids": [[..., eos], ...]}``.

    Picklable for ``num_proc`` workers: the tokenizer is opened lazily in each process.  The
    tokenizer file's hash is a field so that ``datasets``' cache fingerprint changes with the model.
    """

    data_dir: str
    entry: dict

    def __post_init__(self) -> None:
        self._tok: Tokenizer | None = None

    def __getstate__(self) -> dict:
        return {"data_dir": self.data_dir, "entry": self.entry}

    def __setstate__(self, state: dict) -> None:
        self.data_dir, self.entry, self._tok = state["data_dir"], state["entry"], None

    def __call__(self, batch: dict) -> dict:
        if self._tok is None:
            self._tok = load_tokenizer(self.data_dir, self.entry)
        eos = self._tok.eos_id
        return {"ids": [ids + [eos] for ids in self._tok.encode_batch(batch["text"])]}


def _split_indices(n_docs: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if valid_fraction <= 0:
        return np.arange(n_docs), np.arange(0)
    if n_docs < 2:
        raise DataError("--valid-fraction > 0 needs at least 2 documents (the input has 1); "
                        "use --valid-fraction 0 or --text-unit paragraph/line")
    n_valid = min(n_docs - 1, max(1, round(valid_fraction * n_docs)))
    perm = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def _write_split(ds, out_dir: Path, split: str, dtype: np.dtype, vocab_size: int) -> dict:
    """Stream the ``ids`` column into ``{split}.bin`` + ``{split}.idx.npy``; return the meta entry."""
    bin_path, idx_path = out_dir / f"{split}.bin", out_dir / f"{split}.idx.npy"
    offsets = [0]
    h = hashlib.sha256()
    total = 0
    with open(bin_path, "wb") as f:
        for batch in ds.iter(batch_size=2048):
            docs = batch["ids"]
            if not docs:
                continue
            flat = np.fromiter((t for d in docs for t in d), dtype=np.int64)
            if flat.size and (flat.max() >= vocab_size or flat.min() < 0):
                raise DataError(f"tokenizer produced id {int(flat.max())} outside vocab_size={vocab_size}")
            arr = flat.astype(dtype)
            buf = arr.tobytes()
            f.write(buf)
            h.update(buf)
            lengths = np.fromiter((len(d) for d in docs), dtype=np.int64)
            offsets.extend((total + np.cumsum(lengths)).tolist())
            total += int(lengths.sum())
        f.flush()
        os.fsync(f.fileno())
    np.save(idx_path, np.asarray(offsets, dtype=np.int64))
    return {"file": bin_path.name, "index": idx_path.name, "tokens": total,
            "documents": len(offsets) - 1, "sha256": h.hexdigest()}


def prepare_data(inputs: Sequence[str], out: str | Path, *, vocab_size: int | None = None,
                 tokenizer: str | None = None, text_field: str = "text", text_unit: str = "paragraph",
                 valid_fraction: float = 0.01, num_proc: int | None = None, seed: int = 1234,
                 max_documents: int | None = None, overwrite: bool = False,
                 globs: Sequence[str] = (), keep_duplicates: bool = False, log=print) -> dict:
    """Build the packed dataset in ``out``; return its ``meta.json`` content."""
    if (vocab_size is None) == (tokenizer is None):
        raise DataError("give exactly one of --vocab-size N (train a tokenizer) or --tokenizer MODEL")
    if vocab_size is not None and vocab_size < 300:
        raise DataError(f"--vocab-size {vocab_size}: must be at least 300 (256 byte-fallback pieces, "
                        "3 special pieces and the characters of the text)")
    if not 0 <= valid_fraction < 1:
        raise DataError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    out = Path(out)
    if (out / "meta.json").exists() and not overwrite:
        raise DataError(f"--out {out}: already holds a prepared dataset (meta.json); pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)

    skipped: list[str] = []

    def on_skip(path: Path, reason: str) -> None:
        skipped.append(str(path))
        log(f"prepare-data: warning: skipped {path}: {reason}")

    docs = load_documents(inputs, text_field=text_field, text_unit=text_unit, max_documents=max_documents,
                          globs=globs, on_skip=on_skip)
    n_read = len(docs)
    duplicates = 0
    if not keep_duplicates:
        docs, duplicates = drop_exact_duplicates(docs)
    log(f"prepare-data: {len(docs)} documents from {len(inputs)} input(s)"
        + (f" ({duplicates} exact duplicates dropped)" if duplicates else "")
        + (f"; {len(skipped)} files skipped" if skipped else ""))
    if tokenizer is None:
        stride = max(1, -(-len(docs) // TOKENIZER_TRAIN_DOCS))
        sample = docs.select(range(0, len(docs), stride)) if stride > 1 else docs
        tok = train_sentencepiece((r["text"] for r in sample), vocab_size, out, seed=seed)
        log(f"prepare-data: trained sentencepiece BPE, vocab {tok.vocab_size} (byte fallback)")
    else:
        tok = open_tokenizer(tokenizer)
        log(f"prepare-data: loaded {tok.kind} tokenizer {tokenizer}, vocab {tok.vocab_size}")
    entry = save_tokenizer(tok, out)

    if num_proc is None:
        num_proc = max(1, min(os.cpu_count() or 1, 8))
    num_proc = max(1, min(num_proc, len(docs) // 256 or 1))
    ids = docs.map(DocumentEncoder(str(out), entry), batched=True, batch_size=256,
                   num_proc=num_proc if num_proc > 1 else None, remove_columns=["text"],
                   desc="tokenize")
    train_idx, valid_idx = _split_indices(len(ids), valid_fraction, seed)
    dtype = token_dtype(tok.vocab_size)
    splits = {"train": _write_split(ids.select(train_idx), out, "train", dtype, tok.vocab_size)}
    if len(valid_idx):
        splits["valid"] = _write_split(ids.select(valid_idx), out, "valid", dtype, tok.vocab_size)
    summary = {
        "documents_read": n_read, "duplicates_dropped": duplicates, "documents": len(docs),
        "files_skipped": len(skipped), "bytes": _utf8_bytes(docs),
        "tokens": sum(s["tokens"] for s in splits.values()),
    }
    meta = {
        "format": FORMAT, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
        "dtype": dtype.name, "tokenizer": entry, "splits": splits,
        "sources": [str(i) for i in inputs], "globs": list(globs), "text_unit": text_unit, "seed": seed,
        "summary": summary,
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / "meta.json")
    for name, s in splits.items():
        log(f"prepare-data: {name}: {s['documents']} documents, {s['tokens']} tokens → {out / s['file']}")
    log(f"prepare-data: summary: {summary['documents']} documents, {summary['bytes']} bytes of text, "
        f"{summary['tokens']} tokens ({summary['bytes'] / max(1, summary['tokens']):.2f} bytes/token)")
    return meta


def _utf8_bytes(docs) -> int:
    """Total UTF-8 size of the ``text`` column, read batch by batch from the Arrow cache."""
    return sum(len(t.encode("utf-8")) for batch in docs.iter(batch_size=4096) for t in batch["text"])
