"""Patches of DeepSpeed 0.19.x internals (each guarded by :func:`~.versions.require`).

* :func:`skip_shm_op_build` (CPU only) — DeepSpeed's CPU accelerator JIT-compiles
  ``deepspeed_shm_comm_op`` (~50–80 s of g++, 1.6 GB) on the first ``init_distributed``; the gloo
  path works without it.
* :func:`register_expert_groups` / :func:`clear_expert_groups` — DeepSpeed's MoE gradient reduction
  looks up expert-parallel and expert-data-parallel groups by name in ``deepspeed.utils.groups``'
  private tables; megatron's groups are entered there (and removed, with ``groups.mpu``, at shutdown
  so that another engine may follow in the process).
* :func:`engine_counts_megatron_moe` — DeepSpeed's engine sets ``has_moe_layers`` only for modules
  that are ``deepspeed.runtime.engine.MoE``; during ``deepspeed.initialize`` that name is the tuple
  ``(MoE, megatron MoELayer)``.
* :func:`replace_fp32_clip` — the ZeRO-0 fp32 engine calls ``engine.clip_fp32_gradients()`` before
  the optimizer step and reports ``engine._global_grad_norm``; the replacement computes megatron's
  norm (see :func:`qsparse_dist.train.engine.grad_norm_and_clip`).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

from .versions import require

__all__ = ["skip_shm_op_build", "register_expert_groups", "clear_expert_groups", "engine_counts_megatron_moe",
           "replace_fp32_clip"]

PACKAGE = "deepspeed"


def skip_shm_op_build() -> None:
    require(PACKAGE, "deepspeed.comm.torch.build_shm_op")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def register_expert_groups(name: str, ep_group, ep_ranks: list[int], edp_group, edp_ranks: list[int]) -> None:
    """Enter megatron's expert-parallel / expert-data-parallel groups under ``name`` (``ep_size_{ep}``:
    DeepSpeed parses the size from it)."""
    require(PACKAGE, "deepspeed.utils.groups._EXPERT_*_GROUP tables")
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(ep_ranks)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(edp_ranks)


def clear_expert_groups() -> None:
    """Empty DeepSpeed's expert group tables and forget its ``mpu`` (engine teardown)."""
    require(PACKAGE, "deepspeed.utils.groups._EXPERT_*_GROUP tables / groups.mpu")
    from deepspeed.utils import groups

    for d in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
              groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        d.clear()
    groups.mpu = None


@contextlib.contextmanager
def engine_counts_megatron_moe(model):
    """During ``deepspeed.initialize``: DeepSpeed's engine counts megatron ``MoELayer`` modules as MoE
    layers (it tests ``isinstance(module, deepspeed.runtime.engine.MoE)`` and reads ``num_experts``)."""
    require(PACKAGE, "deepspeed.runtime.engine.MoE swapped during initialize")
    import deepspeed.runtime.engine as ds_engine
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for mod in model.modules():
        if isinstance(mod, MoELayer):
            mod.num_experts = mod.config.num_moe_experts
    original = ds_engine.MoE
    ds_engine.MoE = (original, MoELayer)
    try:
        yield
    finally:
        ds_engine.MoE = original


def replace_fp32_clip(engine, clip: Callable[[object, float], float]) -> None:
    """ZeRO-0 fp32: ``engine.clip_fp32_gradients()`` runs ``clip(named_params, max_norm)`` (the module's
    ``named_parameters()``) and stores the returned norm where ``engine.get_global_grad_norm()`` reads it."""
    require(PACKAGE, "DeepSpeedEngine.clip_fp32_gradients / _global_grad_norm")

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = float(clip(engine.module.named_parameters(), engine.gradient_clipping()))

    engine.clip_fp32_gradients = clip_fp32_gradients
