"""CUDA graphs for the decode loop: capture one decode step, replay it for every token.

At batch 1 a decode step is hundreds of small kernels; launching them from Python costs more than
running them.  A captured graph replays the whole step with one launch.  The rules a step must
follow to be captured (PyTorch's, restated for the runtime):

* every tensor the step reads or writes lives at a fixed address: inputs are copied into the
  static buffers (:class:`GraphedStep` does it), the KV cache is preallocated to its maximum length
  and written in place (``index_copy_`` at a position held in a device tensor, never a Python int
  that changes between tokens);
* no host synchronisation inside the step (no ``.item()``, no ``nonzero``, no data-dependent
  shapes): the Q-Sparse kernels keep ``k`` fixed and skip zero rows with predicates, so they qualify;
* the outputs returned are the static output tensors, overwritten by the next replay: copy what
  must outlive it.

Kernels launched with Programmatic Dependent Launch (:mod:`qsparse_dist.kernels.pdl`, on by default
on Hopper) are captured as programmatic graph edges (CUDA >= 12.3) and keep their overlap on replay;
nothing changes here (H200, torch 2.11 + CUDA 13.0: fp32 graph parity of the decode step checked by
``tools/bench_decode.py``).

On a CPU tensor (or ``enabled=False``) :class:`GraphedStep` just calls the function, so the same
runtime code runs everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["GraphedStep", "graphs_supported"]


def graphs_supported(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every tensor is on a CUDA device (graphs capture CUDA work only)."""
    return torch.cuda.is_available() and len(tensors) > 0 and all(t.is_cuda for t in tensors)


class GraphedStep:
    """``step = GraphedStep(fn, example_inputs)``; ``step(*inputs)`` == ``fn(*inputs)``, replayed.

    Args:
        fn: the step, ``fn(*tensors) -> tensor | tuple of tensors``; must obey the rules above.
        example_inputs: tensors of the shapes/dtypes/devices every later call passes; cloned into
            the static input buffers.
        warmup: eager calls on a side stream before capture (lets libraries allocate workspaces
            and Triton compile outside the capture).
        enabled: ``None`` = capture when all inputs are CUDA tensors; ``False`` = always eager.
        pool: a memory pool handle (``torch.cuda.graph_pool_handle()``) to share between graphs.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
        example_inputs: Sequence[torch.Tensor],
        *,
        warmup: int = 2,
        enabled: bool | None = None,
        pool=None,
    ) -> None:
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        if not all(isinstance(t, torch.Tensor) for t in example_inputs):
            raise ValueError("example_inputs must be a sequence of tensors")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs a warmed-up step), got {warmup}")
        self.fn = fn
        self.enabled = graphs_supported(example_inputs) if enabled is None else bool(enabled)
        if self.enabled and not graphs_supported(example_inputs):
            raise ValueError("enabled=True needs every example input on a CUDA device")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_outputs = None
        if self.enabled:
            self._capture(list(example_inputs), warmup, pool)
        else:
            self.static_inputs = list(example_inputs)

    def _capture(self, example_inputs: list[torch.Tensor], warmup: int, pool) -> None:
        self.static_inputs = [t.clone() for t in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_outputs = self.fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        if not self.enabled:
            return self.fn(*inputs)
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for dst, src in zip(self.static_inputs, inputs):
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
        self.graph.replay()
        return self.static_outputs

    def replay(self):
        """Replay with whatever the static input buffers hold now (no copies)."""
        if not self.enabled:
            return self.fn(*self.static_inputs)
        self.graph.replay()
        return self.static_outputs
