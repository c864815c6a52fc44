"""Every cross-field rule of a run config, one function per concern (like megatron-core's
``TransformerConfig.__post_init__``, but split by concern and callable at the moment each rule can be
decided).

Three moments, three entry points:

* **schema** (``RunConfig`` validation, no files, no world size): the section validators of
  :mod:`.schema` call :func:`check_moe`, :func:`check_model_shapes`, :func:`check_sparsity`,
  :func:`check_sequence_parallel`, and ``RunConfig`` calls :func:`check_parallel_fits_model`; they
  raise ``ValueError`` (pydantic reports it under the section's dotted path).
* **launch** (:func:`check_launch`, from ``qsparse_dist.train.engine.preflight_parallel``, before any
  process group exists): pipeline × ZeRO × tied embeddings, dtype × ZeRO, MoE × ZeRO-3 × ep/tp,
  what megatron-core needs (vocab × tp, MoE × tp × sp); plus the data/checkpoint rules the training
  preflight calls with what it read (:func:`check_sft_layout`, :func:`check_vocab`,
  :func:`check_eval_split`, :func:`check_checkpoint_options`) and the ``deepspeed:`` section against
  the generated one (:func:`check_deepspeed_section`).  They raise :class:`ConfigError`.
* **world** (needs the world size): :func:`check_world` (layout vs ranks), :func:`check_batch`
  (batch arithmetic), :func:`check_resume_layout` (a checkpoint's layout vs this run's).

The messages are part of the interface (tests assert them): each names the fields and what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .schema import ModelConfig, MoEConfig, ParallelConfig, RunConfig, SparsityConfig

__all__ = [
    "check_moe", "check_model_shapes", "check_sparsity", "check_sequence_parallel", "check_parallel_fits_model",
    "check_launch", "check_pipeline", "check_dtype", "check_moe_zero", "check_megatron",
    "check_sft_layout", "check_vocab", "check_eval_split", "check_checkpoint_options", "check_deepspeed_section",
    "check_world", "check_batch", "check_resume_layout",
]


# ------------------------------------------------------------------------------------------------
# schema time (ValueError; called from the pydantic validators of config.schema)
# ------------------------------------------------------------------------------------------------

def check_moe(moe: MoEConfig) -> None:
    """``router_topk ≤ num_experts``."""
    if moe.router_topk > moe.num_experts:
        raise ValueError(f"router_topk={moe.router_topk} exceeds num_experts={moe.num_experts}")


def check_model_shapes(m: ModelConfig) -> None:
    """Heads divide the hidden size; query groups divide the heads (GQA)."""
    if m.hidden_size % m.num_attention_heads:
        raise ValueError(
            f"hidden_size={m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}"
        )
    if m.num_query_groups is not None and m.num_attention_heads % m.num_query_groups:
        raise ValueError(
            f"num_attention_heads={m.num_attention_heads} is not divisible by "
            f"num_query_groups={m.num_query_groups}"
        )


def check_sparsity(s: SparsityConfig) -> None:
    """``block_size`` is required by ``block_qsparse`` and valid only with the block kinds."""
    from ..ops.linear import LINEAR_KINDS

    assert s.linear in LINEAR_KINDS
    if s.linear == "block_qsparse" and s.block_size is None:
        raise ValueError("block_size is required when linear='block_qsparse'")
    if s.block_size is not None and s.linear not in ("block_qsparse", "bitnet_qsparse"):
        raise ValueError(
            f"block_size is only valid with linear='block_qsparse' or 'bitnet_qsparse', not {s.linear!r}"
        )
    if s.sparse_tensor_cores == "on":
        _check_sparse24_on(s)


def _check_sparse24_on(s: SparsityConfig) -> None:
    """``sparse_tensor_cores='on'`` needs 2:4 Block Q-Sparse: block_qsparse, block_size 4, every
    projection with top-K keeping 2 of 4, the STE and no re-scale."""
    from ..ops.sparsify import kept_count

    why = "sparsity.sparse_tensor_cores='on' needs 2:4 Block Q-Sparse"
    if s.linear != "block_qsparse":
        raise ValueError(f"{why}: sparsity.linear must be 'block_qsparse', got {s.linear!r}")
    if s.block_size != 4:
        raise ValueError(f"{why}: sparsity.block_size must be 4, got {s.block_size!r}")
    for p in ("qkv", "out", "up", "down"):
        v = getattr(s, p)
        if v > 0 and kept_count(4, v) != 2:
            raise ValueError(f"{why}: sparsity.{p}={v} keeps {kept_count(4, v)} of 4 (use 0.5, or 0 for dense)")
    if not s.ste:
        raise ValueError(f"{why}: sparsity.ste must be true (the sparse path's backward is the STE)")
    if s.rescale:
        raise ValueError(f"{why}: sparsity.rescale must be false")


def check_sequence_parallel(p: ParallelConfig) -> None:
    """Sequence parallelism splits activations over the TP group, so it needs one."""
    if p.sp and p.tp == 1:
        raise ValueError("sp=true needs tp > 1")


def check_parallel_fits_model(cfg: RunConfig) -> None:
    """The parallel layout divides the model: tp | heads, query groups, FFN; pp | layers; ep needs MoE
    and divides the experts; the sparsity block divides every TP shard; sp needs tp | seq_length."""
    m, p, s = cfg.model, cfg.parallel, cfg.sparsity
    checks = [
        (m.num_attention_heads % p.tp == 0, "parallel.tp", f"num_attention_heads={m.num_attention_heads}"),
        (m.query_groups % p.tp == 0, "parallel.tp", f"num_query_groups={m.query_groups}"),
        (m.ffn_size % p.tp == 0, "parallel.tp", f"ffn_hidden_size={m.ffn_size}"),
        (m.num_layers % p.pp == 0, "parallel.pp", f"num_layers={m.num_layers}"),
    ]
    for ok, field, what in checks:
        if not ok:
            raise ValueError(f"{field}={getattr(p, field.split('.')[1])} does not divide {what}")
    if p.ep > 1 and m.moe is None:
        raise ValueError("parallel.ep > 1 needs model.moe (a mixture-of-experts FFN)")
    if m.moe is not None and m.moe.num_experts % p.ep:
        raise ValueError(f"parallel.ep={p.ep} does not divide model.moe.num_experts={m.moe.num_experts}")
    if s.block_size is not None:
        shards = {
            "hidden_size": m.hidden_size,
            "attention output (hidden_size / tp)": m.hidden_size // p.tp,
            "ffn_hidden_size / tp": m.ffn_size // p.tp,
        }
        for what, dim in shards.items():
            if dim % s.block_size:
                raise ValueError(f"sparsity.block_size={s.block_size} does not divide {what}={dim}")
    if p.sp and m.seq_length % p.tp:
        raise ValueError(f"parallel.sp needs model.seq_length={m.seq_length} divisible by tp={p.tp}")


# ------------------------------------------------------------------------------------------------
# launch time (ConfigError; before any process group exists)
# ------------------------------------------------------------------------------------------------

def check_launch(cfg: RunConfig) -> None:
    """Every parallel-layout refusal that needs no world size (the entry point of the training preflight)."""
    check_pipeline(cfg)
    check_dtype(cfg)
    check_moe_zero(cfg)
    try:
        check_megatron(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_pipeline(cfg: RunConfig) -> None:
    """PP > 1 trains with ZeRO-0/1 only and untied embeddings."""
    p, m = cfg.parallel, cfg.model
    if p.pp == 1:
        return
    if p.zero_stage >= 2:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: megatron's 1F1B schedule runs the "
            "backward of each micro-batch outside DeepSpeed's engine.backward; ZeRO-2 would reduce-scatter "
            "gradients in per-micro-batch hooks and ZeRO-3 gather/release parameters per forward across the "
            "interleaved schedule (DeepSpeed's own pipeline engine refuses stage 2/3 too). Use zero_stage 0 "
            "or 1 with pipeline parallelism."
        )
    if m.tie_embeddings:
        raise ConfigError(
            f"model.tie_embeddings=true with parallel.pp={p.pp}: the tied embedding/output weight lives on the "
            "first and the last stage, and DeepSpeed's gradient norm would count it twice (clipping would "
            "differ from the single-process run). Untie the embeddings or use pp=1."
        )


def check_dtype(cfg: RunConfig) -> None:
    """bf16 needs a ZeRO optimizer (fp32 master weights)."""
    if cfg.train.dtype == "bf16" and cfg.parallel.zero_stage == 0:
        raise ConfigError(
            "train.dtype=bf16 with parallel.zero_stage=0: DeepSpeed 0.19 keeps fp32 master weights and fp32 "
            "gradient accumulation for bf16 only in its ZeRO optimizers (stage 0 would update bf16 weights "
            "directly). Use parallel.zero_stage=1 (same memory and communication as stage 0 at DP=1)."
        )


def check_moe_zero(cfg: RunConfig) -> None:
    """Refuse MoE layouts DeepSpeed cannot train correctly: ZeRO-3 with experts that differ between ranks
    (see :mod:`qsparse_dist.train.moe`)."""
    m, p = cfg.model, cfg.parallel
    if m.moe is None:
        return
    if p.zero_stage == 3 and (p.ep > 1 or p.tp > 1):
        raise ConfigError(
            f"parallel.zero_stage=3 with an MoE model and parallel.ep={p.ep}, parallel.tp={p.tp}: ZeRO-3 "
            "partitions every parameter over the data-parallel group, but expert weights differ between "
            "expert-parallel ranks (and are reduced over the expert-data-parallel group); DeepSpeed 0.19 "
            "handles experts at stage 3 only for its own AutoEP layers. Use zero_stage 0, 1 or 2 (ZeRO-3 "
            "works for MoE with ep=1 and tp=1, where experts are plain replicated parameters)."
        )


def check_megatron(cfg: RunConfig) -> None:
    """What megatron-core needs beyond the schema: a vocabulary TP divides (vocab-parallel embedding and
    output), and sequence parallelism for an MoE model under TP.  ``ValueError`` naming the setting."""
    m, p = cfg.model, cfg.parallel
    if m.vocab_size is None:
        raise ValueError("model.vocab_size must be set (prepare-data writes it from the tokenizer)")
    if m.vocab_size % p.tp:
        raise ValueError(
            f"parallel.tp={p.tp} does not divide model.vocab_size={m.vocab_size} (vocab-parallel embedding "
            f"and output layer)"
        )
    if m.moe is not None and p.tp > 1 and not p.sp:
        raise ValueError("parallel.sp must be true for an MoE model with parallel.tp > 1 (megatron-core)")


def check_sft_layout(cfg: RunConfig, sft: bool) -> None:
    """SFT rows (packed, with a block-diagonal mask) train without pipeline parallelism."""
    if sft and cfg.parallel.pp > 1:
        raise ConfigError("SFT data (data.path holds sft.json) needs parallel.pp=1")


def check_vocab(cfg: RunConfig, tokenizer_vocab: int) -> None:
    """An explicit ``model.vocab_size`` holds every token id of the data's tokenizer."""
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer_vocab} (from {cfg.data.path}/meta.json); leave it unset")


