"""What an MoE expert parameter is, and how its gradient is reduced — the one definition that the model
(:mod:`qsparse_dist.model.megatron.gpt`), the training engine and the checkpoint shards share.

Layout: megatron-core's ``MoELayer.experts`` with expert tensor-parallel size 1 (every expert whole on
its expert-parallel rank).  Both expert modules of our spec — the grouped-GEMM
``QSparseGroupedMLP`` (default) and the per-expert ``QSparseSequentialMLP`` — hold one parameter per
expert and projection, ``….mlp.experts.local_experts.{e}.linear_fc{1,2}.weight``.  Three predicates:

* :func:`is_expert_parameter` — by name, valid at every EP size and pipeline stage (megatron's
  ``allreduce=False`` flag marks experts only at EP > 1);
* :func:`experts_replicated_over_tp` — EP = 1 and TP > 1: every TP rank holds every expert whole and
  runs it on its own sequence shard, so the gradient must be summed over the TP group and then
  counts once in the gradient norm (see :mod:`qsparse_dist.train.moe`);
* :func:`is_ep_sharded_expert` — narrower: an expert that differs between expert-parallel ranks
  (megatron's ``allreduce=False``, or ``qsd_expert`` once :func:`qsparse_dist.train.moe.prepare_experts`
  marked it), saved in the per-EP-rank files ``experts_pp{pp}_ep{ep}.safetensors`` of a checkpoint.

:func:`needs_tp_grad_sum` is the condition under which a gradient is all-reduced (summed) over the TP
group: sequence-parallel parameters (norms, router) and TP-replicated experts.
"""

from __future__ import annotations

__all__ = ["EXPERT_PATH", "is_expert_parameter", "experts_replicated_over_tp", "is_ep_sharded_expert",
           "needs_tp_grad_sum"]

EXPERT_PATH = ".mlp.experts."  # megatron MoELayer.experts, as named_parameters() spells it


def is_expert_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` (a ``model.named_parameters()`` name) is an MoE expert
    weight — the one definition, valid at every EP size and pipeline stage."""
    return EXPERT_PATH in name


def experts_replicated_over_tp() -> bool:
    """EP = 1 and TP > 1 (expert TP = 1): every TP rank holds all experts whole; their gradients must be
    summed over the TP group and then count once in the gradient norm."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_world_size() == 1 and ps.get_tensor_model_parallel_world_size() > 1


def is_ep_sharded_expert(param) -> bool:
    """Whether ``param`` is an expert split across EP ranks (each rank holds other experts), stored in a
    checkpoint's per-EP-rank expert files rather than the dense TP/PP shard."""
    return bool(getattr(param, "qsd_expert", False)) or getattr(param, "allreduce", True) is False


def needs_tp_grad_sum(name: str, param, experts_replicated: bool) -> bool:
    """Whether the gradient of ``param`` (called ``name``) is partial per TP rank and must be summed over
    the TP group: a ``sequence_parallel`` parameter (each TP rank saw a sequence shard), or an expert
    when ``experts_replicated`` (:func:`experts_replicated_over_tp`)."""
    return bool(getattr(param, "sequence_parallel", False)) or (experts_replicated and is_expert_parameter(name))
