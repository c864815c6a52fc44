"""Supervised fine-tuning data: jsonl conversations → packed rows with a loss mask on prompt tokens.

Input records (one JSON object per line)::

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}

Rendering.  With a tokenizer that has a chat template, both forms are rendered with it (prompt/response
becomes one user turn and one assistant turn).  The conversation is rendered turn by turn: the text
up to each assistant turn *with the generation prompt* is the context (no loss) and what the full
render adds after it — the assistant's content and its end-of-turn tokens — is trained.  A template
whose renders are not prefixes of each other is refused (the split would be ambiguous).  Without a
template: ``[bos] prompt response [eos]`` (loss on ``response [eos]``), and messages are joined as
``"{role}: {content}\\n"`` with loss on assistant contents and a final ``eos``.

Rows.  Each example of ``L`` tokens gives ``L-1`` positions ``(input=t[j], label=t[j+1],
loss_mask=trained[j+1])``; the loss is ``Σ mask·CE / Σ mask``
(:func:`qsparse_dist.model.sft_loss.masked_lm_loss`), so prompt
tokens contribute exactly nothing.  With ``pack=True`` examples are concatenated greedily into rows
of ``seq_length`` positions; ``doc_ids`` numbers the examples of a row (-1 = padding) and
``position_ids`` restarts at 0 for each.  Cross-example attention is prevented by the block-diagonal
causal mask :func:`qsparse_dist.model.masks.packed_attention_mask` (``True`` = masked, megatron-core's
convention), which
megatron-core's local ``DotProductAttention`` applies as given.  RoPE needs no position reset under
that mask: scores depend only on ``q_pos − k_pos`` inside an example.  An attention backend that only
does plain causal attention (no arbitrary mask, e.g. a causal-only flash kernel) must use
``pack=False``: one example per row, right-padded, padding excluded from the loss — no leakage, at the
cost of the padding compute.  Examples longer than ``seq_length`` are truncated (counted), and
examples left without a trained token are dropped (counted).

Output directory (read by :class:`SFTDataset`)::

    sft.json                     meta: kind="sft", seq_length, packed, counts, tokenizer entry
    tokenizer/                   the tokenizer (copied into checkpoints and HF exports by the trainer)
    {train,valid}_{tokens,labels,loss_mask,doc_ids,position_ids}.npy    [rows, seq_length]

Prepare with ``python -m qsparse_dist.data.sft --input data.jsonl --tokenizer DIR --out DIR``; train
with ``qsparse-dist train ... data.path=DIR`` (the loop recognizes ``sft.json``, feeds
:class:`SFTDataset` rows and uses :func:`qsparse_dist.model.sft_loss.megatron_sft_loss`; PP = 1).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# the mask and the loss live with the model (moved in issue 15); importable from here as before
from ..model.masks import packed_attention_mask
from ..model.sft_loss import masked_lm_loss, megatron_sft_loss
from .sources import DataError

__all__ = [
    "SFTFormatError",
    "SFTExample",
    "read_sft_jsonl",
    "tokenize_record",
    "pack_examples",
    "packed_attention_mask",
    "masked_lm_loss",
    "megatron_sft_loss",
    "prepare_sft",
    "SFTDataset",
    "is_sft_dir",
    "read_sft_meta",
    "FIELDS",
]

FIELDS = ("tokens", "labels", "loss_mask", "doc_ids", "position_ids")
META = "sft.json"
ROLES = ("system", "user", "assistant", "tool")


class SFTFormatError(DataError):
    """A malformed SFT record or directory; the message names the file, line and field (a
    :class:`~qsparse_dist.data.DataError`, so the trainer reports it like any data error)."""


@dataclass
class SFTExample:
    """Token ids of one conversation and, per token, whether it is trained (a response token)."""

    ids: list[int]
    trained: list[bool]

    def __post_init__(self) -> None:
        assert len(self.ids) == len(self.trained)


# ----------------------------------------------------------------------------- reading


def _check_record(rec: object, where: str) -> dict:
    if not isinstance(rec, dict):
        raise SFTFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise SFTFormatError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise SFTFormatError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise SFTFormatError(f"{where}: messages[{i}].role={m['role']!r} is not one of {ROLES}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise SFTFormatError(f"{where}: 'messages' has no assistant turn (nothing to train on)")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    if "prompt" in rec or "response" in rec:
        for k in ("prompt", "response"):
            if not isinstance(rec.get(k), str):
                raise SFTFormatError(f"{where}: field {k!r} must be a string")
        if not rec["response"]:
            raise SFTFormatError(f"{where}: field 'response' is empty (nothing to train on)")
        return {"prompt": rec["prompt"], "response": rec["response"]}
    raise SFTFormatError(f"{where}: a record needs 'prompt'+'response' or 'messages' (got keys {sorted(rec)})")


def read_sft_jsonl(paths: str | Path | Iterable[str | Path]) -> Iterator[dict]:
    """Validated records from one or more jsonl files (blank lines skipped)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SFTFormatError(f"--input {path}: no such file")
        n = 0
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SFTFormatError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                yield _check_record(rec, f"{path}:{lineno}")
                n += 1
        if n == 0:
            raise SFTFormatError(f"{path}: no records")


