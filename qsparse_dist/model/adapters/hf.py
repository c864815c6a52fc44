"""Hugging Face ⇄ reference: tensor names and config, in both directions — the ONE home of the mapping
(torchtitan's per-model ``state_dict_adapter``: :data:`FROM_HF_MAP`, :func:`to_hf`, :func:`from_hf`).

Users: ``convert/hf_import.py`` (``import-hf``: a published Llama / Mistral / Qwen2 / Mixtral
checkpoint → reference layout), ``export/hf.py`` (reference → the architecture we export to) and the
runtime (an export → reference, :func:`hf_to_reference`).

Architectures (``arch``):

* ``llama`` / ``qwen2`` / ``mistral`` (``*ForCausalLM``; Qwen2 = QKV biases): fused ``qkv`` is split
  into ``q_proj``/``k_proj``/``v_proj`` rows ``[q heads ‖ k groups ‖ v groups]``; fused ``fc1 =
  [gate ‖ up]`` into ``gate_proj``/``up_proj``.  RoPE needs no permutation: transformers' Llama-family
  q/k weights are in the rotate-half (non-interleaved) convention the reference and megatron use.
* ``mixtral`` (``MixtralForCausalLM``, the per-expert layout ``block_sparse_moe.experts.E.w1/w3/w2``
  that transformers and llama.cpp read; transformers ≥ 5's stacked ``mlp.experts.gate_up_proj`` /
  ``down_proj`` is accepted on input): ``w1 = gate``, ``w3 = up``, ``w2 = down``; router →
  ``block_sparse_moe.gate``.  Mixtral's softmax → top-k → renormalise routing equals megatron's top-k
  → softmax over the k, since ``exp(l_i) / Σ_{j∈topk} exp(l_j)`` is the same number.
* ``qsparse`` (our remote code): the reference names under ``model.`` plus ``lm_head.weight``; BitNet
  projections optionally packed (``.weight`` → ``.weight_packed`` + ``.weight_scale``).

Names (HF → reference; ``P = model.layers.{i}``)::

    model.embed_tokens.weight                 → embed.weight
    P.input_layernorm.weight                  → layers.{i}.attn_norm.weight
    P.post_attention_layernorm.weight         → layers.{i}.ffn_norm.weight
    P.self_attn.{q,k,v}_proj.weight           → layers.{i}.attn.qkv.weight   rows [q ‖ k ‖ v]
    P.self_attn.{q,k,v}_proj.bias   (Qwen2)   → layers.{i}.attn.qkv.bias
    P.self_attn.o_proj.weight                 → layers.{i}.attn.out.weight
    P.mlp.{gate,up}_proj.weight               → layers.{i}.ffn.fc1.weight    rows [gate ‖ up]
    P.mlp.down_proj.weight                    → layers.{i}.ffn.fc2.weight
    P.block_sparse_moe.gate.weight  (Mixtral) → layers.{i}.ffn.router.weight
    P.block_sparse_moe.experts.{e}.{w1,w3}    → layers.{i}.ffn.experts.{e}.fc1.weight  [w1=gate ‖ w3=up]
    P.block_sparse_moe.experts.{e}.w2         → layers.{i}.ffn.experts.{e}.fc2.weight
    model.norm.weight                         → final_norm.weight
    lm_head.weight                            → lm_head.weight  (dropped when embeddings are tied)

Refused with :class:`HFMappingError` naming the field/tensor: other architectures, activations without
a reference equivalent, RoPE scaling, decoupled ``head_dim``, attention-output / MLP biases, tensors of
the wrong shape, missing tensors and tensors the mapping does not consume.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from ...config.schema import ModelConfig, MoEConfig, SparsityConfig
from ...config.shapes import REFERENCE_MODULES, ffn_width, projection_of_module, projection_table, qkv_sizes
from ...ops.packing import pack_ternary_weight, unpack_ternary

__all__ = [
    "HFMappingError",
    "SUPPORTED_ARCHITECTURES",
    "HF_ACT",
    "FROM_HF_MAP",
    "TERNARY_PROJECTIONS",
    "model_config_from_hf",
    "configs_from_hf",
    "hf_config_dict",
    "from_hf",
    "to_hf",
    "reference_to_hf",
    "hf_to_reference",
]


class HFMappingError(ValueError):
    """A Hugging Face config or checkpoint does not map onto the reference model; the message says
    which field or tensor."""


SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
"""``model_type`` → the transformers class whose published checkpoints are verified to import exactly."""

HF_ACT = {"swiglu": "silu", "relu2glu": "relu2"}
"""GLU activations a stock Llama/Mixtral MLP (``down(act(gate) ⊙ up)``) reproduces; dReLU is not one."""

FROM_HF_MAP = {
    "embed_tokens.weight": "embed.weight",
    "layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "layers.{}.self_attn.o_proj.weight": "layers.{}.attn.out.weight",
    "layers.{}.mlp.down_proj.weight": "layers.{}.ffn.fc2.weight",
    "layers.{}.block_sparse_moe.gate.weight": "layers.{}.ffn.router.weight",
    "norm.weight": "final_norm.weight",
}
"""One-to-one renames, HF name (under ``model.``) → reference name; the fused tensors (``qkv`` =
``[q ‖ k ‖ v]``, ``fc1`` = ``[gate ‖ up]``, Mixtral experts) are built in :func:`from_hf` / :func:`to_hf`."""

TERNARY_PROJECTIONS = re.compile("(" + "|".join(map(re.escape, REFERENCE_MODULES.values())) + r")\.weight$")
"""Reference weight names of the four projections (``…attn.qkv.weight`` … ``…fc2.weight``): the BitNet
ones a ``qsparse`` export may pack to 2 bits."""
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def _rope_theta(cfg: dict) -> float:
    """``rope_theta`` (transformers < 5) or ``rope_parameters.rope_theta`` (≥ 5); refuse RoPE scaling."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for where, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", None):
            raise HFMappingError(
                f"config.json {where}.rope_type={kind!r}: RoPE scaling is not supported "
                "(the reference and megatron models use plain RoPE)"
            )
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _require(cfg: dict, key: str):
    if cfg.get(key) is None:
        raise HFMappingError(f"config.json: required field {key!r} is missing")
    return cfg[key]


