"""Read raw documents with ``datasets``: local text / jsonl / parquet files (or folders of them), or a
Hugging Face hub dataset.

Each input becomes a :class:`datasets.Dataset` with a single string column ``text``; several inputs
are concatenated in the order given.  Plain-text files are split into documents by ``text_unit``:
``paragraph`` (blank-line separated, the default), ``line`` or ``document`` (one file = one document).
Every failure raises :class:`DataError` naming the argument and the file.

Corpora from directories: with ``globs`` (``--glob '**/*.py'``, any number, recursive), every matching
file under a folder input is read — code and other text files as the ``text`` builder, ``.jsonl`` /
``.parquet`` by their suffix — and a matched file that is empty, binary (NUL bytes) or not UTF-8 is
skipped with a warning through ``on_skip`` instead of failing the run: a tree such as ``site-packages``
always holds a few.  Files of one builder are loaded by one ``datasets.load_dataset`` call, which
writes Arrow files to the cache and memory-maps them, so a corpus larger than memory works.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path

__all__ = ["DataError", "load_documents", "BUILDER_BY_SUFFIX", "TEXT_UNITS"]

BUILDER_BY_SUFFIX = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet",
}
TEXT_UNITS = ("paragraph", "line", "document")


class DataError(ValueError):
    """Bad or missing input data; the message names the argument or file."""


def _looks_like_hub_name(item: str) -> bool:
    """``name`` or ``owner/name`` without a file suffix — anything else that does not exist is a
    missing local path."""
    return (not item.startswith((".", "/", "~")) and item.count("/") <= 1
            and Path(item).suffix.lower() not in BUILDER_BY_SUFFIX and " " not in item)


def _skip_reason(path: Path) -> str | None:
    """Why a glob-matched file cannot be a text document (``None``: it can)."""
    data = path.read_bytes()
    if not data.strip():
        return "empty"
    if b"\x00" in data:
        return "binary (NUL bytes)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 ({e.reason} at byte {e.start})"
    return None


def _globbed_files(path: Path, globs: Sequence[str]) -> list[Path]:
    """Files under folder ``path`` matching any of ``globs`` (``**`` recurses), sorted, each once."""
    files = sorted({p for g in globs for p in path.glob(g) if p.is_file()})
    if not files:
        raise DataError(f"--input {path}: no file under the folder matches --glob {' '.join(globs)}")
    return files


def _load_globbed(files: list[Path], text_field: str, text_unit: str, cache_dir: str | None,
                  on_skip: Callable[[Path, str], None]) -> list:
    """One dataset per builder over the readable ``files``; unreadable ones go to ``on_skip``."""
    import datasets

    groups: dict[str, list[str]] = {}
    for f in files:
        reason = _skip_reason(f)
        if reason is not None:
            on_skip(f, reason)
            continue
        groups.setdefault(BUILDER_BY_SUFFIX.get(f.suffix.lower(), "text"), []).append(str(f))
    parts = []
    for builder, data_files in groups.items():
        kwargs = {"sample_by": text_unit} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=data_files, split="train", cache_dir=cache_dir,
                                       **kwargs)
        except Exception as e:
            cause = e.__cause__ or e
            raise DataError(f"--input: {len(data_files)} {builder} files (first {data_files[0]}) cannot be "
                            f"read: {type(cause).__name__}: {str(cause)[:300]}") from None
        column = "text" if builder == "text" else text_field
        if column not in ds.column_names:
            raise DataError(f"--input: {builder} files (first {data_files[0]}) have no {column!r} column "
                            f"(see --text-field); columns are {ds.column_names}")
        ds = ds.select_columns([column])
        parts.append(ds.rename_column(column, "text") if column != "text" else ds)
    return parts


def _files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDER_BY_SUFFIX)
    if not files:
        raise DataError(f"--input {path}: the folder holds no {'/'.join(sorted(BUILDER_BY_SUFFIX))} files")
    return files


def _builder(path: Path) -> str:
    try:
        return BUILDER_BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"--input {path}: unknown file type {path.suffix!r}; expected one of {sorted(BUILDER_BY_SUFFIX)}"
        ) from None


def _check_readable(path: Path, builder: str) -> None:
    """Cheap early checks that ``datasets`` would otherwise report obscurely (or not at all)."""
    if path.stat().st_size == 0:
        raise DataError(f"--input {path}: the file is empty")
    if builder in ("text", "json"):
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if b"\x00" in head:
            raise DataError(f"--input {path}: looks binary (NUL bytes), not {builder} text")
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.end < len(head) - 4:  # a multi-byte char cut at the read boundary is fine
                raise DataError(f"--input {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if builder == "parquet":
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PAR1":
            raise DataError(f"--input {path}: not a parquet file (missing PAR1 magic)")


def _load_local(path: Path, text_field: str, text_unit: str, cache_dir: str | None):
    import datasets

    builder = _builder(path)
    _check_readable(path, builder)
    kwargs = {"sample_by": text_unit} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=cache_dir,
                                   **kwargs)
    except Exception as e:  # datasets wraps parser errors in DatasetGenerationError and friends
        cause = e.__cause__ or e
        raise DataError(f"--input {path}: cannot be read as {builder}: {type(cause).__name__}: "
                        f"{str(cause)[:300]}") from None
    column = "text" if builder == "text" else text_field
    if column not in ds.column_names:
        raise DataError(
            f"--input {path}: no {column!r} column (see --text-field); columns are {ds.column_names}"
        )
    if ds.features[column].dtype not in ("string", "large_string"):
        raise DataError(f"--input {path}: column {column!r} holds {ds.features[column]}, not strings")
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    return ds


def _load_hub(name: str, text_field: str, split: str, max_documents: int | None, cache_dir: str | None):
    import datasets

    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if offline:
        raise DataError(
            f"--input {name}: not a local file or folder, and the Hugging Face hub is disabled "
            "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1). Give a local .txt/.jsonl/.parquet path, or unset "
            "the offline variables to stream the hub dataset."
        )
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(f"--input {name}: not a local path, and loading it from the hub failed: "
                        f"{type(e).__name__}: {str(e)[:300]}") from None
    rows = islice(stream, max_documents) if max_documents else stream

    def gen():
        for row in rows:
            if text_field not in row:
                raise DataError(f"--input {name}: rows have no {text_field!r} field (see --text-field); "
                                f"fields are {sorted(row)}")
            yield {"text": row[text_field]}

    return datasets.Dataset.from_generator(gen, cache_dir=cache_dir)


def load_documents(inputs: Sequence[str], *, text_field: str = "text", text_unit: str = "paragraph",
                   hub_split: str = "train", max_documents: int | None = None,
                   cache_dir: str | None = None, globs: Sequence[str] = (),
                   on_skip: Callable[[Path, str], None] | None = None):
    """All inputs as one ``datasets.Dataset`` with a ``text`` column, empty documents dropped.

    ``globs`` select the files of folder inputs (see the module docstring); ``on_skip(path, reason)``
    hears of each matched file skipped as empty, binary or not UTF-8."""
    import datasets

    if not inputs:
        raise DataError("--input: give at least one file, folder or hub dataset name")
    if text_unit not in TEXT_UNITS:
        raise DataError(f"--text-unit must be one of {TEXT_UNITS}, got {text_unit!r}")
    parts = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir() and globs:
            parts += _load_globbed(_globbed_files(path, globs), text_field, text_unit, cache_dir,
                                   on_skip or (lambda *_: None))
        elif path.exists():
            parts += [_load_local(f, text_field, text_unit, cache_dir) for f in _files_of(path)]
        elif not _looks_like_hub_name(item):
            raise DataError(f"--input {item}: no such file or folder")
        else:
            parts.append(_load_hub(item, text_field, hub_split, max_documents, cache_dir))
    if not parts:
        raise DataError(f"--input {' '.join(inputs)}: every matched file was skipped (empty, binary or "
                        "not UTF-8)")
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if max_documents:
        ds = ds.select(range(min(max_documents, len(ds))))
    if len(ds) == 0:
        raise DataError(f"--input {' '.join(inputs)}: contains no non-empty text documents")
    return ds
