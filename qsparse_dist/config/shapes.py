"""The model's shapes, defined once on the model args (torchtitan's ``get_nparams_and_flops``): the four
sparsified projections of a decoder layer — sizes and module names in each layout — and the parameter
and FLOP counts derived from them.

Projection table (``H`` hidden, ``n_h`` heads, ``n_g`` query groups, ``d`` head dim, ``F`` the width
of one GLU — the expert width for MoE, ``E`` experts; weights ``W [out, in]``, ``y = x Wᵀ``)::

    name  in       out             per layer  reference module  megatron module
    qkv   H        (n_h + 2·n_g)·d  1          attn.qkv          self_attention.linear_qkv
    out   n_h·d    H               1          attn.out          self_attention.linear_proj
    up    H        2F  [gate ‖ up] E or 1     fc1               linear_fc1
    down  F        H               E or 1     fc2               linear_fc2

Module names are suffixes: the reference model's ``layers.{i}.ffn.fc1`` / ``layers.{i}.ffn.experts.{e}.fc1``
(:mod:`qsparse_dist.model.blocks`) and megatron's ``decoder.layers.{j}.mlp.linear_fc1`` /
``….mlp.experts.local_experts.{e}.linear_fc1`` (:mod:`qsparse_dist.model.megatron.specs`) both end in them.

Counts (:func:`count_params`, :func:`flops_per_token`)::

    N            = Σ_p L·copies_p·in_p·out_p + L·(2H + [qkv bias] (n_h + 2·n_g)·d + [MoE] E·H) + H
    N_active     = L·(qkv + out + [dense] up + down | [MoE] E·H + top_k·(up + down of one expert)) + H·V
    F_token      = 6·N_active + 6·L·S·(n_h·d)

``N`` is the non-embedding count of the paper's scaling law (norms, attention, FFN/MoE incl. the
router; not the token embedding nor the LM head).  ``F_token`` counts a trained token: forward +
backward = 3 × forward, a multiply-add = 2 FLOPs; the LM head is a matmul, the embedding lookup is not;
the second term is causal attention (QKᵀ and A·V over an average context ``S/2``, 2 FLOPs each).
Top-K sparsity is not subtracted: training runs dense kernels, so these are the FLOPs executed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import PROJECTIONS, ModelConfig

__all__ = [
    "Projection",
    "REFERENCE_MODULES",
    "MEGATRON_MODULES",
    "FLOPS_PER_TOKEN_FORMULA",
    "ffn_width",
    "qkv_sizes",
    "projection_table",
    "projection_of_module",
    "projection_params",
    "count_params",
    "active_matmul_params",
    "flops_per_token",
]

REFERENCE_MODULES: dict[str, str] = {"qkv": "attn.qkv", "out": "attn.out", "up": "fc1", "down": "fc2"}
"""Projection → module-name suffix in the reference model (and the exported ``qsparse`` remote code)."""

MEGATRON_MODULES: dict[str, str] = {
    "qkv": "self_attention.linear_qkv",
    "out": "self_attention.linear_proj",
    "up": "linear_fc1",
    "down": "linear_fc2",
}
"""Projection → module-name suffix in megatron-core's ``GPTModel`` with our layer spec."""

_MODULES = {"reference": REFERENCE_MODULES, "megatron": MEGATRON_MODULES}

FLOPS_PER_TOKEN_FORMULA = "F_token = 6*N_active + 6*L*S*(n_heads*head_dim)"


@dataclass(frozen=True)
class Projection:
    """One sparsified linear of a decoder layer: ``W [out_features, in_features]``, ``copies`` instances
    per layer (the experts of an MoE FFN, else 1)."""

    name: str  # qkv | out | up | down: the sparsity field and LinearRecipe it uses
    in_features: int
    out_features: int
    copies: int
    reference: str  # module-name suffix, reference model
    megatron: str  # module-name suffix, megatron GPTModel

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def params_per_layer(self) -> int:
        return self.copies * self.in_features * self.out_features


