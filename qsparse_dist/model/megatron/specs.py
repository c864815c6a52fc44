"""megatron-core layer specs with the Q-Sparse / BitNet linears — swapped by spec, megatron unforked.

Starting from megatron's local spec (``get_gpt_layer_local_spec``) we replace:

    input_layernorm / pre_mlp_layernorm / final norm   → :class:`QSparseRMSNorm`
    self_attention.linear_qkv                           → QSparseColumnParallelLinear(recipe=qkv)
    self_attention.linear_proj                          → QSparseRowParallelLinear(recipe=out)
    self_attention.core_attention                       → :class:`SDPACoreAttention`
    mlp (dense)                                         → :class:`QSparseMLP`(activation)
    mlp.linear_fc1 / linear_fc2                         → Column(recipe=up) / Row(recipe=down)
    mlp (MoE)                                           → :class:`~.experts.QSparseMoELayer` (sync-free local dispatch)
    mlp.experts (MoE)                                   → :class:`~.experts.QSparseGroupedMLP` (grouped GEMM) or,
                                                          ``model.moe.grouped_gemm=false``, :class:`QSparseSequentialMLP`;
                                                          both hold the same QSparseMLP experts (same state dict)

``QSparseRMSNorm`` is the reference RMSNorm (same float32 formula) accepting megatron's constructor
and marking its weight ``sequence_parallel`` under SP (megatron's ``WrappedTorchNorm`` refuses SP);
those gradients must be all-reduced over the TP group
(:func:`qsparse_dist.model.megatron.gpt.reduce_model_parallel_grads`).

``SDPACoreAttention`` is megatron's ``DotProductAttention`` computing with
``torch.nn.functional.scaled_dot_product_attention`` (causal) like the reference, so a TP=1 model's
logits are bit-identical to the reference's (megatron's baddbmm/softmax path differs by ~1e-7).

On CUDA the norms, the GLU and RoPE run fused kernels (:mod:`qsparse_dist.layers.fused`: RMSNorm and
RoPE from liger-kernel, the GLU from :mod:`qsparse_dist.kernels.glu`); RoPE then moves from
megatron's attention into :class:`SDPACoreAttention` (:class:`QSparseSelfAttention` hands it the
angles), which applies it while laying q/k out for SDPA.  CPU runs the eager code above.

``QSparseMLP`` / ``QSparseSequentialMLP``: :mod:`.mlp`; the grouped MoE experts and layer: :mod:`.experts`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from ...config.schema import RunConfig
from ...layers import fused
from ...layers.parallel_linear import QSparseColumnParallelLinear, QSparseRowParallelLinear
from ..blocks import RMSNorm
from .experts import QSparseGroupedMLP, QSparseMoELayer
from .mlp import QSparseMLP, QSparseSequentialMLP

__all__ = [
    "SDPACoreAttention",
    "QSparseSelfAttention",
    "QSparseRMSNorm",
    "QSparseMLP",
    "QSparseSequentialMLP",
    "get_qsparse_layer_spec",
    "get_qsparse_block_spec",
]


class QSparseRMSNorm(RMSNorm):
    """The reference RMSNorm with megatron's norm constructor; sequence-parallel aware."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__(hidden_size, eps)
        if config.params_dtype is not None:
            self.weight.data = self.weight.data.to(config.params_dtype)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.liger_enabled(x):
            return fused.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class QSparseSelfAttention(SelfAttention):
    """megatron ``SelfAttention`` that, where the fused kernels run, hands the RoPE angles to its
    :class:`SDPACoreAttention` instead of rotating q/k itself (one fused pass, float32 math)."""

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        freqs = kwargs.get("rotary_pos_emb")
        if (isinstance(self.core_attention, SDPACoreAttention) and isinstance(freqs, torch.Tensor)
                and not args and kwargs.get("inference_context") is None
                and kwargs.get("inference_params") is None and kwargs.get("packed_seq_params") is None
                and not self.config.no_rope_freq and not (self.checkpoint_core_attention and self.training)
                and fused.liger_enabled(hidden_states)):
            kwargs["rotary_pos_emb"] = None
            self.core_attention.qsd_rope_freqs = freqs
            try:
                return super().forward(hidden_states, attention_mask, **kwargs)
            finally:
                self.core_attention.qsd_rope_freqs = None
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


class SDPACoreAttention(DotProductAttention):
    """Causal scaled-dot-product attention on megatron's ``[s, b, heads, hd]`` layout (GQA groups
    repeated as in the reference).  ``attention_mask=None`` → causal; a boolean mask (True = masked,
    megatron's convention) is honoured as given."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor attention bias")
        rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hd]
        freqs = getattr(self, "qsd_rope_freqs", None)
        if freqs is not None:  # set by QSparseSelfAttention on the fused path
            q, k = fused.rope_bhsd(q, k, freqs)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        p = self.config.attention_dropout if self.training else 0.0
        kwargs = {"is_causal": True} if attention_mask is None else {"attn_mask": ~attention_mask}
        if self.softmax_scale != 1.0 / math.sqrt(q.shape[-1]):  # SDPA's default scale otherwise
            kwargs["scale"] = self.softmax_scale
        if p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, **kwargs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, **kwargs)
        return y.permute(2, 0, 1, 3).reshape(y.shape[2], y.shape[0], -1)


def _linear(cls: type, cfg: RunConfig, projection: str) -> ModuleSpec:
    return ModuleSpec(module=cls, params={"recipe": cfg.sparsity.recipe(projection), "projection": projection,
                                          "sparse_tensor_cores": cfg.sparsity.sparse_tensor_cores})


def get_qsparse_layer_spec(cfg: RunConfig) -> ModuleSpec:
    """The ``TransformerLayer`` spec of one decoder layer for ``cfg`` (dense FFN or MoE)."""
    m = cfg.model
    spec = get_gpt_layer_local_spec(num_experts=m.moe.num_experts if m.moe else None, moe_grouped_gemm=False)
    layer = spec.submodules
    layer.input_layernorm = QSparseRMSNorm
    layer.pre_mlp_layernorm = QSparseRMSNorm
    layer.self_attention.module = QSparseSelfAttention
    attn = layer.self_attention.submodules
    attn.linear_qkv = _linear(QSparseColumnParallelLinear, cfg, "qkv")
    attn.linear_proj = _linear(QSparseRowParallelLinear, cfg, "out")
    attn.core_attention = SDPACoreAttention
    mlp_sub = MLPSubmodules(
        linear_fc1=_linear(QSparseColumnParallelLinear, cfg, "up"),
        linear_fc2=_linear(QSparseRowParallelLinear, cfg, "down"),
    )
    if m.moe is None:
        layer.mlp = ModuleSpec(module=QSparseMLP, submodules=mlp_sub, params={"activation": m.ffn_activation})
    else:  # 0.16.1: the mlp slot is a ModuleSpec(MoELayer) with .submodules.experts a ModuleSpec
        grouped = m.moe.grouped_gemm
        if grouped:
            layer.mlp.module = QSparseMoELayer
        layer.mlp.submodules.experts = ModuleSpec(
            module=QSparseGroupedMLP if grouped else QSparseSequentialMLP, submodules=mlp_sub,
            params={"activation": m.ffn_activation},
        )
        layer.mlp.submodules.shared_experts = None
    return spec


def get_qsparse_block_spec(cfg: RunConfig, config: TransformerConfig, pp_rank: int | None = None,
                           vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Layer specs of this pipeline stage plus the final :class:`QSparseRMSNorm`."""
    layer = get_qsparse_layer_spec(cfg)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=QSparseRMSNorm)
