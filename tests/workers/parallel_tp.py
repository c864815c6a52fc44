"""2 ranks: megatron GPT at TP=1, TP=2 and TP=2+SP for every linear kind, each compared with the
single-device reference (same weights through the adapter) and with each other: logits, per-token
loss, gradients (merged back to the reference layout) and measured input sparsity."""

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

SCENARIOS = {
    "dense": dict(linear="dense"),
    "qsparse": dict(linear="qsparse"),
    "block_qsparse": dict(linear="block_qsparse", block_size=8),
    "bitnet": dict(linear="bitnet"),
    "bitnet_qsparse": dict(linear="bitnet_qsparse"),
    "bitnet_qsparse_nm": dict(linear="bitnet_qsparse", block_size=8, activation="swiglu"),
    "qsparse_drelu": dict(linear="qsparse", activation="drelu"),
    "qsparse_swiglu": dict(linear="qsparse", activation="swiglu"),
    "qsparse_tied_mha": dict(linear="qsparse", activation="swiglu", tie=True, groups=4),
    "qsparse_rescale": dict(linear="qsparse", rescale=True),
}
LAYOUTS = {"tp1": dict(tp=1), "tp2": dict(tp=2), "tp2_sp": dict(tp=2, sp=True)}
SP_SCENARIOS = ("qsparse", "block_qsparse", "bitnet_qsparse", "qsparse_tied_mha")  # TP=2+SP: a subset (CI time)


def run_megatron(cfg, ref, tokens, labels) -> dict:
    from qsparse_dist.layers.parallel_linear import QSparseRowParallelLinear
    from qsparse_dist.model.megatron.gpt import (
        build_megatron_gpt,
        collect_sparsity_stats,
        lm_forward,
        reduce_model_parallel_grads,
        set_track_sparsity,
    )

    model = build_megatron_gpt(cfg)
    load_reference_weights(model, ref, cfg)
    set_track_sparsity(model, True)
    loss = lm_forward(model, tokens, labels)
    row_local = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QSparseRowParallelLinear):
            z, n = mod.sparsity_counts()
            row_local[name] = float(z) / n
    stats = collect_sparsity_stats(model)
    loss.sum().backward()
    reduce_model_parallel_grads(model)
    grads = merged_grads(model, cfg)
    with torch.no_grad():
        logits = gather_vocab(lm_forward(model, tokens))
    return {"logits": logits, "loss": loss.detach(), "grads": grads, "stats": stats, "row_local": row_local}


def main() -> None:
    dist.init_process_group("gloo")
    from qsparse_dist.parallel import destroy_parallel, initialize_parallel

    names = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else list(SCENARIOS)
    tokens, labels = batch(7)
    refs, outs = {}, {}
    result: dict = {}
    for layout, lkw in LAYOUTS.items():
        initialize_parallel(make_cfg(**lkw).parallel, seed=1234)
        for name in names:
            if layout == "tp2_sp" and name not in SP_SCENARIOS:
                continue
            cfg = make_cfg(**SCENARIOS[name], **lkw)
            ref = reference_model(cfg, seed=11)
            if name not in refs:
                refs[name] = run_reference(ref, [(tokens, labels)])
            r = refs[name]
            out = run_megatron(cfg, ref, tokens, labels)
            outs[(name, layout)] = out
            row = result.setdefault(name, {})
            row[layout] = {
                "ref_logits": max_diff(out["logits"], r["logits"][0]),
                "ref_loss": max_diff(out["loss"], r["loss"][0]),
                "ref_grads": max_diff(out["grads"], r["grads"]),
                "grad_scale": max_abs(r["grads"]),
                "stats": out["stats"],
                "ref_stats": r["stats"][0],
                "row_local": out["row_local"],
            }
            if layout == "tp1":  # the model alone, without the cross-entropy implementation difference
                r_mce = run_reference(ref, [(tokens, labels)], ce="megatron")
                row[layout]["ref_loss_megatron_ce"] = max_diff(out["loss"], r_mce["loss"][0])
                row[layout]["ref_grads_megatron_ce"] = max_diff(out["grads"], r_mce["grads"])
            else:
                base = outs[(name, "tp1")]
                row[f"{layout}_vs_tp1"] = {
                    "logits": max_diff(out["logits"], base["logits"]),
                    "loss": max_diff(out["loss"], base["loss"]),
                    "grads": max_diff(out["grads"], base["grads"]),
                }
        destroy_parallel()
    write_result(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
