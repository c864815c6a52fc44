"""Autoregressive decoding with a KV cache: prefill the prompt in one forward, then one token per
step, each step feeding only the new token and the per-layer K/V of everything before
(``QSparseGPT.forward(tokens, kv_caches, start_pos)``).  Top-K is per token, so the cached decode
computes exactly what a full forward over the whole sequence computes.

Prompts of a model exported from training start with the EOS id: ``prepare-data`` packs documents as
``[tokens…, EOS]``, so EOS is what precedes the start of every document the model saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .runtime import LoadedModel
from .sampling import sample_next, validate_sampling

__all__ = ["generate_ids", "generate_text", "prompt_ids", "TextStream", "GenerationResult"]


def generate_ids(
    model: torch.nn.Module,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    seed: int = 0,
    device: torch.device | str = "cpu",
    timings: dict | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids (stops after an EOS id, which is yielded)."""
    validate_sampling(temperature, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if len(prompt) == 0:
        raise ValueError("the prompt is empty (no tokens to condition on)")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    eos = set(eos_ids)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        logits, caches = model(ids, kv_caches=[], start_pos=0)
        pos = ids.shape[1]
        if timings is not None:
            timings["prefill_s"] = time.perf_counter() - t0
        for i in range(max_new_tokens):
            tok = sample_next(logits[:, -1], temperature, top_p, gen)
            t = int(tok.item())
            yield t
            if t in eos or i == max_new_tokens - 1:
                break
            logits, caches = model(tok.view(1, 1), kv_caches=caches, start_pos=pos)
            pos += 1
    if timings is not None:
        timings["total_s"] = time.perf_counter() - t0


class TextStream:
    """Incremental detokenization: ``push(id)`` returns the newly completed text.  Decodes the whole
    continuation each time (SentencePiece spacing depends on context) and holds back a trailing
    U+FFFD (a byte-fallback character whose UTF-8 bytes have not all arrived yet)."""

    def __init__(self, tokenizer) -> None:
        self.tok, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        new, self.emitted = text[len(self.emitted):], text
        return new


def prompt_ids(lm: LoadedModel, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as the model saw documents in training (see the module doc)."""
    if lm.tokenizer is None:
        raise ValueError("the model directory has no tokenizer; pass token ids to generate_ids instead")
    ids = list(lm.tokenizer.encode(prompt, add_special_tokens=False))
    if lm.from_training and lm.eos_token_ids:
        ids = [lm.eos_token_ids[0]] + ids
    elif lm.bos_token_id is not None and getattr(lm.tokenizer, "bos_token_id", None) is not None:
        ids = [lm.bos_token_id] + ids
    return ids


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    prefill_s: float
    decode_s: float
    stopped_at_eos: bool

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(len(self.new_ids) - 1, 0)  # the first new token comes from the prefill
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def generate_text(
    lm: LoadedModel,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Decode a continuation of ``prompt``; ``on_text`` receives the text as it is produced."""
    ids = prompt_ids(lm, prompt)
    stream = TextStream(lm.tokenizer)
    timings: dict = {}
    new: list[int] = []
    for t in generate_ids(lm.model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          eos_ids=lm.eos_token_ids, seed=seed, device=lm.device, timings=timings):
        new.append(t)
        chunk = stream.push(t)
        if chunk and on_text is not None:
            on_text(chunk)
    tail = stream.flush()
    if tail and on_text is not None:
        on_text(tail)
    prefill = timings.get("prefill_s", 0.0)
    return GenerationResult(ids, new, stream.emitted, prefill, timings.get("total_s", prefill) - prefill,
                            bool(new) and new[-1] in set(lm.eos_token_ids))
