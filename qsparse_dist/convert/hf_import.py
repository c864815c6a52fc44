"""Import a Hugging Face Llama / Mistral / Qwen2 / Mixtral checkpoint (local directory, safetensors)
into the project's reference layout (``qsparse_dist.model.reference`` docstring) plus a ``model``
config section, keeping the original tokenizer.

The imported directory is parallelism-agnostic: megatron TP/PP/EP shards are cut from it at load
time by ``qsparse_dist.model.state_dict_adapter.reference_to_megatron`` for whatever ``parallel``
section the run uses, so one import serves every layout.

Mapping (HF name → reference name; ``P = model.layers.{i}``)::

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
      (transformers ≥ 5 fused form: P.mlp.gate.weight, P.mlp.experts.gate_up_proj [E, 2F, H] = [gate ‖ up],
       P.mlp.experts.down_proj [E, H, F] are accepted too)
    model.norm.weight                         → final_norm.weight
    lm_head.weight                            → lm_head.weight  (dropped when embeddings are tied)

RoPE: transformers' Llama-family q/k weights are already in the rotate-half (non-interleaved)
convention that the reference model and megatron-core use, so no row permutation is needed.
Mixtral's router (softmax over all experts → top-k → renormalize) equals megatron's (top-k on the
logits → softmax over the k), since ``exp(l_i) / Σ_{j∈topk} exp(l_j)`` is the same number.

Refused with an error naming the field/tensor: other architectures, non-SiLU activations, RoPE
scaling, a ``head_dim`` other than ``hidden_size / num_attention_heads``, attention-output or MLP
biases, tensors of the wrong shape, missing tensors and tensors the mapping does not consume.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.schema import ModelConfig, MoEConfig

__all__ = [
    "HFImportError",
    "SUPPORTED_ARCHITECTURES",
    "TOKENIZER_FILES",
    "SafetensorsSource",
    "model_config_from_hf",
    "read_hf_config",
    "reference_tensors",
    "hf_to_reference_state_dict",
]


class HFImportError(ValueError):
    """The Hugging Face checkpoint cannot be imported; the message says which field or tensor."""


SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
"""``model_type`` → the transformers class whose checkpoints are verified to import exactly."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Files copied verbatim into ``OUT/tokenizer/`` (whichever exist), so the original tokenizer and its
chat template are used for data preparation, SFT and export."""

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(hf_dir: str | Path) -> dict:
    """``config.json`` of a local transformers checkpoint as a dict."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise HFImportError(f"--model {hf_dir}: not a directory")
    if not path.is_file():
        raise HFImportError(f"--model {hf_dir}: no config.json (expected a transformers checkpoint directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HFImportError(f"{path}: not valid JSON ({e})") from None


def _rope_theta(cfg: dict) -> float:
    """``rope_theta`` (transformers < 5) or ``rope_parameters.rope_theta`` (≥ 5); refuse RoPE scaling."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for where, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", None):
            raise HFImportError(
                f"config.json {where}.rope_type={kind!r}: RoPE scaling is not supported "
                "(the reference and megatron models use plain RoPE)"
            )
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def _require(cfg: dict, key: str):
    if cfg.get(key) is None:
        raise HFImportError(f"config.json: required field {key!r} is missing")
    return cfg[key]


def model_config_from_hf(cfg: dict, seq_length: int | None = None) -> tuple[ModelConfig, list[str]]:
    """The ``model`` section equivalent to a transformers config, plus notes for the user.

    ``seq_length`` (training sequence length) defaults to ``min(max_position_embeddings, 4096,
    sliding_window)``: sliding-window attention is not implemented, which is exact as long as no
    sequence is longer than the window.
    """
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_ARCHITECTURES:
        arch = cfg.get("architectures")
        raise HFImportError(
            f"config.json model_type={mtype!r} (architectures={arch}) is not supported; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    notes: list[str] = []
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise HFImportError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU FFN) is supported")
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    groups = int(cfg.get("num_key_value_heads") or heads)
    if hidden % heads:
        raise HFImportError(f"config.json hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise HFImportError(
            f"config.json head_dim={head_dim} differs from hidden_size/num_attention_heads={hidden // heads}; "
            "decoupled head sizes are not supported"
        )
    if cfg.get("attention_bias") and mtype != "qwen2":
        raise HFImportError(
            f"config.json attention_bias=true ({mtype}): biases on the attention output projection "
            "are not supported (only Qwen2-style QKV biases are)"
        )
    if cfg.get("mlp_bias"):
        raise HFImportError("config.json mlp_bias=true: MLP biases are not supported")
    max_pos = int(cfg.get("max_position_embeddings") or 4096)
    window = cfg.get("sliding_window") if (mtype != "qwen2" or cfg.get("use_sliding_window")) else None
    limit = min(max_pos, int(window)) if window else max_pos
    if seq_length is None:
        seq_length = min(limit, 4096)
    elif seq_length > limit:
        what = f"sliding_window={window}" if window and window < max_pos else f"max_position_embeddings={max_pos}"
        raise HFImportError(f"--seq-length {seq_length} exceeds the checkpoint's {what}")
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
            vocab_size=int(_require(cfg, "vocab_size")),
            hidden_size=hidden,
            num_layers=int(_require(cfg, "num_hidden_layers")),
            num_attention_heads=heads,
            num_query_groups=groups if groups != heads else None,
            ffn_hidden_size=ffn,
            seq_length=int(seq_length),
            rope_theta=_rope_theta(cfg),
            norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=mtype == "qwen2" or bool(cfg.get("attention_bias")),
            ffn_activation="swiglu",
            init_std=float(cfg.get("initializer_range") or 0.02),
            moe=moe,
        )
    except ValueError as e:  # pydantic ValidationError is a ValueError
        raise HFImportError(f"config.json does not map onto a valid model section: {e}") from None
    return model, notes


class SafetensorsSource(Mapping):
    """Read-only, lazy view of every tensor in a directory's ``*.safetensors`` files (sharded with a
    ``model.safetensors.index.json`` or not): tensors are read from disk only when accessed."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt"))
            hint = f" (found {found[:3]}: convert them to safetensors first)" if found else ""
            raise HFImportError(f"{self.directory}: no *.safetensors weight files{hint}")
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self._where: dict[str, Path] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                if k in self._where:
                    raise HFImportError(f"tensor {k!r} appears in both {self._where[k].name} and {f.name}")
                self._where[k] = f

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(key)
        return self._handles[self._where[key]].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


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
            raise HFImportError(f"missing tensor {key!r} (expected shape {list(shape)})")
        t = self.src[key]
        if tuple(t.shape) != tuple(shape):
            raise HFImportError(
                f"tensor {key!r} has shape {list(t.shape)}, but config.json implies {list(shape)}"
            )
        self.used.add(key)
        return t


