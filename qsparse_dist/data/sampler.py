"""Deterministic, data-parallel-sharded, resumable order of training samples.

The sample *stream* is an endless sequence of epochs; epoch ``e`` is the permutation of
``range(N)`` drawn from ``numpy.random.default_rng([seed, e])``.  Optimizer step ``t`` consumes stream
positions ``[t·G, (t+1)·G)`` (``G`` = global batch).  That global batch is cut into ``A`` gradient-
accumulation rounds of ``dp`` micro-batches of ``b`` samples (``G = A·dp·b``): data-parallel rank ``r``
takes, in round ``m``, positions ``t·G + (m·dp + r)·b + [0, b)``.

So the samples of a step do not depend on ``dp`` or ``A`` (only their split does) — a run with
DP=2 sees exactly the samples of the single-process run — and the whole state needed to resume is
the step number (``consumed_samples = t·G`` is saved for reference).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np

__all__ = ["StepSampler", "eval_batches"]


class StepSampler:
    """Yields, per optimizer step, the list of this rank's micro-batches (lists of sample ids)."""

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, dp_size: int, dp_rank: int,
                 seed: int, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError("the dataset has no complete sample")
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} "
                             f"× data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.n, self.G, self.b, self.dp, self.r = num_samples, global_batch, micro_batch, dp_size, dp_rank
        self.accum = global_batch // (micro_batch * dp_size)
        self.seed, self.shuffle = seed, shuffle

    @lru_cache(maxsize=2)  # noqa: B019 - two epochs live at an epoch boundary; the sampler is long-lived
    def _epoch(self, e: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        return np.random.default_rng([self.seed, e]).permutation(self.n).astype(np.int64)

    def positions(self, start: int, count: int) -> np.ndarray:
        """Sample ids at stream positions ``[start, start + count)``."""
        pos = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(pos // self.n):
            sel = (pos // self.n) == e
            out[sel] = self._epoch(int(e))[pos[sel] % self.n]
        return out

    def step(self, t: int) -> list[list[int]]:
        """This rank's ``accum`` micro-batches for optimizer step ``t``."""
        batch = self.positions(t * self.G, self.G)
        return [batch[(m * self.dp + self.r) * self.b:(m * self.dp + self.r + 1) * self.b].tolist()
                for m in range(self.accum)]

    def consumed_samples(self, t: int) -> int:
        return t * self.G

    def micro_batches(self, start_step: int, end_step: int) -> Iterator[list[int]]:
        """Flat stream of micro-batches for steps ``[start_step, end_step)`` (a DataLoader batch_sampler)."""
        for t in range(start_step, end_step):
            yield from self.step(t)


def eval_batches(num_samples: int, iters: int, micro_batch: int, dp_size: int, dp_rank: int) -> list[list[int]]:
    """Fixed validation micro-batches: the first ``iters·dp·b`` samples (wrapping), sharded like training."""
    per = micro_batch * dp_size
    ids = np.arange(iters * per) % num_samples
    return [ids[i * per + dp_rank * micro_batch: i * per + (dp_rank + 1) * micro_batch].tolist()
            for i in range(iters)]
