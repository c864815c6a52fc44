"""Initialize this rank's megatron-core ``GPTModel`` chunk from an ``import-hf`` directory.

Each rank cuts its own (TP, PP, EP) shard out of the lazy reference-layout state dict with
:func:`qsparse_dist.model.adapters.megatron.reference_to_megatron`, so the same import serves any
parallel layout, and a rank reads only the tensors of its own pipeline stage.  Call it after
``build_megatron_gpt`` and *before* ``deepspeed.initialize`` (ZeRO-3 partitions parameters there).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config.load import ConfigError
from ..config.schema import RunConfig
from .imported import load_imported

__all__ = ["load_imported_into_megatron"]


def load_imported_into_megatron(model, cfg: RunConfig, path: str | Path | None = None) -> dict:
    """Copy the imported weights into ``model`` (this rank's chunk); return a small report
    ``{"path", "tensors", "shard": (tp, pp, ep)}``.  Raises :class:`ConfigError` when the run's model
    section differs from the import or the built model lacks a tensor the import has."""
    from megatron.core import parallel_state as ps

    from ..model.adapters.megatron import reference_to_megatron

    path = path if path is not None else cfg.checkpoint.init_from
    if not path:
        raise ConfigError("checkpoint.init_from is not set")
    _, ref = load_imported(path, cfg.model)
    own = model.state_dict()
    if cfg.model.qkv_bias and not any(k.endswith("linear_qkv.bias") for k in own):
        raise ConfigError(
            "model.qkv_bias=true (Qwen2) but the megatron model was built without QKV biases: "
            "its TransformerConfig needs add_qkv_bias=model.qkv_bias"
        )
    p = cfg.parallel
    tp, pp, ep = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                  ps.get_expert_model_parallel_rank())
    shard = reference_to_megatron(ref, cfg, tp_rank=tp, tp_size=p.tp, pp_rank=pp, pp_size=p.pp,
                                  ep_rank=ep, ep_size=p.ep)
    wrong = [f"{k}: import {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in shard.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ConfigError(f"checkpoint.init_from={str(path)!r}: shard shapes differ from the model: {wrong[:4]}")
    with torch.no_grad():
        shard = {k: v.to(own[k].dtype) if k in own else v for k, v in shard.items()}
    missing, unexpected = model.load_state_dict(shard, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConfigError(f"checkpoint.init_from={str(path)!r}: the model has tensors the import lacks "
                          f"{missing[:4]} / the import has tensors the model lacks {list(unexpected)[:4]}")
    return {"path": str(path), "tensors": len(shard), "shard": (tp, pp, ep)}
