"""Worker for tests/test_export_checkpoint.py: train tiny runs with a parallel layout (TP=2, ZeRO-3,
PP=2, MoE EP=2) and, right after the last training step, evaluate the *live* model — the DeepSpeed
engine that just trained, still in memory — on fixed tokens and store its logits, so the test can
compare them with the model exported from the checkpoint that same run wrote.

The truth never touches the checkpoint: the run goes through the training loop's own pieces
(``preflight`` → ``build_runtime`` → ``_run``, what ``train()`` does) so the engine is still at hand
when the loop returns; the logits come from ``engine(...)`` (PP = 1; under ZeRO-3 DeepSpeed gathers
the partitioned parameters for the forward) or megatron's forward-only pipeline schedule over
``engine.module`` (PP = 2).  TP logits are gathered over the vocabulary split; every rank that holds
full logits sends them to rank 0, which checks the replicas agree and writes them.

argv: DATA_DIR OUT_DIR NAME...   (NAME in SCENARIOS)
"""

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_utils import write_result  # noqa: E402

from qsparse_dist.config import config_from_dict  # noqa: E402
from qsparse_dist.train.engine import Runtime, build_runtime, init_distributed  # noqa: E402
from qsparse_dist.train.loop import _run, preflight, shutdown  # noqa: E402
from qsparse_dist.train.resume import agree_on_resume  # noqa: E402

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
REPLICA_TOL = 1e-5  # data-parallel replicas of one model on the same tokens (an internal sanity check)


def train_keeping_engine(cfg) -> tuple[Runtime, dict]:
    """What :func:`qsparse_dist.train.loop.train` does for a fresh run, minus the teardown: the
    runtime (DeepSpeed engine over megatron-core) is returned alive after the last step and its
    checkpoint."""
    from qsparse_dist.model.megatron.gpt import collect_sparsity_stats, set_track_sparsity
    from qsparse_dist.train.checkpoint import checkpoint_root
    from qsparse_dist.train.sparsity_ramp import SparsityRamp

    prep = preflight(cfg)
    cfg, plan = prep.cfg, prep.plan
    rank, world = init_distributed(cfg.parallel.dist_timeout_s)
    if rank == 0:
        Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
    if agree_on_resume(cfg, checkpoint_root(cfg), world, plan.global_batch) is not None:
        raise RuntimeError(f"{cfg.train.run_dir}: expected a fresh run directory")
    rt = build_runtime(cfg, plan)
    summary = _run(rt, prep, None, collect_sparsity_stats, set_track_sparsity, SparsityRamp)
    return rt, summary


@torch.no_grad()
def live_logits(rt: Runtime, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary fp32 logits ``[b, s, V]`` of the trained engine on ``tokens`` (last pipeline
    stage; ``None`` elsewhere).  Every rank must call it (ZeRO-3 gathers, MoE all-to-all, PP p2p)."""
    from megatron.core import parallel_state as ps

    from qsparse_dist.model.megatron.gpt import forward_backward, lm_forward, set_track_sparsity

    set_track_sparsity(rt.module, False)
    rt.engine.eval()
    tokens = tokens.to(rt.engine.device)
    if rt.pipelined:
        got: list[torch.Tensor] = []

        def keep_logits(logits: torch.Tensor) -> torch.Tensor:  # the schedule's "loss" of this micro-batch
            got.append(logits.detach().clone())
            return logits.float().sum() * 0.0

        forward_backward(rt.module, [(tokens, None)], num_microbatches=1, seq_length=tokens.shape[1],
                         micro_batch_size=tokens.shape[0], forward_only=True, loss_fn=keep_logits)
        local = got[0] if got else None
    else:
        local = lm_forward(rt.engine, tokens)
    if not ps.is_pipeline_last_stage():
        return None
    local = local.float().contiguous().cpu()  # [b, s, V/tp]
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def on_rank0(logits: torch.Tensor | None) -> tuple[torch.Tensor | None, float | None]:
    """Collect every rank's logits on rank 0; return the first and the max abs difference of the
    others from it (data-parallel / expert-parallel replicas must agree); ``(None, None)`` elsewhere."""
    held = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(logits, held, dst=0)
    if dist.get_rank() != 0:
        return None, None
    held = [t for t in held if t is not None]
    if not held:
        raise RuntimeError("no rank returned logits")
    spread = max((t - held[0]).abs().max().item() for t in held)
    return held[0], spread


data_dir, out_dir, *names = sys.argv[1:]
result = {}
for name in names:
    d = copy.deepcopy(TINY)
    d["data"]["path"] = data_dir
    d["train"]["run_dir"] = str(Path(out_dir) / name)
    rt, summary = train_keeping_engine(config_from_dict(d, SCENARIOS[name]))
    tokens = torch.randint(0, rt.cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(TOKENS_SEED))
    logits, spread = on_rank0(live_logits(rt, tokens))
    shutdown(rt)  # (not on an error: its barrier would wait for the failed peers; torchrun ends them)
    if logits is not None:
        from safetensors.torch import save_file

        if spread > REPLICA_TOL:
            raise RuntimeError(f"{name}: replicas of the trained model disagree by {spread:.3e}")
        save_file({"logits": logits.contiguous()}, str(Path(out_dir) / f"{name}_logits.safetensors"))
    from qsparse_dist.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(Path(d["train"]["run_dir"]) / "checkpoints")
    result[name] = {"checkpoint": str(ckpt), "final_loss": summary.get("final_loss"), "replica_spread": spread}
    dist.barrier()
write_result(result)
