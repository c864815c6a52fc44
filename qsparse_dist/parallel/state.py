"""Model-parallel state: megatron-core ``parallel_state`` groups and the RNG tracker.

``initialize_parallel(pcfg, seed)`` assumes ``torch.distributed`` is initialized (torchrun /
DeepSpeed launcher) and builds megatron's groups for ``tp × pp`` (data parallel = the rest) with
``ep`` expert-parallel ranks and expert tensor-parallel size 1 (every expert whole on its EP rank).
Invalid layouts fail here, before any group is created, with an error naming the setting.  What
megatron needs patched on this machine (CPU shims, Transformer-Engine names) comes from
:func:`qsparse_dist.compat.prepare_megatron`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config.rules import check_world
from ..config.schema import ParallelConfig

__all__ = ["initialize_parallel", "destroy_parallel", "validate_world", "parallel_initialized"]


def validate_world(pcfg: ParallelConfig, world_size: int) -> None:
    """Raise ``ValueError`` naming the field when ``tp·pp`` / ``ep`` do not fit ``world_size`` ranks
    (the rule: :func:`qsparse_dist.config.rules.check_world`)."""
    check_world(pcfg, world_size)


def parallel_initialized() -> bool:
    from megatron.core import parallel_state as ps

    return ps.model_parallel_is_initialized()


def initialize_parallel(pcfg: ParallelConfig, seed: int) -> None:
    """Apply :func:`~qsparse_dist.compat.prepare_megatron`, create megatron-core's process groups and
    seed its RNG tracker (CUDA or CPU).  Idempotent only through :func:`destroy_parallel` in between."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialized before initialize_parallel()")
    validate_world(pcfg, dist.get_world_size())
    from ..compat import prepare_megatron
    from ..compat.megatron import model_parallel_cpu_manual_seed

    on_cpu = prepare_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        raise RuntimeError("model parallel state already initialized; call destroy_parallel() first")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=pcfg.tp,
        pipeline_model_parallel_size=pcfg.pp,
        expert_model_parallel_size=pcfg.ep,
        expert_tensor_parallel_size=1,
        **({"distributed_timeout_minutes": timeout / 60} if (timeout := getattr(pcfg, "dist_timeout_s", None)) else {}),
    )
    if on_cpu:
        model_parallel_cpu_manual_seed(seed)
    else:
        torch.cuda.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups (torch.distributed itself stays up) so another layout can follow."""
    from megatron.core import parallel_state as ps

    from ..compat.megatron import reset_rng_tracker

    ps.destroy_model_parallel()
    reset_rng_tracker()
