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
from ..config.rules import check_batch, check_deepspeed_section

NO_CLIP = 1e30

__all__ = ["NO_CLIP", "BatchPlan", "batch_plan", "build_ds_config", "deep_merge"]


@dataclass(frozen=True)
class BatchPlan:
    dp: int
    micro: int
    global_batch: int
    accum: int


def batch_plan(cfg: RunConfig, world_size: int) -> BatchPlan:
    """The module docstring's arithmetic, after :func:`qsparse_dist.config.rules.check_batch`."""
    check_batch(cfg, world_size)
    p = cfg.parallel
    dp = world_size // (p.tp * p.pp)
    micro = cfg.data.micro_batch_size
    g = cfg.data.global_batch_size or micro * dp
    return BatchPlan(dp=dp, micro=micro, global_batch=g, accum=g // (micro * dp))


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
    user = cfg.deepspeed or {}
    _check_user_section(user, gen, cfg)
    ds = deep_merge(gen, user)
    check_deepspeed_section(ds, gen, cfg)  # the user's section agrees with the owning fields
    validate_with_deepspeed(ds)
    return ds


# DeepSpeed sections that are mappings (a scalar there fails deep inside DeepSpeed's parser).
_MAPPING_SECTIONS = ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16", "data_types",
                     "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard", "wandb",
                     "csv_monitor", "aio", "compression_training", "checkpoint", "elasticity")


def _check_user_section(user: dict, gen: dict, cfg: RunConfig) -> None:
    for key, value in user.items():
        if (isinstance(gen.get(key), dict) or key in _MAPPING_SECTIONS) and not isinstance(value, dict):
            raise ConfigError(f"deepspeed.{key} must be a mapping, got {type(value).__name__} {value!r}")
    for key in ("optimizer",):
        if isinstance(user.get(key), dict) and not isinstance(user[key].get("params", {}), dict):
            raise ConfigError(f"deepspeed.{key}.params must be a mapping")


# DeepSpeed's pydantic model → its key in the JSON (to name the dotted field of a validation error)
_DS_MODEL_KEYS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
                  "DeepSpeedFP16Config": "fp16", "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing",
                  "DeepSpeedFlopsProfilerConfig": "flops_profiler", "DeepSpeedCommsConfig": "comms_logger",
                  "DeepSpeedMonitorConfig": "monitor", "DeepSpeedZeroOffloadOptimizerConfig":
                  "zero_optimization.offload_optimizer", "DeepSpeedZeroOffloadParamConfig":
                  "zero_optimization.offload_param"}


def validate_with_deepspeed(ds: dict) -> None:
    """Parse ``ds`` with DeepSpeed's own config class (``DeepSpeedConfig``: pydantic models of every
    section plus its sanity checks) before any process group or model exists; raise
    :class:`ConfigError` naming the field.  The batch triple is checked against data.*/parallel.* by
    :func:`build_ds_config`; here it is replaced by a world-of-one triple, because DeepSpeed compares
    it with the world size it finds (one, before ``init_distributed``)."""
    import logging

    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    probe = copy.deepcopy(ds)
    probe["train_batch_size"] = probe["train_micro_batch_size_per_gpu"] * probe["gradient_accumulation_steps"]

    class _OneRank:  # DeepSpeed asks the mpu for the data-parallel size when one is given
        @staticmethod
        def get_data_parallel_world_size() -> int:
            return 1

    log = logging.getLogger("DeepSpeed")
    level = log.level
    log.setLevel(logging.WARNING)  # its INFO "Config mesh_device … world_size" line is not ours to print
    try:
        DeepSpeedConfig(probe, mpu=_OneRank())
    except ValidationError as e:
        key = _DS_MODEL_KEYS.get(e.title, e.title)
        lines = [f"deepspeed.{key}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid deepspeed section:\n  " + "\n  ".join(lines)) from None
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"deepspeed: DeepSpeed rejects this section: {msg}") from None
    finally:
        log.setLevel(level)