# ----------------------------------------------------------------------------- tokenizing


def _encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False)) if text else []


def _render(tok, messages: list[dict], generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _with_template(tok, messages: list[dict], where: str) -> SFTExample:
    ids: list[int] = []
    trained: list[bool] = []
    done = ""

    def add(text: str, train: bool) -> None:
        t = _encode(tok, text)
        ids.extend(t)
        trained.extend([train] * len(t))

    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = _render(tok, messages[:i], True) if i else ""
            full = _render(tok, messages[: i + 1], False)
            if not head.startswith(done) or not full.startswith(head):
                raise SFTFormatError(
                    f"{where}: the tokenizer's chat template does not render turn {i} as an extension of the "
                    "previous turns, so the prompt/response split is ambiguous; use prompt/response records "
                    "with a template-free tokenizer or another template")
            add(head[len(done):], False)
            add(full[len(head):], True)
        else:
            full = _render(tok, messages[: i + 1], False)
            if not full.startswith(done):
                raise SFTFormatError(f"{where}: the chat template's render of turn {i} does not extend turn {i - 1}")
            add(full[len(done):], False)
        done = full
    return SFTExample(ids, trained)


def _without_template(tok, rec: dict) -> SFTExample:
    bos = getattr(tok, "bos_token_id", None)
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        raise SFTFormatError("the tokenizer has neither a chat template nor an eos token: cannot end responses")
    ids: list[int] = [bos] if bos is not None else []
    trained: list[bool] = [False] * len(ids)
    if "prompt" in rec:
        segs = [(rec["prompt"], False), (rec["response"], True)]
    else:
        segs = []
        for m in rec["messages"]:
            segs.append((f"{m['role']}: ", False))
            segs.append((m["content"], m["role"] == "assistant"))
            segs.append(("\n", False))
        segs.pop()  # no newline after the last turn: eos follows
    for text, train in segs:
        t = _encode(tok, text)
        ids.extend(t)
        trained.extend([train] * len(t))
    ids.append(eos)
    trained.append(True)
    return SFTExample(ids, trained)


def tokenize_record(tok, rec: dict, where: str = "record") -> SFTExample:
    """One validated record → :class:`SFTExample` (chat template when the tokenizer has one)."""
    if getattr(tok, "chat_template", None):
        msgs = rec.get("messages") or [{"role": "user", "content": rec["prompt"]},
                                       {"role": "assistant", "content": rec["response"]}]
        return _with_template(tok, msgs, where)
    return _without_template(tok, rec)


# ----------------------------------------------------------------------------- packing


def pack_examples(examples: Iterable[SFTExample], seq_length: int, pad_id: int = 0,
                  pack: bool = True) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Rows of ``seq_length`` positions (see the module docstring); returns the arrays and counts."""
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2, got {seq_length}")
    rows: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] | None = None
    doc = -1
    stats = {"examples": 0, "truncated": 0, "dropped": 0, "trained_tokens": 0}

    def new_row() -> dict[str, list[int]]:
        r = {f: [] for f in FIELDS}
        rows.append(r)
        return r

    for ex in examples:
        inputs, labels, mask = ex.ids[:-1], ex.ids[1:], [int(t) for t in ex.trained[1:]]
        if len(inputs) > seq_length:
            inputs, labels, mask = inputs[:seq_length], labels[:seq_length], mask[:seq_length]
            stats["truncated"] += 1
        if not any(mask):
            stats["dropped"] += 1
            continue
        n = len(inputs)
        if cur is None or not pack or len(cur["tokens"]) + n > seq_length:
            cur, doc = new_row(), -1
        doc += 1
        cur["tokens"] += inputs
        cur["labels"] += labels
        cur["loss_mask"] += mask
        cur["doc_ids"] += [doc] * n
        cur["position_ids"] += list(range(n))
        stats["examples"] += 1
        stats["trained_tokens"] += sum(mask)
    pad = {"tokens": pad_id, "labels": pad_id, "loss_mask": 0, "doc_ids": -1, "position_ids": 0}
    out = {f: np.zeros((len(rows), seq_length), dtype=np.uint8 if f == "loss_mask" else np.int32) for f in FIELDS}
    for i, r in enumerate(rows):
        n = len(r["tokens"])
        for f in FIELDS:
            out[f][i, :n] = r[f]
            out[f][i, n:] = pad[f]
    stats["rows"] = len(rows)
    return out, stats


# ----------------------------------------------------------------------------- files


def prepare_sft(inputs: Sequence[str | Path], tokenizer, out_dir: str | Path, seq_length: int, *,
                pack: bool = True, valid_fraction: float = 0.0, seed: int = 1234) -> dict:
    """Read, tokenize, split (by example, seeded) and pack; write ``out_dir``; return the meta dict.
    ``tokenizer`` is a transformers tokenizer or a directory to load one from."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tok_path = str(tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    else:
        tok_path = getattr(tokenizer, "name_or_path", None)
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    examples = [tokenize_record(tokenizer, rec, f"record {i}") for i, rec in enumerate(read_sft_jsonl(inputs))]
    order = np.random.default_rng(seed).permutation(len(examples))
    n_valid = int(round(valid_fraction * len(examples)))
    splits = {"train": [examples[i] for i in sorted(order[n_valid:])],
              "valid": [examples[i] for i in sorted(order[:n_valid])]}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")  # travels into checkpoints and the HF export
    meta: dict = {"kind": "sft", "seq_length": seq_length, "packed": pack, "source_tokenizer": tok_path,
                  "vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id,
                  "tokenizer": {"kind": "hf", "path": "tokenizer", "vocab_size": len(tokenizer),
                                "eos_id": tokenizer.eos_token_id, "bos_id": tokenizer.bos_token_id},
                  "chat_template": bool(getattr(tokenizer, "chat_template", None)), "splits": {}}
    for split, exs in splits.items():
        arrays, stats = pack_examples(exs, seq_length, pad_id, pack)
        if split == "train" and stats["rows"] == 0:
            raise SFTFormatError("no training rows: every example was dropped (no response token within "
                                 f"seq_length={seq_length})")
        for f, a in arrays.items():
            np.save(out / f"{split}_{f}.npy", a)
        meta["splits"][split] = stats
    (out / META).write_text(json.dumps(meta, indent=1))
    return meta


def read_sft_meta(path: str | Path) -> dict:
    """``sft.json`` of a prepared SFT directory (the training loop's ``data_meta`` for SFT runs)."""
    if not is_sft_dir(path):
        raise SFTFormatError(f"data.path={str(path)!r}: not an SFT directory (no {META} with kind='sft')")
    return json.loads((Path(path) / META).read_text())


def is_sft_dir(path: str | Path) -> bool:
    """Whether ``path`` was written by :func:`prepare_sft` (the training data hook dispatches on it)."""
    p = Path(path) / META
    return p.is_file() and json.loads(p.read_text()).get("kind") == "sft"


class SFTDataset(torch.utils.data.Dataset):
    """Rows of a prepared SFT directory as dicts of tensors ``tokens, labels, loss_mask, doc_ids,
    position_ids`` (``[seq_length]`` each, memory-mapped), plus ``attention_mask`` ``[1, S, S]``
    (:func:`packed_attention_mask`) when ``with_attention_mask``."""

    def __init__(self, path: str | Path, split: str = "train", with_attention_mask: bool = True) -> None:
        path = Path(path)
        if not is_sft_dir(path):
            raise SFTFormatError(f"data.path={str(path)!r}: not an SFT directory (no {META} with kind='sft')")
        self.meta = json.loads((path / META).read_text())
        if split not in self.meta["splits"]:
            raise SFTFormatError(f"{path}: no split {split!r} (have {sorted(self.meta['splits'])})")
        self.arrays = {f: np.load(path / f"{split}_{f}.npy", mmap_mode="r") for f in FIELDS}
        self.with_attention_mask = with_attention_mask

    @property
    def seq_length(self) -> int:
        return int(self.meta["seq_length"])

    def num_samples(self, seq_length: int) -> int:
        """Rows available for ``model.seq_length`` (the training loop's sample count); the rows were
        packed for one length, so another one is a configuration error."""
        if seq_length != self.seq_length:
            raise SFTFormatError(f"model.seq_length={seq_length} differs from the SFT data's seq_length="
                                 f"{self.seq_length} (data.path); set model.seq_length={self.seq_length}")
        return len(self)

    def __len__(self) -> int:
        return int(self.arrays["tokens"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {f: torch.from_numpy(np.array(a[i], dtype=np.int64)) for f, a in self.arrays.items()}
        row["loss_mask"] = row["loss_mask"].float()
        if self.with_attention_mask:
            row["attention_mask"] = packed_attention_mask(row["doc_ids"][None])[0]
        return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qsparse_dist.data.sft", description=__doc__.split("\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="jsonl file(s)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory (e.g. IMPORT_DIR/tokenizer)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-length", type=int, required=True)
    ap.add_argument("--no-pack", action="store_true", help="one example per row (causal-only attention backends)")
    ap.add_argument("--valid-fraction", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)
    try:
        meta = prepare_sft(a.input, a.tokenizer, a.out, a.seq_length, pack=not a.no_pack,
                           valid_fraction=a.valid_fraction, seed=a.seed)
    except (SFTFormatError, ValueError) as e:
        print(f"sft: {e}")
        return 2
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
