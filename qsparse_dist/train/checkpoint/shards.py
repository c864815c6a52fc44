"""Which tensors go in which file: the model shards of a checkpoint (safetensors).

``model/tp{tp:02d}_pp{pp:02d}.safetensors`` holds the non-expert weights of one (TP, PP) shard (written
by data-parallel rank 0); ``model/experts_pp{pp:02d}_ep{ep:02d}.safetensors`` the weights of the experts
split across EP ranks (:func:`qsparse_dist.parallel.experts.is_ep_sharded_expert`, written by
expert-data-parallel rank 0).  Keys are global (global layer index, global expert index:
:func:`qsparse_dist.model.adapters.megatron.shard_key`); each file's metadata records the layout and
every tensor's TP partitioning.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ...model.adapters.megatron import shard_key
from ...parallel.experts import is_ep_sharded_expert
from .store import CheckpointError

__all__ = ["save_model_shards", "restore_experts", "shard_key"]


def _param_info(p) -> dict:
    return {
        "tensor_model_parallel": bool(getattr(p, "tensor_model_parallel", False)),
        "partition_dim": int(getattr(p, "partition_dim", -1)),
        "partition_stride": int(getattr(p, "partition_stride", 1)),
        "sequence_parallel": bool(getattr(p, "sequence_parallel", False)),
        "expert": is_ep_sharded_expert(p),
    }


@contextlib.contextmanager
def _full_param(p, zero3: bool):
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            yield p.data
    else:
        yield p.data


def save_model_shards(rt, out_dir: Path) -> None:
    """This rank's parameters under global keys: dense ones into ``tp{tp}_pp{pp}`` (data-parallel rank 0
    writes), EP-sharded experts into ``experts_pp{pp}_ep{ep}`` (expert-data-parallel rank 0 writes);
    ZeRO-3 parameters are gathered first."""
    from safetensors.torch import save_file

    zero3 = rt.cfg.parallel.zero_stage == 3
    dense, experts, info = {}, {}, {}
    for name, p in rt.module.named_parameters():
        key = shard_key(name, rt.module, rt.ep_rank)
        with _full_param(p, zero3) as data:
            t = data.detach().to("cpu", copy=True).contiguous()
        (experts if is_ep_sharded_expert(p) else dense)[key] = t
        info[key] = _param_info(p)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = {"tp_rank": rt.tp_rank, "pp_rank": rt.pp_rank, "ep_rank": rt.ep_rank,
              "tp": rt.cfg.parallel.tp, "pp": rt.cfg.parallel.pp, "ep": rt.cfg.parallel.ep}
    if rt.dp_rank == 0 and dense:
        meta = {"qsparse_dist": json.dumps({**layout, "params": {k: info[k] for k in dense}})}
        save_file(dense, str(out_dir / f"tp{rt.tp_rank:02d}_pp{rt.pp_rank:02d}.safetensors"), metadata=meta)
    if rt.expert_dp_rank == 0 and experts:
        meta = {"qsparse_dist": json.dumps({**layout, "params": {k: info[k] for k in experts}})}
        save_file(experts, str(out_dir / f"experts_pp{rt.pp_rank:02d}_ep{rt.ep_rank:02d}.safetensors"),
                  metadata=meta)


def restore_experts(rt, model_dir: Path) -> None:
    """Copy expert weights back from the shard files (DeepSpeed's MoE checkpoint path only knows its
    own MoE layer classes, so megatron's experts are restored from our safetensors)."""
    from safetensors.torch import load_file

    path = model_dir / f"experts_pp{rt.pp_rank:02d}_ep{rt.ep_rank:02d}.safetensors"
    tensors = load_file(str(path))
    for name, p in rt.module.named_parameters():
        if is_ep_sharded_expert(p):
            key = shard_key(name, rt.module, rt.ep_rank)
            if key not in tensors:
                raise CheckpointError(f"{path}: no tensor {key}")
            with torch.no_grad():
                p.data.copy_(tensors[key])
    if hasattr(rt.engine.optimizer, "refresh_fp32_params"):
        rt.engine.optimizer.refresh_fp32_params()