def check_eval_split(cfg: RunConfig, splits) -> None:
    """Validation (``train.eval_interval > 0``) needs a ``valid`` split in the data."""
    if cfg.train.eval_interval and "valid" not in splits:
        raise ConfigError(f"train.eval_interval={cfg.train.eval_interval} needs a 'valid' split in "
                          f"data.path={cfg.data.path} (prepare-data --valid-fraction > 0) or set it to 0")


def check_checkpoint_options(cfg: RunConfig, has_checkpoints: bool) -> None:
    """``checkpoint.resume=false`` needs a fresh run directory; ``checkpoint.load`` needs resume."""
    if not cfg.checkpoint.resume and has_checkpoints:
        raise ConfigError(f"checkpoint.resume=false but train.run_dir={cfg.train.run_dir} already holds "
                          "checkpoints; choose a new run_dir or set checkpoint.resume=true")
    if cfg.checkpoint.load and not cfg.checkpoint.resume:
        raise ConfigError("checkpoint.load is set but checkpoint.resume=false")


def check_deepspeed_section(ds: dict, gen: dict, cfg: RunConfig) -> None:
    """The merged DeepSpeed JSON ``ds`` (generated ``gen`` + the user's ``deepspeed:`` section) agrees with
    the fields that own each setting: batch (data.*, parallel.*), ZeRO stage, dtype, clipping,
    schedule."""
    o, z = cfg.optimizer, cfg.parallel.zero_stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if ds[key] != gen[key]:
            raise ConfigError(
                f"deepspeed.{key}={ds[key]} disagrees with the batch derived from data.* and parallel.* "
                f"({gen[key]}); set data.micro_batch_size / data.global_batch_size instead"
            )
    if ds["zero_optimization"].get("stage", z) != z:
        raise ConfigError(f"deepspeed.zero_optimization.stage={ds['zero_optimization']['stage']} disagrees "
                          f"with parallel.zero_stage={z}; set parallel.zero_stage")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError("deepspeed.fp16.enabled: fp16 is not supported; use train.dtype=bf16")
    if bool(ds["bf16"].get("enabled")) != (cfg.train.dtype == "bf16"):
        raise ConfigError(f"deepspeed.bf16.enabled={ds['bf16'].get('enabled')} disagrees with "
                          f"train.dtype={cfg.train.dtype}; set train.dtype")
    if ds["gradient_clipping"] != gen["gradient_clipping"]:
        raise ConfigError(f"deepspeed.gradient_clipping={ds['gradient_clipping']} disagrees with "
                          f"optimizer.grad_clip={o.grad_clip}; set optimizer.grad_clip (0 = no clipping)")
    if "scheduler" in ds:
        raise ConfigError("deepspeed.scheduler: the learning rate follows schedule.* (set every step, stateless "
                          "on resume); remove deepspeed.scheduler and use schedule.kind / schedule.warmup_steps")


