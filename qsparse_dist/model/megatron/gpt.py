"""The Q-Sparse GPT on megatron-core: ``GPTModel`` + our layer spec (TP, SP, PP, MoE with EP).

Llama-style: RMSNorm, rotate-half RoPE, no biases, optional GQA, tied or untied embeddings, GLU FFN
(relu2glu | drelu | swiglu) or a megatron MoE FFN whose experts use the same sparse linears.  With
all parallel sizes 1 it computes what :class:`qsparse_dist.model.reference.QSparseGPT` computes
(same weights through :mod:`qsparse_dist.model.adapters.megatron`).

Call order in a process::

    torch.distributed.init_process_group(...)
    initialize_parallel(cfg.parallel, cfg.train.seed)        # qsparse_dist.parallel
    model = build_megatron_gpt(cfg)                          # this pipeline stage's chunk
    loss = lm_forward(model, tokens, labels)                 # per-token loss [b, s] (PP = 1)

With PP > 1 run megatron's schedule (``megatron.core.pipeline_parallel.get_forward_backward_func``)
with a forward step that calls :func:`lm_forward`; see :func:`forward_backward`.

Gradients megatron normally reduces in ``finalize_model_grads`` (which needs its DDP wrapper):
:func:`reduce_model_parallel_grads` all-reduces the sequence-parallel norm / router grads (and the
expert grads of an EP = 1 MoE under TP) over the TP group and the tied embedding grads over the
embedding group (PP > 1).  Data-parallel (and
expert-data-parallel) averaging is the training loop's job (DeepSpeed or megatron DDP).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from ...config.rules import check_megatron
from ...config.schema import RunConfig
from ...config.shapes import ffn_width, projection_of_module
from ...parallel.experts import experts_replicated_over_tp, needs_tp_grad_sum

__all__ = [
    "validate_megatron_config",
    "transformer_config_from",
    "build_megatron_gpt",
    "causal_inputs",
    "lm_forward",
    "forward_backward",
    "set_track_sparsity",
    "collect_sparsity_stats",
    "collect_expert_load",
    "reduce_model_parallel_grads",
]


def validate_megatron_config(cfg: RunConfig) -> None:
    """Checks megatron needs beyond the schema's; ``ValueError`` naming the setting (the rule:
    :func:`qsparse_dist.config.rules.check_megatron`)."""
    check_megatron(cfg)


def transformer_config_from(cfg: RunConfig):
    """megatron ``TransformerConfig`` for ``cfg`` (fp32 or bf16 params, dropout 0, fusions off, no
    biases, CPU initialization without CUDA, every init ``N(0, init_std)`` like the reference)."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import init_method_normal

    validate_megatron_config(cfg)
    m, p = cfg.model, cfg.parallel
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    init = init_method_normal(m.init_std)
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,  # unused: QSparseMLP applies model.ffn_activation
        add_bias_linear=False,
        add_qkv_bias=bool(getattr(m, "qkv_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method=init,
        output_layer_init_method=init,
        init_method_std=m.init_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        sequence_parallel=p.sp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=1,
        # fusions off: the unfused paths are the ones that run (and equal the reference) on any device
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
        # gloo has no batched isend/irecv path worth using; plain p2p works on CPU and GPU
        batch_p2p_comm=torch.cuda.is_available(),
    )
    if m.moe is not None:
        kwargs.update(
            num_moe_experts=m.moe.num_experts,
            moe_router_topk=m.moe.router_topk,
            moe_aux_loss_coeff=m.moe.aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            moe_token_dispatcher_type=m.moe.dispatcher,
            moe_ffn_hidden_size=ffn_width(m),
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_router_pre_softmax=False,
        )
    return TransformerConfig(**kwargs)


def _router_load_hook(module, args, output) -> None:
    """Accumulate tokens routed to each expert (local tokens; no host sync)."""
    _, routing_map = output
    counts = routing_map.detach().sum(dim=0).to(torch.float64)
    prev = getattr(module, "qsd_tokens_per_expert", None)
    module.qsd_tokens_per_expert = counts if prev is None else prev + counts


def build_megatron_gpt(cfg: RunConfig, pre_process: bool | None = None, post_process: bool | None = None):
    """This pipeline stage's ``GPTModel`` for ``cfg`` (``initialize_parallel`` must have run).

    ``pre_process`` / ``post_process`` default to whether this rank is the first / last stage.
    Routers of MoE layers get a forward hook counting tokens per expert (:func:`collect_expert_load`).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from .specs import get_qsparse_block_spec

    config = transformer_config_from(cfg)
    m = cfg.model
    if ps.get_tensor_model_parallel_world_size() != cfg.parallel.tp or (
        ps.get_pipeline_model_parallel_world_size() != cfg.parallel.pp
    ):
        raise ValueError(
            f"parallel.tp={cfg.parallel.tp}/parallel.pp={cfg.parallel.pp} differ from the initialized "
            f"groups (tp={ps.get_tensor_model_parallel_world_size()}, "
            f"pp={ps.get_pipeline_model_parallel_world_size()}); call initialize_parallel(cfg.parallel, …)"
        )
    pre = ps.is_pipeline_first_stage() if pre_process is None else pre_process
    post = ps.is_pipeline_last_stage() if post_process is None else post_process
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_qsparse_block_spec(cfg, config, pp_rank=ps.get_pipeline_model_parallel_rank()),
        vocab_size=m.vocab_size,
        max_sequence_length=m.seq_length,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=m.rope_theta,
    )
    model.qsd_config = cfg
    for layer in model.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            router.register_forward_hook(_router_load_hook)
    return model


def causal_inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids [b, s], attention_mask [1, 1, s, s])`` for causal LM (mask True = masked)."""
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    mask = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu(1).view(1, 1, s, s)
    return pos, mask


def lm_forward(model, tokens: torch.Tensor, labels: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss ``[b, s]`` (float32) when ``labels`` are given, else this TP rank's logits
    ``[b, s, V/tp]``.  On a non-first PP stage ``tokens`` only give the shape (the schedule sets the
    input tensor); a non-last stage returns its hidden states.

    ``attention_mask=None`` means causal (the core attention runs SDPA with ``is_causal``, the
    reference's path); pass a boolean ``[b|1, 1, s, s]`` mask (True = masked) for anything else."""
    pos, _ = causal_inputs(tokens)
    return model(tokens, pos, attention_mask, labels=labels)


def forward_backward(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, forward_only: bool = False,
                     loss_fn=None) -> list[torch.Tensor]:
    """One pass of megatron's pipeline schedule (1F1B when PP > 1) over ``(tokens, labels)``
    microbatches.  ``loss_fn(per_token_loss) -> scalar`` defaults to the mean.  Returns the
    per-microbatch loss values on the last stage (an empty list elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    loss_fn = loss_fn or (lambda per_token: per_token.float().mean())
    it = iter(batches)

    def forward_step(data_iterator, chunk):
        tokens, labels = next(data_iterator)
        out = lm_forward(chunk, tokens, labels)

        def reduce(output_tensor):
            loss = loss_fn(output_tensor)
            return loss, {"loss": loss.detach()}

        return out, reduce

    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=it, model=model, num_microbatches=num_microbatches,
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only,
    )
    return [r["loss"] for r in results] if results else []


def _qsparse_linears(model):
    from ...layers.parallel_linear import QSparseLinearMixin

    for name, mod in model.named_modules():
        if isinstance(mod, QSparseLinearMixin):
            yield name, mod


def _key_of(name: str, layer_number_by_prefix: dict[str, int]) -> str:
    prefix = name.split(".self_attention")[0].split(".mlp")[0]
    layer = layer_number_by_prefix[prefix]
    proj = projection_of_module(name, "megatron")
    return f"layers.{layer}.{proj}"


def _layer_numbers(model) -> dict[str, int]:
    """Module-name prefix of each decoder layer → GLOBAL 0-based layer index (PP offsets included)."""
    return {f"decoder.layers.{j}": layer.layer_number - 1 for j, layer in enumerate(model.decoder.layers)}


def set_track_sparsity(model, on: bool = True) -> None:
    """Switch the zero counting of every Q-Sparse linear's prepared input on or off (and reset)."""
    for _, mod in _qsparse_linears(model):
        mod.track_sparsity = on
        mod.reset_sparsity_counts()


def collect_sparsity_stats(model, reset: bool = True) -> dict[str, float]:
    """Zero fraction of each projection's input since the last reset, keyed ``layers.{i}.{proj}``
    with the GLOBAL layer index (each PP stage reports its own layers).

    Dense projections: zero counts summed over the linear's TP group, so a row-parallel
    (feature-sharded) or sequence-parallel input reports the fraction of the full tensor.  MoE
    experts: like the reference, the mean over the experts that ran of each expert's fraction,
    over all experts of the EP group.  A collective: every rank of those groups must call it."""
    from megatron.core import parallel_state as ps

    layers = _layer_numbers(model)
    slots: dict[int, dict] = {}  # group id -> {"group": g, "keys": {key: [numerator, denominator]}}

    def add(group, key: str, num: float, den: float) -> None:
        slot = slots.setdefault(id(group), {"group": group, "keys": {}})
        acc = slot["keys"].setdefault(key, [0.0, 0.0])
        acc[0] += num
        acc[1] += den

    for name, mod in _qsparse_linears(model):
        z, n = mod.sparsity_counts()
        key = _key_of(name, layers)
        if ".mlp.experts." in name:  # (fraction, 1) per expert that ran, pooled over the EP group
            group = ps.get_expert_model_parallel_group()
            add(group, key, float(z) / n if n else 0.0, 1.0 if n else 0.0)
        elif n:
            add(mod.tp_group, key, float(z), float(n))
        if reset:
            mod.reset_sparsity_counts()
    out: dict[str, list[float]] = {}
    for slot in slots.values():
        keys = sorted(slot["keys"])
        t = torch.tensor([slot["keys"][k] for k in keys], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size(slot["group"]) > 1:
            dist.all_reduce(t, group=slot["group"])
        for k, (num, den) in zip(keys, t.tolist()):
            prev = out.setdefault(k, [0.0, 0.0])
            prev[0] += num
            prev[1] += den
    return {k: num / den for k, (num, den) in sorted(out.items()) if den > 0}


def collect_expert_load(model, reset: bool = True) -> dict[str, list[float]]:
    """Tokens routed to each expert per MoE layer since the last reset (this rank's tokens; summed
    over the TP group under sequence parallelism), keyed ``layers.{i}.tokens_per_expert``, plus
    ``layers.{i}.load_imbalance`` = max / mean load (1.0 = perfectly balanced)."""
    from megatron.core import parallel_state as ps

    out: dict[str, list[float]] = {}
    for layer in model.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        counts = getattr(router, "qsd_tokens_per_expert", None) if router is not None else None
        if counts is None:
            continue
        counts = counts.clone()
        if layer.config.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(counts, group=ps.get_tensor_model_parallel_group())
        i = layer.layer_number - 1
        values = counts.tolist()
        out[f"layers.{i}.tokens_per_expert"] = values
        mean = sum(values) / len(values)
        out[f"layers.{i}.load_imbalance"] = [max(values) / mean if mean > 0 else 0.0]
        if reset:
            router.qsd_tokens_per_expert = None
    return out


def reduce_model_parallel_grads(model) -> None:
    """All-reduce the gradients that model parallelism leaves partial (what megatron's
    ``finalize_model_grads`` would, without needing its DDP wrapper):

    * ``sequence_parallel`` params (norms, MoE router) over the TP group: each TP rank saw a
      sequence shard;
    * MoE expert params when TP > 1 and EP = 1 over the TP group: with expert TP = 1 every TP rank
      holds all experts and runs them on its own sequence shard (megatron marks these params
      ``allreduce=True``, so its DDP would only reduce them over the data-parallel group);
    * the tied embedding / output weight over the embedding group when PP > 1.

    Data-parallel and expert-data-parallel (EP > 1) averaging stays with DDP / DeepSpeed."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:
        experts_too = experts_replicated_over_tp()
        grads = [
            p.grad for n, p in model.named_parameters()
            if p.grad is not None and needs_tp_grad_sum(n, p, experts_too)
        ]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
    if ps.get_pipeline_model_parallel_world_size() > 1 and model.share_embeddings_and_output_weights:
        if ps.is_rank_in_embedding_group(ignore_virtual=True):
            w = model.shared_embedding_or_output_weight()
            if w.grad is not None:
                dist.all_reduce(w.grad, group=ps.get_embedding_group())
