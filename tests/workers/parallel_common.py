"""Helpers shared by the ``parallel_*`` workers: configs, the reference run, the megatron run with
all shards merged back into the reference layout, and max-abs-diff reporting."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qsparse_dist.config import config_from_dict  # noqa: E402
from qsparse_dist.model.reference import QSparseGPT  # noqa: E402
from qsparse_dist.model.state_dict_adapter import megatron_to_reference, reference_to_megatron  # noqa: E402

VOCAB, SEQ, BATCH = 128, 16, 2
# sparsities with s·d integral for every input dim (64, 32, 96, 48) and block size 8, so the measured
# zero fraction of a top-K input equals the configured one exactly
SPARSITY = {"qkv": 0.5, "out": 0.75, "up": 0.25, "down": 0.625}


def make_cfg(*, linear="qsparse", activation="relu2glu", groups=2, tie=False, moe=None, tp=1, pp=1, ep=1,
             sp=False, layers=2, block_size=None, rescale=False, dtype="fp32"):
    model = {"vocab_size": VOCAB, "hidden_size": 64, "num_layers": layers, "num_attention_heads": 4,
             "num_query_groups": groups, "ffn_hidden_size": 96, "seq_length": SEQ, "tie_embeddings": tie,
             "ffn_activation": activation, "moe": moe}
    sparsity = {"linear": linear, **SPARSITY, "rescale": rescale}
    if block_size:
        sparsity["block_size"] = block_size
    return config_from_dict({"model": model, "sparsity": sparsity, "train": {"dtype": dtype},
                             "parallel": {"tp": tp, "pp": pp, "ep": ep, "sp": sp}})


def reference_model(cfg, seed: int) -> QSparseGPT:
    torch.manual_seed(seed)
    return QSparseGPT(cfg.model, cfg.sparsity)


def batch(seed: int, b: int = BATCH, s: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, s), generator=g), torch.randint(0, VOCAB, (b, s), generator=g)


def megatron_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """megatron's (vocab-parallel) cross entropy on full ``[b, s, V]`` logits at TP = 1 → ``[b, s]``."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous().float(),
                                        labels.transpose(0, 1).contiguous()).transpose(0, 1)


def run_reference(ref: QSparseGPT, batches, ce: str = "torch") -> dict:
    """Logits / per-token loss of every batch and the grads of Σ_batches (Σ_tokens loss + aux).
    ``ce="megatron"`` uses megatron's cross entropy (isolates the model from the loss function)."""
    ref.zero_grad(set_to_none=True)
    ref.set_track_sparsity(True)
    logits, losses, stats, loads = [], [], [], []
    for tokens, labels in batches:
        lg = ref(tokens)
        if ce == "megatron":
            loss = megatron_ce(lg, labels).reshape(-1)
        else:
            loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), labels.reshape(-1), reduction="none")
        total = loss.sum()
        aux = ref.aux_loss()
        if aux is not None:
            total = total + aux
        total.backward()
        logits.append(lg.detach())
        losses.append(loss.detach().view_as(labels))
        stats.append(ref.sparsity_stats())
        if ref.config.moe is not None:
            loads.append([blk.ffn.last_tokens_per_expert.tolist() for blk in ref.layers])
    grads = {k: p.grad.detach().clone() for k, p in ref.named_parameters() if p.grad is not None}
    return {"logits": logits, "loss": losses, "grads": grads, "stats": stats, "expert_load": loads}


def rank_key() -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_expert_model_parallel_rank())


def load_reference_weights(model, ref: QSparseGPT, cfg) -> None:
    tp, pp, ep = rank_key()
    p = cfg.parallel
    sd = reference_to_megatron(ref.state_dict(), cfg, tp_rank=tp, tp_size=p.tp, pp_rank=pp, pp_size=p.pp,
                               ep_rank=ep, ep_size=p.ep)
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected, (missing, unexpected)


def merged_grads(model, cfg) -> dict[str, torch.Tensor]:
    """Every rank's parameter grads merged into the reference layout (on every rank)."""
    mine = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, (rank_key(), mine))
    return megatron_to_reference(dict(shards), cfg)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """``[b, s, V/tp]`` → ``[b, s, V]`` over the TP group."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def max_diff(a, b) -> float:
    """Max abs difference between tensors, lists of tensors or dicts of tensors (same keys, same
    lengths, same shapes).  Nothing to compare is an error, not a difference of 0: an empty dict/list,
    an empty tensor, a length or shape mismatch (no broadcasting) all raise ``ValueError``."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
            raise ValueError(f"max_diff: different keys: {sorted(set(a) ^ set(b))}")
        if not a:
            raise ValueError("max_diff: two empty dicts, nothing compared")
        return max(max_diff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if len(a) != len(b):
            raise ValueError(f"max_diff: lengths differ: {len(a)} vs {len(b)}")
        if not a:
            raise ValueError("max_diff: two empty sequences, nothing compared")
        return max(max_diff(x, y) for x, y in zip(a, b, strict=True))
    if a.shape != b.shape:
        raise ValueError(f"max_diff: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError(f"max_diff: empty tensors {tuple(a.shape)}, nothing compared")
    return float((a.double() - b.double()).abs().max())


def max_abs(a) -> float:
    if isinstance(a, dict):
        return max(max_abs(v) for v in a.values())
    if isinstance(a, (list, tuple)):
        return max(max_abs(v) for v in a)
    return float(a.abs().max())
