"""Tensor-name and config mapping between the reference layout and the Hugging Face architectures we
export to, in both directions (export writes ``reference → HF``; the runtime reads ``HF → reference``).

* ``llama`` / ``qwen2`` (``LlamaForCausalLM`` / ``Qwen2ForCausalLM``, the latter when the QKV
  projection has biases): fused ``qkv`` is split into ``q_proj``/``k_proj``/``v_proj`` rows
  ``[q heads ‖ k groups ‖ v groups]``; fused ``fc1 = [gate ‖ up]`` into ``gate_proj``/``up_proj``.
  RoPE needs no permutation: the reference uses rotate-half, as HF Llama does.
* ``mixtral`` (``MixtralForCausalLM``, the ecosystem's per-expert layout ``block_sparse_moe.experts.E.
  w1/w3/w2`` that transformers and llama.cpp both read): ``w1 = gate``, ``w3 = up``, ``w2 = down``;
  router → ``block_sparse_moe.gate``.  Mixtral's softmax-then-top-k-then-renormalise routing equals
  megatron's top-k-then-softmax.
* ``qsparse`` (our remote code): the reference names under ``model.`` plus ``lm_head.weight``; BitNet
  projections optionally packed (``.weight`` → ``.weight_packed`` + ``.weight_scale``).
"""

from __future__ import annotations

import re

import torch

from ..config.schema import ModelConfig, MoEConfig, SparsityConfig
from ..ops.packing import pack_ternary_weight, unpack_ternary
from .errors import ExportError

__all__ = [
    "HF_ACT",
    "reference_to_hf",
    "hf_to_reference",
    "hf_config_dict",
    "configs_from_hf",
    "TERNARY_PROJECTIONS",
]

HF_ACT = {"swiglu": "silu", "relu2glu": "relu2"}
"""GLU activations a stock Llama/Mixtral MLP (``down(act(gate) ⊙ up)``) reproduces; dReLU is not one."""

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
TERNARY_PROJECTIONS = re.compile(r"(attn\.qkv|attn\.out|fc1|fc2)\.weight$")


def _qkv_sizes(m: ModelConfig) -> list[int]:
    return [m.num_attention_heads * m.head_dim, m.query_groups * m.head_dim, m.query_groups * m.head_dim]


