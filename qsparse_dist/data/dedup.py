"""Exact-duplicate documents: keep the first occurrence of each distinct text.

A document's identity is the SHA-1 of its UTF-8 bytes, computed by a batched ``datasets.map`` (so the
texts stay in the memory-mapped Arrow cache); only the 20-byte digests are held in memory, and
``numpy.unique(..., return_index=True)`` picks the first index of each.  The kept documents stay in
their original order.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["drop_exact_duplicates"]


def _digests(batch: dict) -> dict:
    return {"sha1": [hashlib.sha1(t.encode("utf-8")).digest() for t in batch["text"]]}


def drop_exact_duplicates(docs):
    """``(docs without repeats, number dropped)`` for a ``datasets.Dataset`` with a ``text`` column."""
    hashed = docs.map(_digests, batched=True, batch_size=1024, desc="hash documents")
    digests = np.frombuffer(b"".join(hashed["sha1"]), dtype="V20")
    _, first = np.unique(digests, return_index=True)
    dropped = len(docs) - len(first)
    if dropped == 0:
        return docs, 0
    return docs.select(np.sort(first)), dropped
