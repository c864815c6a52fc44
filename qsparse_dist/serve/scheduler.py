"""The batching scheduler: one background thread owns the model and decodes every active request.

Loop (continuous batching):
    1. drop requests whose client went away (their slot and KV cache are freed at once);
    2. admit queued requests, oldest first, while fewer than ``max_batch`` are active: prefill each
       alone (one forward over its prompt) and sample its first token;
    3. one batched decode step over all active requests (:func:`.batch_step.decode_step`), sample one
       token per request with that request's own generator, retire the finished ones.

A request finishes at an EOS id (``finish_reason = "stop"``) or after ``max_tokens`` tokens
(``"length"``).  Stop *strings* are text, so the HTTP side matches them and cancels the request.
Sampling is :func:`qsparse_dist.infer.sampling.sample_next` with a ``torch.Generator`` seeded per
request, exactly as :func:`qsparse_dist.infer.generate.generate_ids` does, so a request gets the same
tokens (greedy or seeded) whether it decodes alone or in a batch.

Tokens travel to the request's ``asyncio.Queue`` through ``loop.call_soon_threadsafe`` as events
``("token", id)``, ``("done", finish_reason)`` or ``("error", message)``.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from ..infer.runtime import LoadedModel
from ..infer.sampling import sample_next
from .batch_step import decode_step, decode_step_unbatched, prefill, supports_batched_step
from .metrics import Metrics

__all__ = ["GenerationRequest", "BatchScheduler"]


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to decode and the channel its tokens go back through."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    ignore_eos: bool = False
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    # worker-side state
    generated: int = 0
    last_token: int = -1
    position: int = 0
    cache: list | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Called from the HTTP side (client gone, stop string matched): the worker drops the row."""
        self.cancelled = True

    def _send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # event loop closed (shutdown): nobody is listening any more
            pass


class BatchScheduler:
    """Owns ``lm.model`` on a background thread; ``submit`` queues a request (thread-safe)."""

    def __init__(self, lm: LoadedModel, *, max_batch: int, metrics: Metrics) -> None:
        if max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
        self.lm, self.max_batch, self.metrics = lm, max_batch, metrics
        self.batched = supports_batched_step(lm.model)
        self.eos = set(lm.eos_token_ids)
        self._queue: collections.deque[GenerationRequest] = collections.deque()
        self._active: list[GenerationRequest] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qsparse-serve-decode", daemon=True)

    # ---------------------------------------------------------------- HTTP side
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every queued / active request with an error and join the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, req: GenerationRequest) -> None:
        with self._cv:
            if self._stopping:
                req._send("error", "the server is shutting down")
                return
            self._queue.append(req)
            self.metrics.set_queue(len(self._queue), len(self._active))
            self._cv.notify_all()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ---------------------------------------------------------------- worker
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._queue and not self._active:
                        self._cv.wait()
                    if self._stopping:
                        break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._active:
                        self._step()
                except Exception as e:  # a failed step fails its requests, not the server
                    for req in self._active:
                        req._send("error", f"decode failed: {type(e).__name__}: {e}")
                    self._active.clear()
                self.metrics.set_queue(len(self._queue), len(self._active))
        with self._cv:
            for req in [*self._queue, *self._active]:
                req._send("error", "the server is shutting down")
            self._queue.clear()
            self._active.clear()

    def _drop_cancelled(self) -> None:
        kept = []
        for r in self._active:
            if r.cancelled:
                self._retire_cancelled(r)
            else:
                kept.append(r)
        self._active = kept

    def _retire_cancelled(self, req: GenerationRequest) -> None:
        req.cache = None  # the KV cache goes now, not when the HTTP side lets go of the request
        req._send("done", "cancelled")
        self.metrics.add_cancelled(1)

    def _admit(self) -> None:
        while len(self._active) < self.max_batch:
            with self._cv:
                if not self._queue:
                    return
                req = self._queue.popleft()
            if req.cancelled:
                self._retire_cancelled(req)
                continue
            if req.max_tokens == 0:
                req._send("done", "length")
                continue
            dev = self.lm.device
            try:
                req.generator = torch.Generator(device=dev).manual_seed(req.seed)
                logits, req.cache = prefill(self.lm.model, req.prompt, dev)
            except Exception as e:  # e.g. out of memory on a long prompt: fail this request only
                req.cache = None
                req._send("error", f"prefill failed: {type(e).__name__}: {e}")
                continue
            req.position = len(req.prompt)
            self.metrics.observe_ttft(time.perf_counter() - req.submitted_at)
            if self._emit(req, logits.unsqueeze(0)):
                self._active.append(req)
            else:
                req.cache = None

    def _emit(self, req: GenerationRequest, logits: torch.Tensor | None, greedy: int | None = None) -> bool:
        """Sample ``req``'s next token from ``logits [1, V]`` (or take the precomputed greedy id), send
        it; True while the request continues."""
        if greedy is None:
            tok = int(sample_next(logits, req.temperature, req.top_p, req.generator).item())
        else:
            tok = greedy
        req.last_token = tok
        req.generated += 1
        req._send("token", tok)
        self.metrics.add_tokens(1)
        if tok in self.eos and not req.ignore_eos:
            req._send("done", "stop")
            return False
        if req.generated >= req.max_tokens:
            req._send("done", "length")
            return False
        return True

    def _step(self) -> None:
        rows = self._active
        t0 = time.perf_counter()
        step = decode_step if self.batched else decode_step_unbatched
        caches = [r.cache for r in rows]
        logits = step(self.lm.model, [r.last_token for r in rows], [r.position for r in rows], caches,
                      self.lm.device)
        # greedy rows: one argmax and one device→host copy for the whole batch (= sample_next at T = 0)
        greedy = logits.argmax(dim=-1).tolist() if any(r.temperature == 0.0 for r in rows) else [None] * len(rows)
        still = []
        for r, cache, lg, g in zip(rows, caches, logits, greedy):
            r.cache = cache
            r.position += 1
            if r.cancelled:
                self._retire_cancelled(r)
            elif self._emit(r, lg.unsqueeze(0), g if r.temperature == 0.0 else None):
                still.append(r)
            else:
                r.cache = None
        self._active = still
        self.metrics.observe_step(len(rows), time.perf_counter() - t0)
