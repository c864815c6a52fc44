"""2 ranks: megatron GPT (4 layers) at PP=1 and PP=2 through megatron's 1F1B schedule (4
microbatches), same reference weights loaded, untied and tied embeddings: per-token losses of every
microbatch and gradients vs the single-device reference and vs each other."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from parallel_common import (  # noqa: E402
    BATCH,
    SEQ,
    batch,
    load_reference_weights,
    make_cfg,
    max_abs,
    max_diff,
    merged_grads,
    reference_model,
)

from tests.dist_utils import write_result  # noqa: E402

NMB = 4
SCENARIOS = {
    "qsparse_untied": dict(linear="qsparse", activation="relu2glu"),
    "bitnet_qsparse_tied": dict(linear="bitnet_qsparse", activation="swiglu", tie=True),
}
LAYOUTS = {"pp1": 1, "pp2": 2}


def reference_run(ref, batches) -> dict:
    """Σ_mb mean(loss_mb) / NMB — what megatron's schedule backpropagates."""
    ref.zero_grad(set_to_none=True)
    losses = []
    for tokens, labels in batches:
        lg = ref(tokens)
        loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), reduction="none").view_as(labels)
        (loss.mean() / len(batches)).backward()
        losses.append(loss.detach())
    return {"loss": losses, "grads": {k: p.grad.clone() for k, p in ref.named_parameters() if p.grad is not None}}


def main() -> None:
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from qsparse_dist.model.megatron.gpt import (
        build_megatron_gpt,
        collect_sparsity_stats,
        forward_backward,
        reduce_model_parallel_grads,
        set_track_sparsity,
    )
    from qsparse_dist.parallel import destroy_parallel, initialize_parallel

    batches = [batch(200 + i) for i in range(NMB)]
    result: dict = {}
    outs: dict = {}
    refs: dict = {}
    for layout, pp in LAYOUTS.items():
        initialize_parallel(make_cfg(pp=pp, layers=4).parallel, seed=1234)
        for name, scn in SCENARIOS.items():
            cfg = make_cfg(**scn, pp=pp, layers=4)
            ref = reference_model(cfg, seed=31)
            if name not in refs:
                refs[name] = reference_run(ref, batches)
            r = refs[name]
            model = build_megatron_gpt(cfg)
            load_reference_weights(model, ref, cfg)
            set_track_sparsity(model, True)
            per_token: list[torch.Tensor] = []

            def loss_fn(t, per_token=per_token):
                per_token.append(t.detach().clone())
                return t.float().mean()

            forward_backward([model], batches, num_microbatches=NMB, seq_length=SEQ, micro_batch_size=BATCH,
                             loss_fn=loss_fn)
            reduce_model_parallel_grads(model)
            grads = merged_grads(model, cfg)
            # the last stage holds the losses; share them so that every rank reports
            holder: list = [None] * dist.get_world_size()
            dist.all_gather_object(holder, per_token if ps.is_pipeline_last_stage() else None)
            losses = next(h for h in holder if h)
            outs[(name, layout)] = {"loss": losses, "grads": grads}
            row = result.setdefault(name, {})
            row[layout] = {
                "ref_loss": max_diff(losses, r["loss"]),
                "ref_grads": max_diff(grads, r["grads"]),
                "grad_scale": max_abs(r["grads"]),
                "stage_layers": [layer.layer_number - 1 for layer in model.decoder.layers],
                "stats_keys": sorted(collect_sparsity_stats(model)),
                "num_microbatches_seen": len(losses),
                "schedule": get_forward_backward_func().__name__,
            }
            if layout != "pp1":
                base = outs[(name, "pp1")]
                row[f"{layout}_vs_pp1"] = {k: max_diff(outs[(name, layout)][k], base[k]) for k in base}
        destroy_parallel()
    write_result(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
