"""2 ranks: megatron MoE GPT (4 experts, top-2, aux loss) at EP=1 and EP=2 (alltoall and allgather
dispatchers) vs the single-device reference.  Rank r trains on its own batch; the reference runs both
batches and sums their gradients, which is what data parallelism (dense grads) plus expert
parallelism (expert grads gathered through the dispatcher) compute."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from parallel_common import (  # noqa: E402
    batch,
    gather_vocab,
    load_reference_weights,
    make_cfg,
    max_abs,
    max_diff,
    merged_grads,
    reference_model,
    run_reference,
)

from tests.dist_utils import write_result  # noqa: E402

MOE = {"num_experts": 4, "router_topk": 2, "aux_loss_coeff": 0.01}
SCENARIOS = {
    "qsparse": dict(linear="qsparse", activation="relu2glu"),
    "bitnet_qsparse_drelu": dict(linear="bitnet_qsparse", activation="drelu"),
    "bitnet_qsparse": dict(linear="bitnet_qsparse", activation="relu2glu"),
}
LAYOUTS = {
    "ep1": dict(ep=1, dispatcher="alltoall"),
    "ep2_alltoall": dict(ep=2, dispatcher="alltoall"),
    "ep2_allgather": dict(ep=2, dispatcher="allgather"),
    "tp2_sp_ep1": dict(tp=2, sp=True, ep=1, dispatcher="alltoall"),
    "tp2_sp_ep2": dict(tp=2, sp=True, ep=2, dispatcher="alltoall"),
}
# which scenarios each layout runs (CI time): every kind at EP=1 / EP=2 alltoall, a subset elsewhere
RUNS = {
    "ep1": tuple(SCENARIOS),
    "ep2_alltoall": tuple(SCENARIOS),
    "ep2_allgather": ("qsparse",),
    "tp2_sp_ep1": ("qsparse",),
    "tp2_sp_ep2": ("qsparse", "bitnet_qsparse", "bitnet_qsparse_drelu"),
}


def data_parallel_grad_sum(model) -> None:
    """What DDP does (as a sum): dense grads over the DP group, expert grads over the expert-DP group."""
    from megatron.core import parallel_state as ps

    for p in model.parameters():
        if p.grad is None:
            continue
        group = ps.get_data_parallel_group() if getattr(p, "allreduce", True) else ps.get_expert_data_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)


def main() -> None:
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from qsparse_dist.model.megatron.gpt import (
        build_megatron_gpt,
        collect_expert_load,
        collect_sparsity_stats,
        lm_forward,
        reduce_model_parallel_grads,
        set_track_sparsity,
    )
    from qsparse_dist.parallel import destroy_parallel, initialize_parallel

    all_batches = [batch(100 + r) for r in range(dist.get_world_size())]
    result: dict = {}
    outs: dict = {}
    refs: dict = {}
    for layout, lkw in LAYOUTS.items():
        moe = {**MOE, "dispatcher": lkw["dispatcher"]}
        par = {k: v for k, v in lkw.items() if k != "dispatcher"}
        initialize_parallel(make_cfg(moe=moe, **par).parallel, seed=1234)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        dp, ndp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        batches = all_batches[:ndp]  # one batch per data-parallel rank (TP ranks share theirs)
        tokens, labels = batches[dp]
        for name in RUNS[layout]:
            cfg = make_cfg(**SCENARIOS[name], moe=moe, **par)
            ref = reference_model(cfg, seed=21)
            if (name, ndp) not in refs:
                refs[(name, ndp)] = run_reference(ref, batches)
            r = refs[(name, ndp)]
            model = build_megatron_gpt(cfg)
            load_reference_weights(model, ref, cfg)
            set_track_sparsity(model, True)
            loss = lm_forward(model, tokens, labels)
            stats = collect_sparsity_stats(model)
            load = collect_expert_load(model)
            loss.sum().backward()
            reduce_model_parallel_grads(model)
            data_parallel_grad_sum(model)
            grads = merged_grads(model, cfg)
            with torch.no_grad():
                logits = gather_vocab(lm_forward(model, tokens))
            outs[(name, layout)] = {"logits": logits, "loss": loss.detach(), "grads": grads}
            row = result.setdefault(name, {})
            row[layout] = {
                "ref_logits": max_diff(logits, r["logits"][dp]),
                "ref_loss": max_diff(loss.detach(), r["loss"][dp]),
                "ref_grads": max_diff(grads, r["grads"]),
                "grad_scale": max_abs(r["grads"]),
                "stats": stats,
                "ref_stats": r["stats"][dp],
                "expert_load": load,
                "ref_expert_load": r["expert_load"][dp],
                "num_local_experts": len(model.decoder.layers[0].mlp.experts.local_experts),
            }
            if layout.startswith("ep2"):
                base = outs[(name, "ep1")]
                row[f"{layout}_vs_ep1"] = {k: max_diff(outs[(name, layout)][k], base[k]) for k in base}
        destroy_parallel()
    write_result(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