def _llama_like(sd: dict[str, torch.Tensor], m: ModelConfig, moe: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["final_norm.weight"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(m.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        for suffix in ("weight", "bias"):
            if p + "attn.qkv." + suffix in sd:
                qs, ks, vs = sd[p + "attn.qkv." + suffix].split(_qkv_sizes(m), dim=0)
                out[q + "self_attn.q_proj." + suffix] = qs
                out[q + "self_attn.k_proj." + suffix] = ks
                out[q + "self_attn.v_proj." + suffix] = vs
        out[q + "self_attn.o_proj.weight"] = sd[p + "attn.out.weight"]
        if not moe:
            gate, up = sd[p + "ffn.fc1.weight"].chunk(2, dim=0)
            out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = gate, up
            out[q + "mlp.down_proj.weight"] = sd[p + "ffn.fc2.weight"]
            continue
        out[q + "block_sparse_moe.gate.weight"] = sd[p + "ffn.router.weight"]
        for e in range(m.moe.num_experts):
            gate, up = sd[f"{p}ffn.experts.{e}.fc1.weight"].chunk(2, dim=0)
            x = f"{q}block_sparse_moe.experts.{e}."
            out[x + "w1.weight"], out[x + "w3.weight"] = gate, up
            out[x + "w2.weight"] = sd[f"{p}ffn.experts.{e}.fc2.weight"]
    return out


def _from_llama_like(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    def get(k: str) -> torch.Tensor:
        if k not in hf:
            raise ExportError(f"Hugging Face weights lack {k!r}")
        return hf[k]

    sd = {"embed.weight": get("model.embed_tokens.weight"), "final_norm.weight": get("model.norm.weight")}
    if not m.tie_embeddings:
        sd["lm_head.weight"] = get("lm_head.weight")
    for i in range(m.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        sd[p + "attn_norm.weight"] = get(q + "input_layernorm.weight")
        sd[p + "ffn_norm.weight"] = get(q + "post_attention_layernorm.weight")
        sd[p + "attn.qkv.weight"] = torch.cat([get(q + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if m.qkv_bias:
            sd[p + "attn.qkv.bias"] = torch.cat([get(q + f"self_attn.{x}_proj.bias") for x in "qkv"])
        sd[p + "attn.out.weight"] = get(q + "self_attn.o_proj.weight")
        if m.moe is None:
            sd[p + "ffn.fc1.weight"] = torch.cat([get(q + "mlp.gate_proj.weight"), get(q + "mlp.up_proj.weight")])
            sd[p + "ffn.fc2.weight"] = get(q + "mlp.down_proj.weight")
            continue
        sd[p + "ffn.router.weight"] = get(q + "block_sparse_moe.gate.weight")
        for e in range(m.moe.num_experts):
            x = f"{q}block_sparse_moe.experts.{e}."
            sd[f"{p}ffn.experts.{e}.fc1.weight"] = torch.cat([get(x + "w1.weight"), get(x + "w3.weight")])
            sd[f"{p}ffn.experts.{e}.fc2.weight"] = get(x + "w2.weight")
    return sd


def reference_to_hf(sd: dict[str, torch.Tensor], m: ModelConfig, arch: str, packed: bool = False) -> dict[str, torch.Tensor]:
    """Reference-layout tensors → the HF architecture's names (``arch``: llama | qwen2 | mixtral | qsparse)."""
    if arch in ("llama", "qwen2", "mixtral"):
        return _llama_like(sd, m, moe=arch == "mixtral")
    if arch != "qsparse":
        raise ExportError(f"unknown HF architecture {arch!r}")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        name = k if k == "lm_head.weight" else "model." + k
        if packed and TERNARY_PROJECTIONS.search(k):
            pt = pack_ternary_weight(v.float())
            base = name[: -len("weight")]
            out[base + "weight_packed"], out[base + "weight_scale"] = pt.packed, pt.scale
        else:
            out[name] = v
    return out


def hf_to_reference(
    hf: dict[str, torch.Tensor], m: ModelConfig, arch: str
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Inverse of :func:`reference_to_hf`.  Returns ``(state_dict, prequantized)``: packed ternary
    weights come back de-quantized (``scale · W_q``) and their names are listed in ``prequantized`` —
    they must not go through the BitNet weight fake-quant again (it would recompute the scale)."""
    if arch in ("llama", "qwen2", "mixtral"):
        return _from_llama_like(hf, m), set()
    if arch != "qsparse":
        raise ExportError(f"unknown HF architecture {arch!r}")
    sd: dict[str, torch.Tensor] = {}
    pre: set[str] = set()
    for k, v in hf.items():
        name = k if k == "lm_head.weight" else k.removeprefix("model.")
        if name.endswith(".weight_scale"):
            continue
        if name.endswith(".weight_packed"):
            base = name[: -len("weight_packed")]
            scale = hf[k[: -len("weight_packed")] + "weight_scale"]
            sd[base + "weight"] = unpack_ternary(v, _in_features(base, m)).float() * scale.float()
            pre.add(base + "weight")
        else:
            sd[name] = v
    return sd, pre


def _in_features(base: str, m: ModelConfig) -> int:
    if base.endswith("attn.out."):
        return m.num_attention_heads * m.head_dim
    if base.endswith("fc2."):
        return (m.moe.ffn_hidden_size or m.ffn_size) if (m.moe is not None and ".experts." in base) else m.ffn_size
    return m.hidden_size


def hf_config_dict(m: ModelConfig, s: SparsityConfig, arch: str, packed: bool = False) -> dict:
    """Keyword arguments of the HF config class for ``arch``."""
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.query_groups,
        max_position_embeddings=m.seq_length,
        rope_theta=m.rope_theta,
        rms_norm_eps=m.norm_eps,
        initializer_range=m.init_std,
    )
    if arch in ("llama", "qwen2"):
        return dict(common, intermediate_size=m.ffn_size, hidden_act=HF_ACT[m.ffn_activation],
                    tie_word_embeddings=m.tie_embeddings, **({"attention_bias": False, "mlp_bias": False} if arch == "llama" else {}))
    if arch == "mixtral":
        return dict(common, intermediate_size=m.moe.ffn_hidden_size or m.ffn_size, hidden_act=HF_ACT[m.ffn_activation],
                    tie_word_embeddings=m.tie_embeddings, num_local_experts=m.moe.num_experts,
                    num_experts_per_tok=m.moe.router_topk, router_aux_loss_coef=m.moe.aux_loss_coeff)
    return dict(
        common,
        intermediate_size=m.ffn_size,
        ffn_activation=m.ffn_activation,
        tie_embeddings=m.tie_embeddings,
        num_experts=m.moe.num_experts if m.moe else 0,
        num_experts_per_tok=m.moe.router_topk if m.moe else 2,
        moe_intermediate_size=m.moe.ffn_hidden_size if m.moe else None,
        linear_kind=s.linear,
        sparsity={"qkv": s.qkv, "out": s.out, "up": s.up, "down": s.down},
        block_size=s.block_size,
        sparsity_rescale=s.rescale,
        ternary_packed=packed,
        qkv_bias=m.qkv_bias,
    )


def configs_from_hf(cfg: dict) -> tuple[ModelConfig, SparsityConfig, str, bool]:
    """``config.json`` of an export → (ModelConfig, SparsityConfig, arch, packed)."""
    mt = cfg.get("model_type")
    arch = {"llama": "llama", "qwen2": "qwen2", "mixtral": "mixtral", "qsparse": "qsparse"}.get(mt)
    if arch is None:
        raise ExportError(f"model_type {mt!r} is not one this runtime loads (llama, qwen2, mixtral, qsparse)")
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    m = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        seq_length=cfg.get("max_position_embeddings", 2048),
        rope_theta=theta,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        init_std=cfg.get("initializer_range", 0.02) or 0.02,
    )
    if arch == "qsparse":
        m.update(ffn_hidden_size=cfg["intermediate_size"], ffn_activation=cfg["ffn_activation"],
                 tie_embeddings=cfg.get("tie_embeddings", False), qkv_bias=cfg.get("qkv_bias", False))
        if cfg.get("num_experts"):
            m["moe"] = MoEConfig(num_experts=cfg["num_experts"], router_topk=cfg["num_experts_per_tok"],
                                 ffn_hidden_size=cfg.get("moe_intermediate_size"))
        sp = cfg.get("sparsity") or {}
        s = SparsityConfig(linear=cfg["linear_kind"], block_size=cfg.get("block_size"),
                           rescale=cfg.get("sparsity_rescale", False), **{k: sp.get(k, 0.0) for k in ("qkv", "out", "up", "down")})
        return ModelConfig(**m), s, arch, bool(cfg.get("ternary_packed"))
    act = {v: k for k, v in HF_ACT.items()}.get(cfg.get("hidden_act", "silu"))
    if act is None:
        raise ExportError(f"hidden_act {cfg.get('hidden_act')!r} has no reference equivalent (silu, relu2)")
    m.update(ffn_activation=act, tie_embeddings=cfg.get("tie_word_embeddings", False), qkv_bias=arch == "qwen2")
    if arch == "mixtral":
        m["moe"] = MoEConfig(num_experts=cfg["num_local_experts"], router_topk=cfg["num_experts_per_tok"],
                             ffn_hidden_size=cfg["intermediate_size"])
        m["ffn_hidden_size"] = cfg["intermediate_size"]
    else:
        m["ffn_hidden_size"] = cfg["intermediate_size"]
    dense = SparsityConfig(linear="dense", qkv=0.0, out=0.0, up=0.0, down=0.0)
    return ModelConfig(**m), dense, arch, False
