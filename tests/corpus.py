"""The test corpus: the standard library's ``pydoc_data`` help topics, present on every Python.

Tests need nothing outside the repository, so no test reads a folder beside the clone; this is their one source
of natural-language text (the quickstart trains on the same topics).  ``corpus_text()`` joins the
topics in sorted order after one paragraph of ``PANGRAMS`` and shapes them for the tests:

* Alphabet: ASCII letters, space, newline and 11 punctuation marks (typographic quotes and dashes
  folded to ASCII; digits and every other character dropped), 65 characters.  The tests train
  320-piece SentencePiece tokenizers with byte fallback: 256 byte pieces and 4 specials leave room
  for 60 required characters (``character_coverage`` 0.9995 drops the rarest).  The raw topics need
  88 and training fails; this corpus needs at most 57 on Python 3.11-3.13 for slices of 60 kB and
  more, 59 for 20 kB (the external corpus used before: 55).  The tiny HF BPE tokenizers (96 pieces, no byte fallback) keep every character.
* Layout: no trailing blanks on a line, paragraphs separated by exactly one empty line, so
  ``[p for p in text.split("\\n\\n") if p.strip()]`` are exactly ``prepare-data``'s documents
  (default ``--text-unit paragraph``).

About 440 kB on Python 3.11 (more on later versions); the text differs between Python versions, so
no test may depend on its exact content.
"""

from __future__ import annotations

import functools
import re
import string
from pathlib import Path

ALPHABET = frozenset(string.ascii_letters + " \n.,;:'\"!?-()")
# First paragraph: pangrams in both cases with every punctuation mark, so that any prefix of the corpus
# holds every character of ALPHABET (the tiny HF tokenizers train on the first 40 kB and have no byte
# fallback: a character they never saw encodes as <unk>).
PANGRAMS = ("The quick brown fox jumps over the lazy dog! Sphinx of black quartz: judge my vow?\n"
            "PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS; \"HOW VEXINGLY QUICK DAFT ZEBRAS JUMP\" (it's true) - done.")
_FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-",
                       "\u2026": "..."})


@functools.cache
def _full_text() -> str:
    import pydoc_data.topics as topics

    text = "\n\n".join([PANGRAMS, *(topics.topics[name].strip("\n") for name in sorted(topics.topics))])
    text = "".join(c for c in text.translate(_FOLD) if c in ALPHABET)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def corpus_text(max_chars: int | None = None) -> str:
    """The corpus, cut to its first ``max_chars`` characters when given."""
    text = _full_text()
    if max_chars is not None and max_chars > len(text):
        raise ValueError(f"corpus has {len(text)} characters, fewer than the {max_chars} asked for")
    return text if max_chars is None else text[:max_chars]


def write_corpus(path: str | Path, max_chars: int | None = None) -> Path:
    """Write ``corpus_text(max_chars)`` to ``path`` as UTF-8 (a plain-text input for prepare-data or a
    tokenizer trainer); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(corpus_text(max_chars), encoding="utf-8")
    return path
