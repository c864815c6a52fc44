"""Typed run configuration (pydantic v2).  Every section forbids unknown keys, so a typo fails with
the field's dotted path before any process group, file or model is created.

Sections: ``model`` (shape, FFN activation, MoE), ``sparsity`` (linear kind and per-projection
sparsity), ``parallel`` (tp/pp/ep/sp, ZeRO stage), ``data``, ``optimizer``, ``schedule``, ``train``,
``checkpoint``, ``logging``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..ops.linear import LinearRecipe
from . import rules

__all__ = [
    "ModelConfig",
    "MoEConfig",
    "SparsityConfig",
    "ParallelConfig",
    "DataConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "RunConfig",
    "PROJECTIONS",
]

PROJECTIONS = ("qkv", "out", "up", "down")
"""Projections whose input Q-Sparse sparsifies: attention QKV, attention output, FFN up/gate
(one fused fc1 input), FFN down (the activation output)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MoEConfig(_Section):
    num_experts: int = Field(ge=2)
    router_topk: int = Field(default=2, ge=1)
    aux_loss_coeff: float = Field(default=1e-2, ge=0)
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    ffn_hidden_size: int | None = Field(default=None, ge=1)
    grouped_gemm: bool = Field(default=True, description="experts through one grouped GEMM per projection "
                               "and, where no token crosses ranks, a dispatcher without host syncs; "
                               "False: megatron's per-expert loop and dispatcher")

    @model_validator(mode="after")
    def _topk_le_experts(self) -> MoEConfig:
        rules.check_moe(self)
        return self


class ModelConfig(_Section):
    vocab_size: int | None = Field(default=None, ge=2, description="None: taken from the tokenizer")
    hidden_size: int = Field(default=256, ge=8)
    num_layers: int = Field(default=4, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    num_query_groups: int | None = Field(default=None, ge=1, description="GQA groups; None = MHA")
    ffn_hidden_size: int | None = Field(default=None, ge=1, description="None: 8/3·hidden rounded to 64")
    seq_length: int = Field(default=256, ge=2)
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    tie_embeddings: bool = False
    qkv_bias: bool = Field(default=False, description="biases on the fused QKV projection (Qwen2)")
    ffn_activation: Literal["relu2glu", "drelu", "swiglu"] = "relu2glu"
    init_std: float = Field(default=0.02, gt=0)
    moe: MoEConfig | None = None

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        rules.check_model_shapes(self)
        return self

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return max(64, int(round(8 * self.hidden_size / 3 / 64)) * 64)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class SparsityConfig(_Section):
    """Per-projection sparsity (fraction of input features zeroed by top-K)."""

    linear: Literal["dense", "qsparse", "block_qsparse", "bitnet", "bitnet_qsparse"] = "qsparse"
    qkv: float = Field(default=0.5, ge=0, lt=1)
    out: float = Field(default=0.5, ge=0, lt=1)
    up: float = Field(default=0.5, ge=0, lt=1)
    down: float = Field(default=0.5, ge=0, lt=1)
    block_size: int | None = Field(default=None, ge=1)
    ste: bool = True
    rescale: bool = False
    sparse_tensor_cores: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="2:4 Block Q-Sparse (block_size=4, 2 of 4 kept) on sparse tensor cores: on = required, "
        "auto = only where measured faster (not on the H200 with torch 2.11), off = dense masked matmul; "
        "see docs/ops.md",
    )
    ramp_steps: int = Field(
        default=0, ge=0,
        description="ramp every projection's sparsity linearly from 0 to its target over the first "
        "ramp_steps optimizer steps (0 = target from the start); see qsparse_dist.train.sparsity_ramp",
    )

    @field_validator("sparse_tensor_cores", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: object) -> object:
        """YAML 1.1 reads a bare ``on`` / ``off`` as a boolean."""
        return ("on" if v else "off") if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _kind(self) -> SparsityConfig:
        rules.check_sparsity(self)
        return self

    def recipe(self, projection: str) -> LinearRecipe:
        """The :class:`LinearRecipe` of one projection (``qkv|out|up|down``)."""
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        return LinearRecipe(
            kind=self.linear,
            sparsity=getattr(self, projection),
            block_size=self.block_size,
            ste=self.ste,
            rescale=self.rescale,
        )


