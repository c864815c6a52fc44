"""The DeepSpeed JSON generated from a :class:`RunConfig` (the ``deepspeed:`` section overrides it).

Batch arithmetic (``dp`` = data-parallel size = world / (tp · pp)):
``global = data.global_batch_size or micro · dp`` and ``accum = global / (micro · dp)``.
Without pipeline parallelism DeepSpeed runs the accumulation (``gradient_accumulation_steps =
accum``).  With PP > 1 megatron's 1F1B schedule runs the ``accum`` micro-batches inside one
DeepSpeed step, so DeepSpeed sees ``gradient_accumulation_steps = 1`` and a micro-batch of
``micro · accum`` samples (its batch bookkeeping stays consistent; it never splits the batch).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import ConfigError, RunConfig

NO_CLIP = 1e30

__all__ = ["NO_CLIP", "BatchPlan", "batch_plan", "build_ds_config", "deep_merge"]


@dataclass(frozen=True)
class BatchPlan:
    dp: int
    micro: int
    global_batch: int
    accum: int


def batch_plan(cfg: RunConfig, world_size: int) -> BatchPlan:
    p = cfg.parallel
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"parallel.tp={p.tp} × parallel.pp={p.pp} does not divide the world size {world_size}")
    dp = world_size // (p.tp * p.pp)
    micro = cfg.data.micro_batch_size
    g = cfg.data.global_batch_size or micro * dp
    if g % (micro * dp):
        raise ConfigError(
            f"data.global_batch_size={g} is not a multiple of data.micro_batch_size={micro} × "
            f"data-parallel size {dp} (world {world_size} / tp {p.tp} / pp {p.pp})"
        )
    accum = g // (micro * dp)
    if p.num_microbatches is not None and p.num_microbatches != accum:
        raise ConfigError(
            f"parallel.num_microbatches={p.num_microbatches} disagrees with global / (micro × dp) = "
            f"{g} / ({micro} × {dp}) = {accum}; leave it unset or change data.global_batch_size"
        )
    return BatchPlan(dp=dp, micro=micro, global_batch=g, accum=accum)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_ds_config(cfg: RunConfig, plan: BatchPlan) -> dict:
    o, z = cfg.optimizer, cfg.parallel.zero_stage
    pipelined = cfg.parallel.pp > 1
    gen = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro * (plan.accum if pipelined else 1),
        "gradient_accumulation_steps": 1 if pipelined else plan.accum,
        # grad_clip = 0: a limit no norm reaches, so DeepSpeed still computes (and reports) the norm
        "gradient_clipping": o.grad_clip if o.grad_clip > 0 else NO_CLIP,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                       "weight_decay": o.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": z, "overlap_comm": torch.cuda.is_available() and z > 0},
        "bf16": {"enabled": cfg.train.dtype == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.train.dtype == "bf16":
        gen["data_types"] = {"grad_accum_dtype": "fp32"}
    ds = deep_merge(gen, cfg.deepspeed or {})
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if ds[key] != gen[key]:
            raise ConfigError(
                f"deepspeed.{key}={ds[key]} disagrees with the batch derived from data.* and parallel.* "
                f"({gen[key]}); set data.micro_batch_size / data.global_batch_size instead"
            )
    if ds.get("zero_optimization", {}).get("stage", z) != z:
        raise ConfigError(f"deepspeed.zero_optimization.stage={ds['zero_optimization']['stage']} disagrees "
                          f"with parallel.zero_stage={z}; set parallel.zero_stage")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError("deepspeed.fp16.enabled: fp16 is not supported; use train.dtype=bf16")
    return ds
