"""The CPU shims: what megatron-core 0.16.x needs to run without CUDA (installed only then).

:func:`enable_cpu_shims` is idempotent and a no-op when CUDA is present.  Each shim answers one
measured failure (``/work/shared/feasibility``, probes t1–t4):

1. ``device="cuda"`` hard-coded in megatron (RoPE tables, TP all-gather buffers, the router, the
   pipeline p2p buffers in ``pipeline_parallel/schedules.py``): a process-wide
   :class:`~torch.overrides.TorchFunctionMode` rewrites ``device=cuda…`` to ``cpu`` and makes
   ``Tensor.cuda()`` the identity; ``torch.cuda.current_device()`` returns the CPU device.
2. ``model_parallel_cuda_manual_seed`` needs CUDA RNG states: megatron's tracker is replaced by CPU
   generator states (:func:`qsparse_dist.compat.megatron.model_parallel_cpu_manual_seed`).
3. The alltoall MoE dispatcher records events on a side stream and keeps its split sizes on the
   device unless they are CUDA tensors: dummy ``torch.cuda.Stream/Event/current_stream/stream``,
   a no-op ``torch.cuda.synchronize`` and host split sizes
   (:func:`qsparse_dist.compat.megatron.use_host_split_sizes`).

The Transformer-Engine names are not a CPU shim: :func:`qsparse_dist.compat.prepare_megatron`
defines them whenever Transformer Engine is absent.  Not shims either (model settings, see
:func:`qsparse_dist.model.megatron.gpt.transformer_config_from`): fusions off,
``use_cpu_initialization=True``, dropout 0, the sequence-parallel-aware RMSNorm.  Activation
recompute is not shimmed (its checkpoint code reads the CUDA RNG state).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from .megatron import use_host_split_sizes

__all__ = ["enable_cpu_shims", "cpu_shims_enabled"]

_ENABLED = False
_MODE: TorchFunctionMode | None = None


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)  # a bare CUDA ordinal


class _CudaToCpuMode(TorchFunctionMode):
    """``device=cuda…`` → ``cpu`` in every torch call; ``Tensor.cuda()`` → identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


class _DummyEvent:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _DummyStream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _DummyEvent:
        return _DummyEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CURRENT_STREAM = _DummyStream()


def cpu_shims_enabled() -> bool:
    return _ENABLED


def enable_cpu_shims() -> bool:
    """Install the shims once per process; return whether they are active (False on a GPU)."""
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    use_host_split_sizes()  # version-guarded: fails before anything is touched
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Stream = _DummyStream
    torch.cuda.Event = _DummyEvent
    torch.cuda.current_stream = lambda *args, **kwargs: _CURRENT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    return True