def _common_fields(cfg: dict) -> dict:
    """The ``model`` fields every supported architecture spells the same way."""
    return dict(
        vocab_size=int(_require(cfg, "vocab_size")),
        hidden_size=int(_require(cfg, "hidden_size")),
        num_layers=int(_require(cfg, "num_hidden_layers")),
        num_attention_heads=int(_require(cfg, "num_attention_heads")),
        rope_theta=_rope_theta(cfg),
        norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
        init_std=float(cfg.get("initializer_range") or 0.02),
    )


def model_config_from_hf(cfg: dict, seq_length: int | None = None) -> tuple[ModelConfig, list[str]]:
    """The ``model`` section equivalent to a published transformers config, plus notes for the user.

    ``seq_length`` (training sequence length) defaults to ``min(max_position_embeddings, 4096,
    sliding_window)``: sliding-window attention is not implemented, which is exact as long as no
    sequence is longer than the window.
    """
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_ARCHITECTURES:
        arch = cfg.get("architectures")
        raise HFMappingError(
            f"config.json model_type={mtype!r} (architectures={arch}) is not supported; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    notes: list[str] = []
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise HFMappingError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU FFN) is supported")
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    groups = int(cfg.get("num_key_value_heads") or heads)
    if hidden % heads:
        raise HFMappingError(f"config.json hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise HFMappingError(
            f"config.json head_dim={head_dim} differs from hidden_size/num_attention_heads={hidden // heads}; "
            "decoupled head sizes are not supported"
        )
    if cfg.get("attention_bias") and mtype != "qwen2":
        raise HFMappingError(
            f"config.json attention_bias=true ({mtype}): biases on the attention output projection "
            "are not supported (only Qwen2-style QKV biases are)"
        )
    if cfg.get("mlp_bias"):
        raise HFMappingError("config.json mlp_bias=true: MLP biases are not supported")
    max_pos = int(cfg.get("max_position_embeddings") or 4096)
    window = cfg.get("sliding_window") if (mtype != "qwen2" or cfg.get("use_sliding_window")) else None
    limit = min(max_pos, int(window)) if window else max_pos
    if seq_length is None:
        seq_length = min(limit, 4096)
    elif seq_length > limit:
        what = f"sliding_window={window}" if window and window < max_pos else f"max_position_embeddings={max_pos}"
        raise HFMappingError(f"--seq-length {seq_length} exceeds the checkpoint's {what}")
    if window:
        notes.append(
            f"sliding_window={window}: attention is full-causal here, exact for sequences ≤ {window} tokens"
        )
    moe = None
    ffn = int(_require(cfg, "intermediate_size"))
    if mtype == "mixtral":
        jitter = float(cfg.get("router_jitter_noise") or 0.0)
        if jitter:
            notes.append(f"router_jitter_noise={jitter} is not reproduced (training-time noise only)")
        moe = MoEConfig(
            num_experts=int(_require(cfg, "num_local_experts")),
            router_topk=int(cfg.get("num_experts_per_tok") or 2),
            aux_loss_coeff=float(cfg.get("router_aux_loss_coef") or 0.0),
            ffn_hidden_size=ffn,
        )
    try:
        model = ModelConfig(
            **_common_fields(cfg),
            num_query_groups=groups if groups != heads else None,
            ffn_hidden_size=ffn,
            seq_length=int(seq_length),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=mtype == "qwen2" or bool(cfg.get("attention_bias")),
            ffn_activation="swiglu",
            moe=moe,
        )
    except ValueError as e:  # pydantic ValidationError is a ValueError
        raise HFMappingError(f"config.json does not map onto a valid model section: {e}") from None
    return model, notes


