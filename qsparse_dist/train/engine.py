"""The training runtime: megatron-core GPT inside a DeepSpeed engine (ZeRO 0–3), one optimizer step at a time.

Two step drivers, chosen by ``parallel.pp``:

* **PP = 1** — the DeepSpeed idiom: per micro-batch ``engine(...)`` → ``engine.backward(loss)`` →
  ``engine.step()``; DeepSpeed scales by ``1/accum``, reduces gradients at the accumulation boundary
  (all-reduce, ZeRO-1/2 reduce-scatter, ZeRO-3 partitioned) and steps the optimizer.  Sequence-parallel
  parameters (norm weights, router) get a tensor hook that all-reduces their gradient over the TP group
  as autograd produces it — before any ZeRO hook consumes it — which is what megatron's
  ``finalize_model_grads`` would do.
* **PP > 1** — megatron's 1F1B schedule (:func:`qsparse_dist.model.megatron.gpt.forward_backward`) runs
  all micro-batches' forward/backward and the inter-stage p2p on ``engine.module``; DeepSpeed runs with
  ``managed_gradient_accumulation=false``, so ``engine.step()`` is the boundary that all-reduces the
  accumulated gradients over the data-parallel group, clips and updates.  Supported with ZeRO-0/1
  (gradients stay whole in ``param.grad`` until the step); ZeRO-2/3 are refused (:func:`qsparse_dist.config.rules.check_pipeline`).

Loss = mean token cross-entropy of the global batch (every micro-batch has the same token count, so
averaging micro-batch means over accumulation rounds and data-parallel ranks gives it exactly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..config.rules import check_dtype, check_launch, check_pipeline
from ..parallel.experts import experts_replicated_over_tp, is_expert_parameter, needs_tp_grad_sum
from .ds_config import BatchPlan, build_ds_config
from .moe import prepare_experts
from .schedules import lr_at, weight_decay_factor_at

__all__ = ["check_dtype", "check_pipeline", "preflight_parallel", "init_distributed", "Runtime", "build_runtime",
           "param_groups"]


def preflight_parallel(cfg: RunConfig) -> None:
    """Every parallel-layout refusal, before any process group exists."""
    from ..compat import check_supported

    check_supported()  # megatron-core / DeepSpeed at the releases qsparse_dist.compat was written for
    check_launch(cfg)  # pipeline × ZeRO, dtype × ZeRO, MoE × ZeRO-3, megatron's needs (config.rules)


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Join (or create, for a plain single process) the process group; return ``(rank, world)``.
    ``timeout_s`` (``parallel.dist_timeout_s``): collective timeout of the default group."""
    import datetime

    import deepspeed

    if "RANK" not in os.environ:  # a plain `qsparse-dist train` without a launcher: a world of one
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1")})
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if not torch.cuda.is_available():
        from ..compat.deepspeed import skip_shm_op_build

        skip_shm_op_build()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", **kw)
    return dist.get_rank(), dist.get_world_size()


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for matrices, none for 1-D parameters (norm weights, biases).
    ``qsd_wd`` keeps each group's base weight decay for the schedule's multiplier."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "qsd_wd": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "qsd_wd": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def _register_sequence_parallel_grad_hooks(model) -> int:
    """All-reduce (sum) the gradient of every ``sequence_parallel`` parameter over the TP group as it is
    produced (PP = 1 path; see module docstring) — and, at EP = 1, of every MoE expert parameter: with
    expert TP = 1 each TP rank holds all experts and runs them on its own sequence shard, as
    :func:`~qsparse_dist.model.megatron.gpt.reduce_model_parallel_grads` does on the PP > 1 path."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        return 0
    group = ps.get_tensor_model_parallel_group()
    n = 0

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    experts_too = experts_replicated_over_tp()
    for name, p in model.named_parameters():
        if p.requires_grad and needs_tp_grad_sum(name, p, experts_too):
            p.register_hook(hook)
            n += 1
    return n


def grad_norm_and_clip(named_params, max_norm: float) -> torch.Tensor:
    """Global L2 gradient norm with megatron's counting, then clip in place (ZeRO-0 fp32 path).
    ``named_params``: ``model.named_parameters()`` (the name decides :func:`~qsparse_dist.parallel.experts.is_expert_parameter`).

    ``‖g‖² = Σ_{MP group} Σ_dense g²  +  Σ_{expert-TP×EP×PP group} Σ_expert g²``, where a dense
    gradient counts on TP rank 0 unless the parameter is TP-sharded (``tensor_model_parallel``) and an
    expert gradient counts on every rank of its group (expert TP = 1: experts are never TP-split).
    DeepSpeed's own ``clip_grad_norm_`` instead *averages* per-rank norms over the data-parallel group
    "due to MoE params", which is not the norm of the full gradient when expert-parallel ranks hold
    different experts, and it does not return the value to the engine.
    """
    from megatron.core import parallel_state as ps

    named = [(n, p) for n, p in named_params if p.grad is not None]
    dev = named[0][1].grad.device if named else torch.device("cpu")
    dense_sq = torch.zeros((), dtype=torch.float64, device=dev)
    expert_sq = torch.zeros((), dtype=torch.float64, device=dev)
    tp_rank = ps.get_tensor_model_parallel_rank()
    has_experts = False
    for name, p in named:
        sq = p.grad.detach().double().pow(2).sum()
        if is_expert_parameter(name):
            expert_sq += sq
            has_experts = True
        elif tp_rank == 0 or getattr(p, "tensor_model_parallel", False):
            dense_sq += sq
    if dist.get_world_size(ps.get_model_parallel_group()) > 1:
        dist.all_reduce(dense_sq, group=ps.get_model_parallel_group())
    if has_experts and dist.get_world_size(ps.get_expert_tensor_model_pipeline_parallel_group()) > 1:
        dist.all_reduce(expert_sq, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    norm = (dense_sq + expert_sq).sqrt()
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    if coef < 1.0:
        for _, p in named:
            p.grad.mul_(coef)
    return norm.float()


def reset_aux_loss_scale() -> None:
    """Forget megatron's process-global MoE aux-loss scale (``MoEAuxLossAutoScaler.main_loss_backward_scale``,
    a tensor later scales are ``copy_``-ed into): each run starts as in a fresh process, whatever shape
    or device an earlier run in this process (another layout, a test) left there."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _recording_mean(store: list):
    """Loss function for megatron's schedule that also records each micro-batch's mean loss.
    (The schedule divides the returned loss by the number of micro-batches *in place*, so a detached
    alias of it would report ``loss / n``; the recorded value is a copy.)"""

    def loss_fn(per_token: torch.Tensor) -> torch.Tensor:
        loss = per_token.float().mean()
        store.append(loss.detach().clone().double())
        return loss

    return loss_fn


