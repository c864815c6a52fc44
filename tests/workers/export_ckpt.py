"""Worker for tests/test_export_checkpoint.py: train tiny runs with a parallel layout (TP=2, ZeRO-3,
PP=2, MoE EP=2), then evaluate the trained megatron-core model on fixed tokens and store its logits,
so the test can compare them with the model exported from the checkpoint.

The evaluated model is a fresh ``build_megatron_gpt`` whose parameters are loaded, by megatron name,
from this rank's own shard files of the checkpoint (no reference-layout mapping involved); TP logits
are gathered over the vocabulary split; the last pipeline stage's ranks hold them.

argv: DATA_DIR OUT_DIR NAME...   (NAME in SCENARIOS)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_utils import write_result  # noqa: E402

from qsparse_dist.config import config_from_dict  # noqa: E402
from qsparse_dist.train.loop import train  # noqa: E402

TINY = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 64, "seq_length": 32},
    "sparsity": {"linear": "qsparse", "qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.5},
    "data": {"micro_batch_size": 2, "global_batch_size": 4},
    "optimizer": {"lr": 3.0e-3, "min_lr": 3.0e-4},
    "train": {"steps": 2, "log_interval": 100, "seed": 7},
    "logging": {"progress_bar": False, "tensorboard": False},
}
SCENARIOS = {
    "tp2_z1": ["parallel.tp=2", "parallel.zero_stage=1", "model.tie_embeddings=true"],
    "dp2_z3_bitnet": ["parallel.zero_stage=3", "sparsity.linear=bitnet_qsparse"],
    "pp2_block": ["parallel.pp=2", "sparsity.linear=block_qsparse",
                 "sparsity.block_size=8"],
    "moe_ep2": ["parallel.ep=2", "parallel.zero_stage=1", "model.moe={num_experts: 4, router_topk: 2}"],
}
TOKENS_SEED = 123


def megatron_logits(cfg, ckpt: Path) -> torch.Tensor | None:
    """Full-vocabulary logits of the checkpoint's megatron model on fixed tokens (last stage only)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from safetensors.torch import load_file

    from qsparse_dist.model.megatron.gpt import build_megatron_gpt, causal_inputs
    from qsparse_dist.parallel import destroy_parallel, initialize_parallel
    from qsparse_dist.train.checkpoint import shard_key

    initialize_parallel(cfg.parallel, cfg.train.seed)
    try:
        tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        ep = ps.get_expert_model_parallel_rank()
        model = build_megatron_gpt(cfg).eval()
        stored = load_file(str(ckpt / "model" / f"tp{tp:02d}_pp{pp:02d}.safetensors"))
        if cfg.model.moe is not None:
            stored.update(load_file(str(ckpt / "model" / f"experts_pp{pp:02d}_ep{ep:02d}.safetensors")))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(stored[shard_key(name, model, ep)])
        g = torch.Generator().manual_seed(TOKENS_SEED)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=g)
        pos, mask = causal_inputs(tokens)
        out = {}

        def step(it, m):
            y = m(tokens, pos, mask)
            out["y"] = y
            return y, lambda t: (t.sum() * 0.0, {})

        with torch.no_grad():
            if cfg.parallel.pp == 1:
                out["y"] = model(tokens, pos, mask)
            else:
                get_forward_backward_func()(
                    forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
                    seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True)
        if not ps.is_pipeline_last_stage():
            return None
        local = out["y"].float()  # [b, s, V/tp]
        parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=-1)
    finally:
        destroy_parallel()


data_dir, out_dir, *names = sys.argv[1:]
result = {}
for name in names:
    import copy

    d = copy.deepcopy(TINY)
    d["data"]["path"] = data_dir
    d["train"]["run_dir"] = str(Path(out_dir) / name)
    summary = train(config_from_dict(d, SCENARIOS[name]))
    from qsparse_dist.config import load_config
    from qsparse_dist.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(Path(d["train"]["run_dir"]) / "checkpoints")
    cfg = load_config(ckpt / "config.yaml")
    logits = megatron_logits(cfg, ckpt)
    if logits is not None and dist.get_rank() == dist.get_world_size() - 1:
        from safetensors.torch import save_file

        save_file({"logits": logits.contiguous()}, str(Path(out_dir) / f"{name}_logits.safetensors"))
    result[name] = {"checkpoint": str(ckpt), "final_loss": summary.get("final_loss")}
    dist.barrier()
write_result(result)
