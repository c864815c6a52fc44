"""Token ids → response text: incremental detokenization plus stop strings.

A stop string may arrive split over several tokens, so text that could still be the beginning of a
stop string is held back until it is decided: ``push`` returns only text that can no longer be part
of a match, and the text ends right before the first stop string found (which is not included, as in
the OpenAI API).
"""

from __future__ import annotations

__all__ = ["StopText"]


class StopText:
    """``push(token_id) -> new text``; ``stopped`` turns True once a stop string has appeared.

    The text is always the decode of *all* ids so far (SentencePiece spacing and byte-fallback runs
    depend on context, so an earlier piece can change: ``b"j"`` followed by an invalid UTF-8 byte
    decodes as two U+FFFD).  Streaming sends what is new past the characters already sent and waits
    while the text ends in U+FFFD — the runtime's ``TextStream`` rule, so without stop strings the
    stream is exactly what ``qsparse-dist generate`` streams; ``final`` is the whole decode — what
    ``generate --no-stream`` prints — cut before the first stop string."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decode of every id so far
        self.sent = 0  # characters of ``text`` already returned
        self.end: int | None = None  # where the first stop string starts, once found
        self.stopped = False

    def _release(self, final: bool) -> str:
        if not final and self.text.endswith("\ufffd"):  # maybe a UTF-8 character whose bytes have not all come
            return ""
        visible = len(self.text)
        if self.stop:
            lo = max(0, min(self.sent, visible) - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self.text.find(s, lo, visible) for s in self.stop) if i >= 0]
            if hits:
                self.end = min(hits)
                self.stopped = True
                out, self.sent = self.text[self.sent:self.end], max(self.sent, self.end)
                return out
        end = visible
        if not final:
            for s in self.stop:  # hold back the longest tail that starts a stop string
                for n in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text[:visible].endswith(s[:n]):
                        end = min(end, visible - n)
                        break
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text once generation has ended (held-back partial matches included)."""
        if self.stopped:
            return ""
        return self._release(final=True)

    @property
    def final(self) -> str:
        return self.text if self.end is None else self.text[: self.end]