@dataclass
class StepResult:
    loss: float          # global-batch mean LM loss (identical on every rank)
    grad_norm: float | None
    lr: float
    weight_decay_factor: float


@dataclass
class Runtime:
    cfg: RunConfig
    plan: BatchPlan
    engine: object
    ds_config: dict
    ds_moe: bool
    rank: int
    world: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    expert_dp_rank: int
    is_first_stage: bool
    is_last_stage: bool
    extra: dict = field(default_factory=dict)

    @property
    def module(self):
        return self.engine.module

    @property
    def pipelined(self) -> bool:
        return self.cfg.parallel.pp > 1

    # ---- helpers -------------------------------------------------------------------------------
    def _set_schedule(self, step: int) -> tuple[float, float]:
        lr, wdf = lr_at(self.cfg, step), weight_decay_factor_at(self.cfg, step)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
            g["weight_decay"] = g.get("qsd_wd", g.get("weight_decay", 0.0)) * wdf
        return lr, wdf

    def _global_mean(self, local_sum: torch.Tensor, count: int) -> float:
        """Mean over the data-parallel group of per-rank means; under PP the value lives on the last
        stage and is broadcast over the pipeline group so every rank returns it."""
        from megatron.core import parallel_state as ps

        dev = self.engine.device  # collectives need device tensors under NCCL
        t = (local_sum.detach().double().to(dev) / max(count, 1)).reshape(1)
        if not self.is_last_stage:
            t = torch.zeros(1, dtype=torch.float64, device=dev)
        if ps.get_data_parallel_world_size() > 1 and self.is_last_stage:
            dist.all_reduce(t, group=ps.get_data_parallel_group())
            t /= ps.get_data_parallel_world_size()
        if self.pipelined:
            dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
        return float(t)

    def _to_device(self, batch):
        """A token batch (or an SFT row dict of tensors) on the engine's device."""
        if isinstance(batch, dict):
            return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}
        return batch.to(self.engine.device, non_blocking=True)

    @staticmethod
    def split(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, S+1]`` token windows → inputs ``[b, S]`` and next-token labels ``[b, S]``."""
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    # ---- one optimizer step --------------------------------------------------------------------
    def train_step(self, step: int, micro_batches: list[torch.Tensor]) -> StepResult:
        """Forward/backward over this rank's ``accum`` micro-batches and one optimizer update."""
        if len(micro_batches) != self.plan.accum:
            raise ValueError(f"expected {self.plan.accum} micro-batches, got {len(micro_batches)}")
        micro_batches = [self._to_device(b) for b in micro_batches]
        lr, wdf = self._set_schedule(step)
        self.engine.train()
        if self.pipelined:
            from ..model.megatron.gpt import forward_backward, reduce_model_parallel_grads

            losses: list[torch.Tensor] = []
            forward_backward(self.module, [self.split(b) for b in micro_batches],
                             num_microbatches=self.plan.accum, seq_length=self.cfg.model.seq_length,
                             micro_batch_size=self.plan.micro, loss_fn=_recording_mean(losses))
            reduce_model_parallel_grads(self.module)
            if hasattr(self.engine.optimizer, "update_hp_grads"):
                # bf16 + ZeRO-1 (DeepSpeed's BF16_Optimizer) accumulates into fp32 only when told, as
                # DeepSpeed's own pipeline engine does after its backward passes
                self.engine.optimizer.update_hp_grads(clear_lp_grads=True)
            self.engine.step()
            local = torch.stack(losses).sum() if losses else torch.zeros((), device=self.engine.device)
            loss = self._global_mean(local, len(losses))
        else:
            from ..model.megatron.gpt import lm_forward

            self._set_aux_loss_scale(1.0 / self.plan.accum)
            local = torch.zeros((), dtype=torch.float64, device=self.engine.device)
            for b in micro_batches:
                if isinstance(b, dict):  # SFT rows: packed-document mask + prompt-masked loss
                    from ..model.sft_loss import megatron_sft_loss

                    loss_t = megatron_sft_loss(self.engine, b)
                else:
                    tokens, labels = self.split(b)
                    loss_t = lm_forward(self.engine, tokens, labels).float().mean()
                self.engine.backward(loss_t)
                self.engine.step()
                local += loss_t.detach().double()
            loss = self._global_mean(local, len(micro_batches))
        gn = self.engine.get_global_grad_norm()
        if isinstance(gn, torch.Tensor):
            gn = float(gn)
        return StepResult(loss=loss, grad_norm=None if gn is None else float(gn), lr=lr, weight_decay_factor=wdf)

    def _set_aux_loss_scale(self, scale: float) -> None:
        """The multiplier megatron's ``MoEAuxLossAutoScaler`` puts on the aux-loss gradient: the main
        loss's backward scale (DeepSpeed divides each micro-batch loss by ``accum``).  A ``[1]`` tensor,
        the shape megatron's 1F1B schedule uses: the scaler keeps the first tensor it is given for the
        whole process and ``copy_``s later scales into it (:func:`reset_aux_loss_scale`)."""
        if self.cfg.model.moe is None:
            return
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), scale, device=self.engine.device))

    @torch.no_grad()
    def evaluate(self, micro_batches: list[torch.Tensor]) -> float:
        """Mean validation loss over ``micro_batches`` (this rank's shard), averaged over DP."""
        micro_batches = [self._to_device(b) for b in micro_batches]
        self.engine.eval()
        try:
            if self.pipelined:
                from ..model.megatron.gpt import forward_backward

                losses: list[torch.Tensor] = []
                forward_backward(self.module, [self.split(b) for b in micro_batches],
                                 num_microbatches=len(micro_batches), seq_length=self.cfg.model.seq_length,
                                 micro_batch_size=self.plan.micro, forward_only=True,
                                 loss_fn=_recording_mean(losses))
                local = torch.stack(losses).sum() if losses else torch.zeros((), device=self.engine.device)
                return self._global_mean(local, len(losses))
            from ..model.megatron.gpt import lm_forward

            local = torch.zeros((), dtype=torch.float64, device=self.engine.device)
            for b in micro_batches:
                if isinstance(b, dict):  # SFT rows
                    from ..model.sft_loss import megatron_sft_loss

                    local += megatron_sft_loss(self.engine, b).double()
                    continue
                tokens, labels = self.split(b)
                local += lm_forward(self.engine, tokens, labels).float().mean().double()
            return self._global_mean(local, len(micro_batches))
        finally:
            self.engine.train()