class ParallelConfig(_Section):
    tp: int = Field(default=1, ge=1, description="tensor-parallel size")
    pp: int = Field(default=1, ge=1, description="pipeline-parallel size")
    ep: int = Field(default=1, ge=1, description="expert-parallel size")
    sp: bool = Field(default=False, description="sequence parallelism (needs tp > 1)")
    zero_stage: Literal[0, 1, 2, 3] = 0
    num_microbatches: int | None = Field(default=None, ge=1, description="PP: None = global/micro/dp")
    dist_timeout_s: float | None = Field(
        default=None, gt=0,
        description="timeout of every collective (torch.distributed default group and megatron's groups): "
        "a rank blocked this long on a dead host fails with an error instead of hanging; None = the "
        "libraries' defaults (DeepSpeed: DEEPSPEED_TIMEOUT minutes, 10; megatron groups: 30 min). "
        "See docs/multinode.md",
    )

    @model_validator(mode="after")
    def _sp(self) -> ParallelConfig:
        rules.check_sequence_parallel(self)
        return self


class DataConfig(_Section):
    path: str = Field(default="data/prepared", description="directory written by prepare-data")
    micro_batch_size: int = Field(default=4, ge=1)
    global_batch_size: int | None = Field(default=None, ge=1, description="None: micro × dp")
    num_workers: int = Field(default=0, ge=0)


class OptimizerConfig(_Section):
    lr: float = Field(default=3e-4, gt=0)
    min_lr: float = Field(default=3e-5, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)


class ScheduleConfig(_Section):
    """``cosine``: linear warmup then cosine to ``min_lr``.  ``bitnet_two_stage``: BitNet b1.58's
    recipe — cosine at ``lr`` for the first ``stage_split`` of steps, then a lower peak
    (``lr · stage2_lr_ratio``) with weight decay switched off for the rest."""

    kind: Literal["cosine", "constant", "bitnet_two_stage"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    stage_split: float = Field(default=0.5, gt=0, lt=1)
    stage2_lr_ratio: float = Field(default=0.5, gt=0, le=1)


class TrainConfig(_Section):
    steps: int = Field(default=100, ge=1)
    seed: int = 1234
    dtype: Literal["fp32", "bf16"] = "fp32"
    log_interval: int = Field(default=10, ge=1)
    eval_interval: int = Field(default=0, ge=0, description="0 = no validation")
    eval_iters: int = Field(default=4, ge=1)
    run_dir: str = "runs/default"
    allow_schedule_change: bool = Field(
        default=False,
        description="resume even though train.steps / schedule.* / optimizer.lr / optimizer.min_lr differ from "
        "the checkpoint's and change the learning-rate (or weight-decay) curve of the remaining steps; "
        "without it such a resume is refused naming the fields",
    )


class CheckpointConfig(_Section):
    interval: int = Field(default=0, ge=0, description="0 = only at the end")
    keep_last: int = Field(default=2, ge=1)
    resume: bool = True
    init_from: str | None = Field(
        default=None,
        description="directory written by `qsparse-dist import-hf`: its weights initialize the model "
        "when there is no checkpoint to resume (continue-training / fine-tuning)",
    )
    load: str | None = Field(
        default=None,
        description="resume from this checkpoint (a step_* name under train.run_dir/checkpoints or a path) "
        "instead of the one `latest` names — e.g. the previous one when the newest is corrupt",
    )


class LoggingConfig(_Section):
    level: Literal["warning", "info", "debug"] = Field(
        default="warning",
        description="console output: 'warning' = one line per event from rank 0, library notices hidden; "
        "'info' (or `--verbose`) = every rank's library warnings and DeepSpeed's INFO lines; 'debug' = DEBUG too",
    )
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: float | None = Field(
        default=None, gt=0,
        description="peak TFLOP/s of one device for MFU; None = datasheet value of a known GPU, else a "
        "measured matmul throughput (see qsparse_dist.train.metrics)",
    )


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    sparsity: SparsityConfig = SparsityConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    deepspeed: dict | None = Field(default=None, description="user DeepSpeed JSON overriding the generated one")

    @model_validator(mode="after")
    def _parallel_fits_model(self) -> RunConfig:
        rules.check_parallel_fits_model(self)  # every cross-field rule lives in config.rules
        return self
