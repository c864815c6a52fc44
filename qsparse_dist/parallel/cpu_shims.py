"""Every shim megatron-core 0.16.1 needs to run on a machine without CUDA — in ONE module.

``enable_cpu_shims()`` is idempotent and a no-op when ``torch.cuda.is_available()``; on a GPU nothing
here is touched.  Each shim answers one measured failure (``/work/shared/feasibility``, probes t1–t4):

1. ``device="cuda"`` hard-coded in megatron (RoPE tables, TP all-gather buffers, the router, the
   pipeline p2p buffers in ``pipeline_parallel/schedules.py``): a process-wide
   :class:`~torch.overrides.TorchFunctionMode` rewrites ``device=cuda…`` to ``cpu`` and makes
   ``Tensor.cuda()`` the identity; ``torch.cuda.current_device()`` returns the CPU device.
2. ``model_parallel_cuda_manual_seed`` needs CUDA RNG states: :func:`cpu_rng_tracker_class` keeps the
   same named streams (data-parallel, model-parallel, expert-parallel) as CPU generator states and
   :func:`model_parallel_cpu_manual_seed` seeds them with megatron's offsets.
3. The alltoall MoE dispatcher records events on a side stream and keeps its split sizes on the
   device unless they are CUDA tensors: dummy ``torch.cuda.Stream/Event/current_stream/stream``,
   a no-op ``torch.cuda.synchronize`` and a ``maybe_move_tensor_to_cpu`` that always yields host
   split sizes (gloo's ``all_to_all_single`` rejects tensors there).
4. megatron-core 0.16.1's ``moe_utils`` defines its Transformer-Engine helpers only inside
   ``try: import transformer_engine`` without an ``else`` → ``NameError: te_general_gemm`` in the
   router: the missing names are set to ``None`` (0.19 does the same).

Not shims (they are model settings, see :func:`qsparse_dist.model.megatron_gpt.transformer_config_from`):
fusions off, ``use_cpu_initialization=True``, dropout 0, and the sequence-parallel-aware RMSNorm
(``qsparse_dist.layers.specs``).  Activation recompute is not shimmed (its checkpoint code reads the
CUDA RNG state).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_shims", "cpu_shims_enabled", "cpu_rng_tracker_class", "model_parallel_cpu_manual_seed"]

_ENABLED = False
_MODE: TorchFunctionMode | None = None

# Names 0.16.1's moe_utils leaves undefined without Transformer Engine.
_TE_NAMES = (
    "fused_compute_score_for_moe_aux_loss",
    "fused_moe_aux_loss",
    "fused_permute",
    "fused_permute_and_pad_with_probs",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_topk_with_score_function",
    "fused_unpermute",
    "te_general_gemm",
)


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


def _host_split_sizes(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``maybe_move_tensor_to_cpu`` that always moves (gloo wants host split sizes)."""
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def _patch_megatron_moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.maybe_move_tensor_to_cpu = _host_split_sizes
    token_dispatcher.maybe_move_tensor_to_cpu = _host_split_sizes
    for name in _TE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def cpu_shims_enabled() -> bool:
    return _ENABLED


def enable_cpu_shims() -> bool:
    """Install the shims once per process; return whether they are active (False on a GPU)."""
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Stream = _DummyStream
    torch.cuda.Event = _DummyEvent
    torch.cuda.current_stream = lambda *args, **kwargs: _CURRENT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    _patch_megatron_moe()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    return True


_TRACKER_CLASS = None


def cpu_rng_tracker_class():
    """``CpuRNGStatesTracker``: megatron's ``CudaRNGStatesTracker`` with the named streams kept as CPU
    generator states (built on first use so that importing this module does not import megatron)."""
    global _TRACKER_CLASS
    if _TRACKER_CLASS is not None:
        return _TRACKER_CLASS
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise ValueError(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    _TRACKER_CLASS = CpuRNGStatesTracker
    return _TRACKER_CLASS


def model_parallel_cpu_manual_seed(seed: int):
    """CPU twin of ``megatron.core.tensor_parallel.model_parallel_cuda_manual_seed`` (same offsets:
    model-parallel ``seed + 2718 + tp_rank``, expert-parallel ``seed + 1024 + 100·ep_rank + etp_rank``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tracker = cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(
        mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME,
        seed + 1024 + 100 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank(),
    )
    return tracker