# ------------------------------------------------------------------------------------------------
# world time (needs the world size)
# ------------------------------------------------------------------------------------------------

def check_world(p: ParallelConfig, world_size: int) -> None:
    """``ValueError`` naming the field when ``tp·pp`` / ``ep`` do not fit ``world_size`` ranks."""
    mp = p.tp * p.pp
    if world_size % mp:
        raise ValueError(
            f"parallel.tp={p.tp} × parallel.pp={p.pp} = {mp} does not divide the world size {world_size}"
        )
    dp = world_size // mp
    # Expert layout (expert TP = 1): the ep ranks come from the tp·dp ranks of one pipeline stage.
    if (p.tp * dp) % p.ep:
        raise ValueError(
            f"parallel.ep={p.ep} does not divide tp × data-parallel = {p.tp * dp} ranks per stage"
        )


def check_batch(cfg: RunConfig, world_size: int) -> None:
    """``dp = world / (tp·pp)`` is whole, ``global = data.global_batch_size or micro·dp`` is a multiple of
    ``micro·dp``, and ``parallel.num_microbatches`` (when set) equals ``global / (micro·dp)``."""
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


def check_resume_layout(meta: dict, cfg: RunConfig, world: int, global_batch: int,
                        error: type[Exception] = ConfigError) -> None:
    """Resuming needs the checkpoint's parallel layout and world size (DeepSpeed shards are
    layout-specific), its ``model.*`` and its global batch (the data position); raises ``error``
    (the checkpoint code passes its ``CheckpointError``)."""
    p = meta.get("parallel", {})
    want = {"world_size": world, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep,
            "zero_stage": cfg.parallel.zero_stage}
    diff = {k: (p.get(k), v) for k, v in want.items() if p.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
        raise error(f"cannot resume: the checkpoint was written with another parallel layout ({what}); "
                    "resume with the same parallel.* settings and world size")
    old_model = meta.get("config", {}).get("model")
    if old_model is not None and old_model != cfg.model.model_dump(mode="json"):
        keys = sorted(k for k in old_model if old_model[k] != cfg.model.model_dump(mode="json").get(k))
        raise error(f"cannot resume: model.* differs from the checkpoint ({', '.join('model.' + k for k in keys)})")
    if meta.get("batch", {}).get("global") not in (None, global_batch):
        raise error(
            f"cannot resume: data.global_batch_size {global_batch} differs from the checkpoint's "
            f"{meta['batch']['global']} (the data position would not line up)")