def configs_from_hf(cfg: dict) -> tuple[ModelConfig, SparsityConfig, str, bool]:
    """``config.json`` of one of OUR exports → (ModelConfig, SparsityConfig, arch, packed); the
    inverse of :func:`hf_config_dict`.  ``seq_length`` is ``max_position_embeddings``."""
    mt = cfg.get("model_type")
    arch = {"llama": "llama", "qwen2": "qwen2", "mixtral": "mixtral", "qsparse": "qsparse"}.get(mt)
    if arch is None:
        raise HFMappingError(f"model_type {mt!r} is not one this runtime loads (llama, qwen2, mixtral, qsparse)")
    heads = int(_require(cfg, "num_attention_heads"))
    m = dict(_common_fields(cfg), num_query_groups=cfg.get("num_key_value_heads") or heads,
             seq_length=cfg.get("max_position_embeddings", 2048), ffn_hidden_size=cfg["intermediate_size"])
    if arch == "qsparse":
        m.update(ffn_activation=cfg["ffn_activation"], tie_embeddings=cfg.get("tie_embeddings", False),
                 qkv_bias=cfg.get("qkv_bias", False))
        if cfg.get("num_experts"):
            m["moe"] = MoEConfig(num_experts=cfg["num_experts"], router_topk=cfg["num_experts_per_tok"],
                                 ffn_hidden_size=cfg.get("moe_intermediate_size"))
        sp = cfg.get("sparsity") or {}
        s = SparsityConfig(linear=cfg["linear_kind"], block_size=cfg.get("block_size"),
                           rescale=cfg.get("sparsity_rescale", False), **{k: sp.get(k, 0.0) for k in ("qkv", "out", "up", "down")})
        return ModelConfig(**m), s, arch, bool(cfg.get("ternary_packed"))
    act = {v: k for k, v in HF_ACT.items()}.get(cfg.get("hidden_act", "silu"))
    if act is None:
        raise HFMappingError(f"hidden_act {cfg.get('hidden_act')!r} has no reference equivalent (silu, relu2)")
    m.update(ffn_activation=act, tie_embeddings=cfg.get("tie_word_embeddings", False), qkv_bias=arch == "qwen2")
    if arch == "mixtral":
        m["moe"] = MoEConfig(num_experts=cfg["num_local_experts"], router_topk=cfg["num_experts_per_tok"],
                             ffn_hidden_size=cfg["intermediate_size"])
    dense = SparsityConfig(linear="dense", qkv=0.0, out=0.0, up=0.0, down=0.0)
    return ModelConfig(**m), dense, arch, False