def _prefix(src: Mapping) -> str:
    for p in ("model.", ""):
        if p + "embed_tokens.weight" in src:
            return p
    raise HFImportError("no 'model.embed_tokens.weight' tensor: not a Llama-family causal-LM checkpoint")


def reference_tensors(src: Mapping, model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(reference_name, tensor)`` one by one (streaming: a 7B model never has to sit in memory
    twice), in the source dtype.  Raises :class:`HFImportError` on missing/misshapen/leftover tensors."""
    r = _Reader(src, _prefix(src))
    h, v, hd = model.hidden_size, model.vocab_size, model.head_dim
    nq, nkv = model.num_attention_heads * hd, model.query_groups * hd
    yield "embed.weight", r.take("embed_tokens.weight", (v, h))
    for i in range(model.num_layers):
        p, o = f"layers.{i}.", f"layers.{i}."
        yield o + "attn_norm.weight", r.take(p + "input_layernorm.weight", (h,))
        yield o + "ffn_norm.weight", r.take(p + "post_attention_layernorm.weight", (h,))
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
        yield o + "attn.out.weight", r.take(p + "self_attn.o_proj.weight", (h, nq))
        if model.moe is None:
            f = model.ffn_size
            gate = r.take(p + "mlp.gate_proj.weight", (f, h))
            up = r.take(p + "mlp.up_proj.weight", (f, h))
            yield o + "ffn.fc1.weight", torch.cat([gate, up], dim=0)
            yield o + "ffn.fc2.weight", r.take(p + "mlp.down_proj.weight", (h, f))
        else:
            yield from _moe_tensors(r, model, p, o)
    yield "final_norm.weight", r.take("norm.weight", (h,))
    if model.tie_embeddings:
        r.used.add("lm_head.weight")  # some tied checkpoints store a copy; the embedding is the truth
    else:
        key = "lm_head.weight"
        if key not in src:
            raise HFImportError("missing tensor 'lm_head.weight' (config.json says tie_word_embeddings=false)")
        t = src[key]
        if tuple(t.shape) != (v, h):
            raise HFImportError(f"tensor 'lm_head.weight' has shape {list(t.shape)}, but config.json implies {[v, h]}")
        r.used.add(key)
        yield "lm_head.weight", t
    leftover = sorted(k for k in src if k not in r.used and not k.endswith(_IGNORED_SUFFIXES))
    if leftover:
        more = f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else ""
        raise HFImportError(f"tensors not covered by the {_arch_name(model)} mapping: {leftover[:5]}{more}")


def _arch_name(model: ModelConfig) -> str:
    return "Mixtral" if model.moe else ("Qwen2" if model.qkv_bias else "Llama/Mistral")


def _moe_tensors(r: _Reader, model: ModelConfig, p: str, o: str) -> Iterator[tuple[str, torch.Tensor]]:
    assert model.moe is not None
    h, ne = model.hidden_size, model.moe.num_experts
    f = model.moe.ffn_hidden_size or model.ffn_size
    if r.has(p + "block_sparse_moe.gate.weight"):  # the published Mixtral layout
        m = p + "block_sparse_moe."
        yield o + "ffn.router.weight", r.take(m + "gate.weight", (ne, h))
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


def hf_to_reference_state_dict(
    hf_dir: str | Path, dtype: torch.dtype | None = None, seq_length: int | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """In-memory import (small models, tests): the reference state dict and its model section."""
    model, _ = model_config_from_hf(read_hf_config(hf_dir), seq_length)
    src = SafetensorsSource(hf_dir)
    sd = {k: (t.to(dtype) if dtype is not None else t) for k, t in reference_tensors(src, model)}
    return sd, model


def copy_tokenizer(hf_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files that exist (see :data:`TOKENIZER_FILES`); return their names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(hf_dir) / name
        if src.is_file():
            shutil.copy2(src, out / name)
            copied.append(name)
    return copied