def ffn_width(m: ModelConfig) -> int:
    """``F``: the width of one GLU FFN — ``moe.ffn_hidden_size`` (default ``ffn_size``) for MoE experts."""
    if m.moe is not None and m.moe.ffn_hidden_size is not None:
        return m.moe.ffn_hidden_size
    return m.ffn_size


def qkv_sizes(m: ModelConfig) -> tuple[int, int, int]:
    """Rows of the fused QKV weight: ``(n_h·d, n_g·d, n_g·d)`` for ``[q heads ‖ k groups ‖ v groups]``."""
    return m.num_attention_heads * m.head_dim, m.query_groups * m.head_dim, m.query_groups * m.head_dim


def projection_table(m: ModelConfig) -> dict[str, Projection]:
    """The four projections of one decoder layer, keyed and ordered as :data:`PROJECTIONS`."""
    h, f = m.hidden_size, ffn_width(m)
    experts = m.moe.num_experts if m.moe is not None else 1
    dims = {
        "qkv": (h, sum(qkv_sizes(m)), 1),
        "out": (m.num_attention_heads * m.head_dim, h, 1),
        "up": (h, 2 * f, experts),
        "down": (f, h, experts),
    }
    return {p: Projection(p, *dims[p], REFERENCE_MODULES[p], MEGATRON_MODULES[p]) for p in PROJECTIONS}


def projection_of_module(name: str, layout: str = "reference") -> str | None:
    """``qkv|out|up|down`` of a module name (``layers.3.attn.qkv``, ``decoder.layers.0.mlp.linear_fc1``),
    or ``None`` if it is no projection; ``layout`` is ``reference`` or ``megatron``."""
    for proj, suffix in _MODULES[layout].items():
        if name == suffix or name.endswith("." + suffix):
            return proj
    return None


def projection_params(m: ModelConfig) -> dict[str, int]:
    """Weight count of each sparsified projection over all layers (MoE: all experts)."""
    return {p: m.num_layers * t.params_per_layer for p, t in projection_table(m).items()}


def count_params(m: ModelConfig, *, embeddings: bool = False) -> int:
    """Non-embedding parameters of the model (``N``, see the module doc); with ``embeddings`` also the
    token embedding and the LM head (absent when tied) — every parameter of the reference model."""
    h, n_layers = m.hidden_size, m.num_layers
    n = sum(projection_params(m).values())
    n += n_layers * 2 * h + h  # attn_norm + ffn_norm per layer, final_norm
    if m.qkv_bias:
        n += n_layers * sum(qkv_sizes(m))
    if m.moe is not None:
        n += n_layers * m.moe.num_experts * h  # router
    if embeddings:
        if m.vocab_size is None:
            raise ValueError("model.vocab_size must be set to count the embedding parameters")
        n += m.vocab_size * h * (1 if m.tie_embeddings else 2)
    return n


def active_matmul_params(m: ModelConfig) -> int:
    """``N_active``: weights of every linear one token passes through (MoE: the router and ``top_k``
    experts), plus the LM head ``H·V``."""
    t = projection_table(m)
    attn = t["qkv"].in_features * t["qkv"].out_features + t["out"].in_features * t["out"].out_features
    one_ffn = t["up"].in_features * t["up"].out_features + t["down"].in_features * t["down"].out_features
    ffn = one_ffn if m.moe is None else m.hidden_size * m.moe.num_experts + m.moe.router_topk * one_ffn
    return m.num_layers * (attn + ffn) + m.hidden_size * (m.vocab_size or 0)


def flops_per_token(m: ModelConfig, seq_length: int | None = None) -> float:
    """Model FLOPs per trained token (:data:`FLOPS_PER_TOKEN_FORMULA`); ``seq_length`` defaults to
    ``model.seq_length``."""
    s = m.seq_length if seq_length is None else seq_length
    return 6.0 * active_matmul_params(m) + 6.0 * m.num_layers * s * m.num_attention_heads * m.head_dim