def hf_config_dict(m: ModelConfig, s: SparsityConfig, arch: str, packed: bool = False) -> dict:
    """Keyword arguments of the HF config class for ``arch`` (inverse: :func:`configs_from_hf`)."""
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
        return dict(common, intermediate_size=ffn_width(m), hidden_act=HF_ACT[m.ffn_activation],
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


# ---------------------------------------------------------------------------------------------
# tensors: Llama family
# ---------------------------------------------------------------------------------------------


@dataclass
class _Reader:
    """Takes tensors from the source by HF name, checks shapes, remembers what was consumed."""

    src: Mapping
    prefix: str
    used: set[str] = field(default_factory=set)

    def has(self, name: str) -> bool:
        return self.prefix + name in self.src

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = self.prefix + name
        if key not in self.src:
            raise HFMappingError(f"missing tensor {key!r} (expected shape {list(shape)})")
        t = self.src[key]
        if tuple(t.shape) != tuple(shape):
            raise HFMappingError(f"tensor {key!r} has shape {list(t.shape)}, but config.json implies {list(shape)}")
        self.used.add(key)
        return t

    def renamed(self, hf_name: str, shape: tuple[int, ...], layer: int | None = None) -> tuple[str, torch.Tensor]:
        """``(reference name, tensor)`` of a one-to-one rename in :data:`FROM_HF_MAP`."""
        fmt = (lambda s: s.format(layer)) if layer is not None else (lambda s: s)
        return fmt(FROM_HF_MAP[hf_name]), self.take(fmt(hf_name), shape)


def _prefix(src: Mapping) -> str:
    for p in ("model.", ""):
        if p + "embed_tokens.weight" in src:
            return p
    raise HFMappingError("no 'model.embed_tokens.weight' tensor: not a Llama-family causal-LM checkpoint")


def _arch_name(model: ModelConfig) -> str:
    return "Mixtral" if model.moe else ("Qwen2" if model.qkv_bias else "Llama/Mistral")


def from_hf(src: Mapping, model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama-family HF tensors → ``(reference_name, tensor)``, one by one (streaming: a 7B model never
    sits in memory twice), in the source dtype.  Raises :class:`HFMappingError` on missing / misshapen
    / leftover tensors."""
    r = _Reader(src, _prefix(src))
    h, v = model.hidden_size, model.vocab_size
    nq, nkv, _ = qkv_sizes(model)
    yield r.renamed("embed_tokens.weight", (v, h))
    for i in range(model.num_layers):
        p, o = f"layers.{i}.", f"layers.{i}."
        yield r.renamed("layers.{}.input_layernorm.weight", (h,), i)
        yield r.renamed("layers.{}.post_attention_layernorm.weight", (h,), i)
        q = r.take(p + "self_attn.q_proj.weight", (nq, h))
        k = r.take(p + "self_attn.k_proj.weight", (nkv, h))
        vv = r.take(p + "self_attn.v_proj.weight", (nkv, h))
        yield o + "attn.qkv.weight", torch.cat([q, k, vv], dim=0)
        if model.qkv_bias:
            yield o + "attn.qkv.bias", torch.cat([
                r.take(p + "self_attn.q_proj.bias", (nq,)),
                r.take(p + "self_attn.k_proj.bias", (nkv,)),
                r.take(p + "self_attn.v_proj.bias", (nkv,)),
            ])
        yield r.renamed("layers.{}.self_attn.o_proj.weight", (h, nq), i)
        if model.moe is None:
            f = model.ffn_size
            gate = r.take(p + "mlp.gate_proj.weight", (f, h))
            up = r.take(p + "mlp.up_proj.weight", (f, h))
            yield o + "ffn.fc1.weight", torch.cat([gate, up], dim=0)
            yield r.renamed("layers.{}.mlp.down_proj.weight", (h, f), i)
        else:
            yield from _moe_from_hf(r, model, i)
    yield r.renamed("norm.weight", (h,))
    if model.tie_embeddings:
        r.used.add("lm_head.weight")  # some tied checkpoints store a copy; the embedding is the truth
    else:
        key = "lm_head.weight"
        if key not in src:
            raise HFMappingError("missing tensor 'lm_head.weight' (config.json says tie_word_embeddings=false)")
        t = src[key]
        if tuple(t.shape) != (v, h):
            raise HFMappingError(f"tensor 'lm_head.weight' has shape {list(t.shape)}, but config.json implies {[v, h]}")
        r.used.add(key)
        yield "lm_head.weight", t
    leftover = sorted(k for k in src if k not in r.used and not k.endswith(_IGNORED_SUFFIXES))
    if leftover:
        more = f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else ""
        raise HFMappingError(f"tensors not covered by the {_arch_name(model)} mapping: {leftover[:5]}{more}")


def _moe_from_hf(r: _Reader, model: ModelConfig, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    assert model.moe is not None
    h, ne = model.hidden_size, model.moe.num_experts
    f = ffn_width(model)
    p, o = f"layers.{i}.", f"layers.{i}."
    if r.has(p + "block_sparse_moe.gate.weight"):  # the published Mixtral layout
        m = p + "block_sparse_moe."
        yield r.renamed("layers.{}.block_sparse_moe.gate.weight", (ne, h), i)
        for e in range(ne):
            w1 = r.take(f"{m}experts.{e}.w1.weight", (f, h))
            w3 = r.take(f"{m}experts.{e}.w3.weight", (f, h))
            yield f"{o}ffn.experts.{e}.fc1.weight", torch.cat([w1, w3], dim=0)
            yield f"{o}ffn.experts.{e}.fc2.weight", r.take(f"{m}experts.{e}.w2.weight", (h, f))
    else:  # transformers ≥ 5 in-memory layout with stacked experts
        m = p + "mlp."
        yield o + "ffn.router.weight", r.take(m + "gate.weight", (ne, h))
        gate_up = r.take(m + "experts.gate_up_proj", (ne, 2 * f, h))
        down = r.take(m + "experts.down_proj", (ne, h, f))
        for e in range(ne):
            yield f"{o}ffn.experts.{e}.fc1.weight", gate_up[e].clone()
            yield f"{o}ffn.experts.{e}.fc2.weight", down[e].clone()


def to_hf(sd: Mapping[str, torch.Tensor], m: ModelConfig, moe: bool) -> dict[str, torch.Tensor]:
    """Reference tensors → Llama / Qwen2 (``moe=False``) or Mixtral (per-expert ``w1/w3/w2``) names;
    the inverse of :func:`from_hf`."""
    to_hf_map = {ref: "model." + hf for hf, ref in FROM_HF_MAP.items()}
    out: dict[str, torch.Tensor] = {to_hf_map["embed.weight"]: sd["embed.weight"],
                                    to_hf_map["final_norm.weight"]: sd["final_norm.weight"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    sizes = list(qkv_sizes(m))
    for i in range(m.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."

        def rename(ref: str, i: int = i, p: str = p) -> None:
            out[to_hf_map["layers.{}." + ref].format(i)] = sd[p + ref]

        rename("attn_norm.weight")
        rename("ffn_norm.weight")
        for suffix in ("weight", "bias"):
            if p + "attn.qkv." + suffix in sd:
                qs, ks, vs = sd[p + "attn.qkv." + suffix].split(sizes, dim=0)
                out[q + "self_attn.q_proj." + suffix] = qs
                out[q + "self_attn.k_proj." + suffix] = ks
                out[q + "self_attn.v_proj." + suffix] = vs
        rename("attn.out.weight")
        if not moe:
            gate, up = sd[p + "ffn.fc1.weight"].chunk(2, dim=0)
            out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = gate, up
            rename("ffn.fc2.weight")
            continue
        rename("ffn.router.weight")
        for e in range(m.moe.num_experts):
            gate, up = sd[f"{p}ffn.experts.{e}.fc1.weight"].chunk(2, dim=0)
            x = f"{q}block_sparse_moe.experts.{e}."
            out[x + "w1.weight"], out[x + "w3.weight"] = gate, up
            out[x + "w2.weight"] = sd[f"{p}ffn.experts.{e}.fc2.weight"]
    return out


# ---------------------------------------------------------------------------------------------
# tensors: any exported architecture (llama-like or our remote code)
# ---------------------------------------------------------------------------------------------


def reference_to_hf(sd: Mapping[str, torch.Tensor], m: ModelConfig, arch: str, packed: bool = False) -> dict[str, torch.Tensor]:
    """Reference-layout tensors → the HF architecture's names (``arch``: llama | qwen2 | mixtral | qsparse)."""
    if arch in ("llama", "qwen2", "mixtral"):
        return to_hf(sd, m, moe=arch == "mixtral")
    if arch != "qsparse":
        raise HFMappingError(f"unknown HF architecture {arch!r}")
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


def hf_to_reference(hf: Mapping[str, torch.Tensor], m: ModelConfig, arch: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Inverse of :func:`reference_to_hf`.  Returns ``(state_dict, prequantized)``: packed ternary
    weights come back de-quantized (``scale · W_q``) and their names are listed in ``prequantized`` —
    they must not go through the BitNet weight fake-quant again (it would recompute the scale)."""
    if arch in ("llama", "qwen2", "mixtral"):
        return dict(from_hf(hf, m)), set()
    if arch != "qsparse":
        raise HFMappingError(f"unknown HF architecture {arch!r}")
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
    """Input size of the projection ``base`` (``layers.i.attn.qkv.`` …), for unpacking 2-bit rows."""
    proj = projection_of_module(base.removesuffix("."))
    if proj is None:
        raise HFMappingError(f"packed tensor {base}weight_packed is not one of the projections {list(REFERENCE_MODULES.values())}")
    return projection_table(m)[proj].in_features
