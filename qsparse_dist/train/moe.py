"""megatron-core MoE under DeepSpeed ZeRO: expert gradients reduced over the expert-data-parallel group.

megatron marks expert parameters ``allreduce=False``; DeepSpeed reads that same flag as "DeepSpeed-MoE
parameter" and then needs its own expert groups, ``param.group_name`` and an engine that knows it
has MoE layers (measured failures without them: ``'Parameter' object has no attribute
'group_name'``, ``KeyError: 'ep_size_2'`` at ZeRO-0, ``expert_dp_process_group[...]`` is ``None`` at
ZeRO-1/2 — the engine only sets ``has_moe_layers`` for its own ``deepspeed.moe.layer.MoE`` class).

What is correct (``G`` = global batch; each rank's loss is the mean over its own micro-batch):
an expert's weight gradient on one rank already sums the contributions of every token routed to
it from all ranks of its expert-parallel group (the all-to-all backward brings them home); summing
it over the **expert-data-parallel** group (the replicas of the same experts) and dividing by the
**dense** data-parallel size gives the full-batch mean gradient — DeepSpeed's MoE reduction does
exactly this (``_reduce_expert_gradients`` / ZeRO-1/2 expert partitions over
``expert_dp_process_group``).  With expert tensor-parallel size 1 and TP > 1 (sequence parallel),
megatron's expert-DP group also spans the TP peers, whose per-shard gradients this sum completes.

So :func:`prepare_experts`:

* when the expert-DP group **equals** the data-parallel group (``ep = 1``, ``tp = 1``), experts are
  ordinary replicated parameters: the flag is cleared (``qsd_expert`` marks them) and every ZeRO
  stage treats them as dense;
* otherwise registers megatron's expert-parallel / expert-data-parallel groups with DeepSpeed under
  the name ``ep_size_{ep}`` (DeepSpeed parses the size from it), sets ``group_name`` on every expert
  parameter, and :func:`qsparse_dist.compat.deepspeed.engine_counts_megatron_moe` lets
  ``deepspeed.initialize`` recognise megatron's ``MoELayer`` as an MoE layer (a scoped swap of the
  class DeepSpeed's engine tests against), so DeepSpeed builds its MoE optimizer groups.  ZeRO-0/1/2 only: ZeRO-3 partitions every
  parameter over the data-parallel group, and DeepSpeed 0.19 supports experts at stage 3 only
  through its own AutoEP layers (refused in :func:`qsparse_dist.config.rules.check_moe_zero`).

Which parameters are experts is decided in one place,
:func:`qsparse_dist.parallel.experts.is_expert_parameter` (by name: megatron's ``allreduce=False`` flag
marks them only at EP > 1).  At EP = 1 with TP > 1 (expert TP is always 1) every
TP rank holds every expert whole and runs it on its own sequence shard; the gradient is summed over the
TP group (a gradient hook in :mod:`qsparse_dist.train.engine`; ``reduce_model_parallel_grads`` under
PP), after which the TP peers hold identical copies — TP *duplicates*, like the router.  megatron's
parallel linears mark every weight ``tensor_model_parallel`` whatever the group size, and every
gradient norm in play (DeepSpeed's ZeRO-1/2 and bf16 norms; ZeRO-0 fp32:
:func:`~qsparse_dist.train.engine.grad_norm_and_clip`) reads that flag as "a TP shard: count it on every
TP rank", which counted the experts ``tp`` times (measured: the norm 1.2e-4 relative too large at
TP=2, so clipping differed from the single-process run).  :func:`prepare_experts` clears the flag there.
"""

from __future__ import annotations

import torch.distributed as dist

from ..config import RunConfig
from ..config.rules import check_moe_zero
from ..parallel.experts import experts_replicated_over_tp, is_expert_parameter

__all__ = ["check_moe_zero", "is_expert_parameter", "expert_parameters", "experts_replicated_over_tp",
           "prepare_experts", "expert_group_name"]


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def expert_parameters(model) -> list:
    return [p for n, p in model.named_parameters() if is_expert_parameter(n)]


def _ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group)


def prepare_experts(model, cfg: RunConfig) -> bool:
    """Mark expert parameters for DeepSpeed (and TP-replicated experts as TP duplicates, module
    docstring); return whether DeepSpeed's MoE path is needed."""
    from megatron.core import parallel_state as ps

    if experts_replicated_over_tp():
        for p in expert_parameters(model):
            p.tensor_model_parallel = False  # a TP duplicate once its gradient is TP-summed (docstring)
    experts = [p for p in expert_parameters(model) if getattr(p, "allreduce", True) is False]
    if not experts:  # EP = 1: megatron leaves experts allreduce=True, DeepSpeed treats them as dense
        return False
    for p in experts:
        p.qsd_expert = True
    if _ranks(ps.get_expert_data_parallel_group()) == _ranks(ps.get_data_parallel_group()):
        for p in experts:
            p.allreduce = True  # a replicated parameter like any other (see module docstring)
        return False
    from ..compat.deepspeed import register_expert_groups

    name = expert_group_name(cfg.parallel.ep)
    ep_group, edp_group = ps.get_expert_model_parallel_group(), ps.get_expert_data_parallel_group()
    register_expert_groups(name, ep_group, _ranks(ep_group), edp_group, _ranks(edp_group))
    for p in experts:
        p.group_name = name
    return True

