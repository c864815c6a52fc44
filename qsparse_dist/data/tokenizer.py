"""Tokenizers: train a sentencepiece BPE model with byte fallback, or load an existing one
(a sentencepiece ``.model`` file, or a Hugging Face tokenizer folder / ``tokenizer.json``).

:class:`Tokenizer` is the small interface the rest of the project uses (``encode``, ``decode``,
``eos_id``, ``vocab_size``); :func:`load_tokenizer` rebuilds it from the entry that
``prepare-data`` writes into ``meta.json`` so that training, export and generation all use the
tokenizer the data was made with.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .sources import DataError

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "train_sentencepiece",
           "open_tokenizer", "load_tokenizer", "save_tokenizer", "file_sha256"]

TRAIN_THREADS = 8  # fixed: the trained model depends on it
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    kind: str
    eos_id: int
    bos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, out_dir: Path) -> str:
        """Copy the tokenizer into ``out_dir``; return its path relative to ``out_dir``."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        self.model_file = str(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (OSError, RuntimeError) as e:
            raise DataError(f"--tokenizer {model_file}: not a readable sentencepiece model ({e})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        if self.eos_id < 0:
            raise DataError(f"--tokenizer {model_file}: the model defines no EOS piece (eos_id=-1)")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(list(ids))

    def save(self, out_dir: Path) -> str:
        dst = Path(out_dir) / "tokenizer.model"
        if Path(self.model_file).resolve() != dst.resolve():
            shutil.copyfile(self.model_file, dst)
        return dst.name


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, name_or_path: str | Path) -> None:
        from transformers import AutoTokenizer

        p = Path(name_or_path)
        src = str(p.parent if p.name == "tokenizer.json" else name_or_path)
        try:
            self._tok = AutoTokenizer.from_pretrained(src)
        except Exception as e:
            raise DataError(f"--tokenizer {name_or_path}: cannot load a Hugging Face tokenizer "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            raise DataError(f"--tokenizer {name_or_path}: the tokenizer defines no eos_token")
        self.eos_id = int(eos)
        self.bos_id = self._tok.bos_token_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, out_dir: Path) -> str:
        self._tok.save_pretrained(str(Path(out_dir) / "tokenizer"))
        return "tokenizer"


def open_tokenizer(spec: str | Path) -> Tokenizer:
    """``--tokenizer``: a sentencepiece ``.model`` file, else a Hugging Face tokenizer."""
    p = Path(spec)
    if p.suffix == ".model":
        if not p.is_file():
            raise DataError(f"--tokenizer {spec}: no such file")
        return SentencePieceTokenizer(p)
    if p.is_dir() and (p / "tokenizer.model").is_file() and not (p / "tokenizer.json").is_file():
        return SentencePieceTokenizer(p / "tokenizer.model")
    return HFTokenizer(spec)


def load_tokenizer(data_dir: str | Path, entry: dict | None = None) -> Tokenizer:
    """The tokenizer recorded in ``data_dir/meta.json`` (or in ``entry``: ``{"kind", "path"}``)."""
    import json

    data_dir = Path(data_dir)
    if entry is None:
        entry = json.loads((data_dir / "meta.json").read_text())["tokenizer"]
    path = data_dir / entry["path"]
    if entry["kind"] == "sentencepiece":
        return SentencePieceTokenizer(path)
    if entry["kind"] == "hf":
        return HFTokenizer(path)
    raise DataError(f"{data_dir}/meta.json: unknown tokenizer kind {entry['kind']!r}")


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> dict:
    """Copy ``tok`` into ``out_dir``; the ``meta.json`` entry describing it."""
    rel = tok.save(out_dir)
    entry = {"kind": tok.kind, "path": rel, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
             "bos_id": tok.bos_id}
    if tok.kind == "sentencepiece":
        entry["sha256"] = file_sha256(Path(out_dir) / rel)
    return entry


def _training_lines(texts: Iterable[str], max_len: int, max_lines: int) -> Iterator[str]:
    n = 0
    for doc in texts:
        for line in doc.split("\n"):
            if line.strip():
                yield line[:max_len]
                n += 1
                if n >= max_lines:
                    return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: Path, *,
                        max_sentences: int = 2_000_000, seed: int = 0) -> SentencePieceTokenizer:
    """Train BPE with byte fallback on the lines of ``texts``; write ``out_dir/tokenizer.model``.

    Whitespace is kept verbatim (identity normalisation, no whitespace collapsing) so that code and
    formatted text round-trip; ``\\n`` is a user-defined piece since training sees single lines.
    unk=0, bos=1, eos=2 (EOS separates packed documents).

    Deterministic: sentencepiece's own input sampling/shuffling is not reproducible and its result
    depends on the thread count, so at most ``max_sentences`` lines are fed in order (the caller
    strides over documents for large corpora) with a fixed number of threads.
    """
    import io

    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    max_len = 4192
    buf = io.BytesIO()  # model_writer, not model_prefix: the output path would be stored in the model
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, max_len, max_sentences), model_writer=buf,
            model_type="bpe", vocab_size=int(vocab_size),
            byte_fallback=True, character_coverage=0.9995, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
            input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=max_len, num_threads=TRAIN_THREADS,
            minloglevel=2, **SPECIAL_IDS,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"--vocab-size {vocab_size}: sentencepiece training failed: {msg}") from None
    path = out_dir / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return SentencePieceTokenizer(path)