def build_runtime(cfg: RunConfig, plan: BatchPlan, init_weights=None) -> Runtime:
    """Process groups → megatron GPT → ``init_weights(model)`` (optional, e.g. imported weights; before
    DeepSpeed so every ZeRO stage starts from them) → ``deepspeed.initialize`` (with the mpu adapter)."""
    import deepspeed
    from megatron.core import parallel_state as ps

    from ..model.megatron.gpt import build_megatron_gpt
    from ..parallel import initialize_parallel
    from ..parallel.mpu import MegatronMPU

    rank, world = init_distributed(cfg.parallel.dist_timeout_s)
    initialize_parallel(cfg.parallel, cfg.train.seed)
    model = build_megatron_gpt(cfg)
    if cfg.model.moe is not None:
        reset_aux_loss_scale()
    if init_weights is not None:
        init_weights(model)
    if cfg.parallel.zero_stage == 3 and cfg.model.tie_embeddings and ps.is_pipeline_last_stage():
        # the output layer reads the embedding's weight: ZeRO-3 must gather it for that module too
        deepspeed.zero.register_external_parameter(model, model.shared_embedding_or_output_weight())
    ds_moe = prepare_experts(model, cfg)
    ds_config = build_ds_config(cfg, plan)
    if cfg.parallel.pp > 1:
        ds_config["managed_gradient_accumulation"] = False
    else:
        _register_sequence_parallel_grad_hooks(model)
    groups = param_groups(model, cfg.optimizer.weight_decay)
    if ds_moe:
        from ..compat.deepspeed import engine_counts_megatron_moe

        with engine_counts_megatron_moe(model):
            engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                              mpu=MegatronMPU())
        if not engine.has_moe_layers:
            raise RuntimeError("DeepSpeed did not register the megatron MoE layers")
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                          mpu=MegatronMPU())
    if cfg.parallel.zero_stage == 0 and cfg.train.dtype == "fp32":
        from ..compat.deepspeed import replace_fp32_clip

        replace_fp32_clip(engine, grad_norm_and_clip)  # exact megatron norm, reported by the engine
    return Runtime(
        cfg=cfg, plan=plan, engine=engine, ds_config=ds_config, ds_moe=ds_moe, rank=rank, world=world,
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        is_first_stage=ps.is_pipeline_first_stage(), is_last_stage=ps.is_pipeline_last_stage(),
    )
