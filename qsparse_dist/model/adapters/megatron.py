"""Convert between the reference state dict and megatron-core ``GPTModel`` shards (torchtitan-style),
and name the shard files' keys.

* :func:`reference_to_megatron` — split: the local shard of ONE rank, keys exactly as that rank's
  ``GPTModel.state_dict()`` has them (without megatron's ``*._extra_state`` entries, which its load
  hook fills), loadable with ``model.load_state_dict(sd, strict=True)``.  Used for HF import and to
  start every parallel layout from the same weights.
* :func:`megatron_to_reference` — merge: ``{(tp_rank, pp_rank, ep_rank): state_dict}`` of all the
  distinct shards → the reference state dict (:mod:`qsparse_dist.model.reference` documents it; the
  contract for export).  Any rank holding a given ``(tp_rank, pp_rank)`` serves the dense weights and
  any rank holding ``(pp_rank, ep_rank)`` serves that EP rank's experts, so replicas can be omitted.

Mapping (``i`` = global layer, ``j = i - pp_rank·L/pp`` the stage-local one; ``r`` = TP rank of ``P``):

=============================================  ================================================  ============
reference                                      megatron                                          TP split
=============================================  ================================================  ============
embed.weight [V, H]                            embedding.word_embeddings.weight (first stage)    rows (vocab)
layers.i.attn_norm.weight                      decoder.layers.j.input_layernorm.weight           replicated
layers.i.attn.qkv.weight                       decoder.layers.j.self_attention.linear_qkv.weight  query groups
layers.i.attn.qkv.bias (model.qkv_bias)      decoder.layers.j.self_attention.linear_qkv.bias    query groups
layers.i.attn.out.weight [H, nh·hd]            decoder.layers.j.self_attention.linear_proj.weight columns
layers.i.ffn_norm.weight                       decoder.layers.j.pre_mlp_layernorm.weight          replicated
layers.i.ffn.fc1.weight [2F, H]                decoder.layers.j.mlp.linear_fc1.weight             [gate_r ‖ up_r]
layers.i.ffn.fc2.weight [H, F]                 decoder.layers.j.mlp.linear_fc2.weight             columns
layers.i.ffn.router.weight [E, H]              decoder.layers.j.mlp.router.weight                 replicated
layers.i.ffn.experts.e.fc{1,2}.weight          decoder.layers.j.mlp.experts.local_experts.(e - ep_rank·E/ep).linear_fc{1,2}.weight
                                                                                                 whole (expert TP = 1)
final_norm.weight                              decoder.final_layernorm.weight (last stage)       replicated
lm_head.weight [V, H]                          output_layer.weight (last stage)                  rows (vocab)
=============================================  ================================================  ============

Fused QKV: the reference stacks ``[q heads ‖ k groups ‖ v groups]``; megatron interleaves per query
group ``g``: ``[q heads of g (nh/ng·hd rows) ‖ k_g (hd) ‖ v_g (hd)]`` and TP splits whole groups.
Fused fc1: the reference stacks ``[gate ‖ up]`` ``[2F, H]``; TP rank ``r`` holds
``[gate[rF/P:(r+1)F/P] ‖ up[rF/P:(r+1)F/P]]`` (megatron's GLU layout, stride 2).
Tied embeddings: no ``lm_head.weight`` in the reference; with PP > 1 the last stage's
``output_layer.weight`` is a copy of the (vocab-split) embedding, with PP = 1 it does not exist.

Shard-file keys (training checkpoints, ``docs/checkpoints.md``): a rank's parameter name with the
GLOBAL layer and expert index, so the files of all stages / EP ranks merge by key —
:func:`shard_key` (local → global, written by ``train/checkpoint.py``) and :func:`local_key` (its
inverse, read by ``export/training_ckpt.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ...config.schema import RunConfig

__all__ = ["reference_to_megatron", "megatron_to_reference", "qkv_reference_to_megatron",
           "qkv_megatron_to_reference", "shard_key", "local_key"]

Shard = tuple[int, int, int]  # (tp_rank, pp_rank, ep_rank)


def qkv_reference_to_megatron(w: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> torch.Tensor:
    """``[q ‖ k ‖ v]`` rows → megatron's per-group ``[q_g ‖ k_g ‖ v_g]`` rows (full tensor)."""
    q, k, v = w.split([num_heads * head_dim, num_groups * head_dim, num_groups * head_dim], dim=0)
    rest = w.shape[1:]
    q = q.reshape(num_groups, num_heads // num_groups * head_dim, *rest)
    k = k.reshape(num_groups, head_dim, *rest)
    v = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_megatron_to_reference(w: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`qkv_reference_to_megatron`."""
    rest = w.shape[1:]
    per = num_heads // num_groups * head_dim
    g = w.reshape(num_groups, per + 2 * head_dim, *rest)
    q, k, v = g.split([per, head_dim, head_dim], dim=1)
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)], dim=0)


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.local_experts\.(\d+)\.")


def _renumber(name: str, layer, expert) -> str:
    """``name`` with its layer index ``j`` replaced by ``layer(j)`` and, inside that layer, its local
    expert index ``e`` by ``expert(j, e)``."""
    m = _LAYER_RE.match(name)
    if not m:
        return name
    j = int(m.group(1))
    name = f"decoder.layers.{layer(j)}." + name[m.end():]
    e = _EXPERT_RE.search(name)
    if e:
        name = name[:e.start()] + f".local_experts.{expert(j, int(e.group(1)))}." + name[e.end():]
    return name


def shard_key(name: str, module, ep_rank: int) -> str:
    """Parameter name of ``module`` (this rank's ``GPTModel``) → key in the shard files: GLOBAL layer
    index (``layer_number - 1``: PP offset added) and GLOBAL expert index (``ep_rank · local + i``)."""
    layers = module.decoder.layers
    return _renumber(name, lambda j: layers[j].layer_number - 1,
                     lambda j, e: ep_rank * layers[j].mlp.num_local_experts + e)


def local_key(key: str, per_stage: int, pp_rank: int, local_experts: int, ep_rank: int) -> str:
    """Inverse of :func:`shard_key` for stage ``pp_rank`` (``per_stage`` layers each) and EP rank
    ``ep_rank`` (``local_experts`` each): the name in that rank's ``GPTModel.state_dict()``."""
    return _renumber(key, lambda i: i - pp_rank * per_stage, lambda _, e: e - ep_rank * local_experts)


def _chunk(w: torch.Tensor, rank: int, size: int, dim: int) -> torch.Tensor:
    if w.shape[dim] % size:
        raise ValueError(f"dim {dim} of a {tuple(w.shape)} tensor is not divisible by tp={size}")
    return w.chunk(size, dim=dim)[rank].clone()


def _fc1_split(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    gate, up = w.chunk(2, dim=0)
    return torch.cat([_chunk(gate, rank, size, 0), _chunk(up, rank, size, 0)], dim=0)


def _fc1_merge(parts: list[torch.Tensor]) -> torch.Tensor:
    gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
    return torch.cat([*gates, *ups], dim=0)


def _check_sizes(cfg: RunConfig, tp_size: int, pp_size: int, ep_size: int) -> None:
    m = cfg.model
    if m.num_layers % pp_size:
        raise ValueError(f"pp_size={pp_size} does not divide model.num_layers={m.num_layers}")
    if m.query_groups % tp_size:
        raise ValueError(f"tp_size={tp_size} does not divide the {m.query_groups} query groups")
    if m.moe is not None and m.moe.num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide model.moe.num_experts={m.moe.num_experts}")


def reference_to_megatron(ref_sd: Mapping[str, torch.Tensor], cfg: RunConfig, *, tp_rank: int = 0,
                          tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1, ep_rank: int = 0,
                          ep_size: int = 1) -> dict[str, torch.Tensor]:
    """The shard of rank ``(tp_rank, pp_rank, ep_rank)`` (see the module docstring for the layout)."""
    _check_sizes(cfg, tp_size, pp_size, ep_size)
    m = cfg.model
    nh, ng, hd = m.num_attention_heads, m.query_groups, m.head_dim
    per_stage = m.num_layers // pp_size
    out: dict[str, torch.Tensor] = {}
    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = _chunk(ref_sd["embed.weight"], tp_rank, tp_size, 0)
    for j in range(per_stage):
        i = pp_rank * per_stage + j
        src, dst = f"layers.{i}.", f"decoder.layers.{j}."
        out[dst + "input_layernorm.weight"] = ref_sd[src + "attn_norm.weight"].clone()
        qkv = qkv_reference_to_megatron(ref_sd[src + "attn.qkv.weight"], nh, ng, hd)
        out[dst + "self_attention.linear_qkv.weight"] = _chunk(qkv, tp_rank, tp_size, 0)
        if src + "attn.qkv.bias" in ref_sd:  # model.qkv_bias (Qwen2): same row order as the weight
            bias = qkv_reference_to_megatron(ref_sd[src + "attn.qkv.bias"], nh, ng, hd)
            out[dst + "self_attention.linear_qkv.bias"] = _chunk(bias, tp_rank, tp_size, 0)
        out[dst + "self_attention.linear_proj.weight"] = _chunk(ref_sd[src + "attn.out.weight"], tp_rank, tp_size, 1)
        out[dst + "pre_mlp_layernorm.weight"] = ref_sd[src + "ffn_norm.weight"].clone()
        if m.moe is None:
            out[dst + "mlp.linear_fc1.weight"] = _fc1_split(ref_sd[src + "ffn.fc1.weight"], tp_rank, tp_size)
            out[dst + "mlp.linear_fc2.weight"] = _chunk(ref_sd[src + "ffn.fc2.weight"], tp_rank, tp_size, 1)
        else:
            out[dst + "mlp.router.weight"] = ref_sd[src + "ffn.router.weight"].clone()
            local = m.moe.num_experts // ep_size
            for e_local in range(local):
                e = ep_rank * local + e_local
                for fc in ("fc1", "fc2"):
                    out[f"{dst}mlp.experts.local_experts.{e_local}.linear_{fc}.weight"] = (
                        ref_sd[f"{src}ffn.experts.{e}.{fc}.weight"].clone()
                    )
    if pp_rank == pp_size - 1:
        out["decoder.final_layernorm.weight"] = ref_sd["final_norm.weight"].clone()
        if not m.tie_embeddings:
            out["output_layer.weight"] = _chunk(ref_sd["lm_head.weight"], tp_rank, tp_size, 0)
        elif pp_size > 1:
            out["output_layer.weight"] = _chunk(ref_sd["embed.weight"], tp_rank, tp_size, 0)
    return out


def _sizes(keys) -> tuple[int, int, int]:
    keys = list(keys)
    return tuple(max(k[d] for k in keys) + 1 for d in range(3))  # type: ignore[return-value]


def megatron_to_reference(shards: Mapping[Shard, Mapping[str, torch.Tensor]], cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Merge ``{(tp_rank, pp_rank, ep_rank): GPTModel state dict}`` into the reference state dict.
    ``_extra_state`` entries are ignored; sizes are inferred from the keys (every TP rank of every
    stage and every EP rank must be present at least once)."""
    tp_size, pp_size, ep_size = _sizes(shards)
    _check_sizes(cfg, tp_size, pp_size, ep_size)
    m = cfg.model
    nh, ng, hd = m.num_attention_heads, m.query_groups, m.head_dim
    per_stage = m.num_layers // pp_size

    def dense(tp: int, pp: int) -> Mapping[str, torch.Tensor]:
        for (t, p, _), sd in shards.items():
            if t == tp and p == pp:
                return sd
        raise KeyError(f"no shard for tp_rank={tp}, pp_rank={pp}")

    def expert(pp: int, ep: int) -> Mapping[str, torch.Tensor]:
        for (_, p, e), sd in shards.items():
            if p == pp and e == ep:
                return sd
        raise KeyError(f"no shard for pp_rank={pp}, ep_rank={ep}")

    def tp_parts(pp: int, key: str) -> list[torch.Tensor]:
        return [dense(r, pp)[key].detach().cpu() for r in range(tp_size)]

    out: dict[str, torch.Tensor] = {}
    out["embed.weight"] = torch.cat(tp_parts(0, "embedding.word_embeddings.weight"), dim=0)
    for pp in range(pp_size):
        for j in range(per_stage):
            i = pp * per_stage + j
            src, dst = f"decoder.layers.{j}.", f"layers.{i}."
            out[dst + "attn_norm.weight"] = dense(0, pp)[src + "input_layernorm.weight"].detach().cpu().clone()
            qkv = torch.cat(tp_parts(pp, src + "self_attention.linear_qkv.weight"), dim=0)
            out[dst + "attn.qkv.weight"] = qkv_megatron_to_reference(qkv, nh, ng, hd)
            if src + "self_attention.linear_qkv.bias" in dense(0, pp):
                bias = torch.cat(tp_parts(pp, src + "self_attention.linear_qkv.bias"), dim=0)
                out[dst + "attn.qkv.bias"] = qkv_megatron_to_reference(bias, nh, ng, hd)
            out[dst + "attn.out.weight"] = torch.cat(tp_parts(pp, src + "self_attention.linear_proj.weight"), dim=1)
            out[dst + "ffn_norm.weight"] = dense(0, pp)[src + "pre_mlp_layernorm.weight"].detach().cpu().clone()
            if m.moe is None:
                out[dst + "ffn.fc1.weight"] = _fc1_merge(tp_parts(pp, src + "mlp.linear_fc1.weight"))
                out[dst + "ffn.fc2.weight"] = torch.cat(tp_parts(pp, src + "mlp.linear_fc2.weight"), dim=1)
            else:
                out[dst + "ffn.router.weight"] = dense(0, pp)[src + "mlp.router.weight"].detach().cpu().clone()
                local = m.moe.num_experts // ep_size
                for ep in range(ep_size):
                    sd = expert(pp, ep)
                    for e_local in range(local):
                        for fc in ("fc1", "fc2"):
                            out[f"{dst}ffn.experts.{ep * local + e_local}.{fc}.weight"] = (
                                sd[f"{src}mlp.experts.local_experts.{e_local}.linear_{fc}.weight"].detach().cpu().clone()
                            )
    last = pp_size - 1
    out["final_norm.weight"] = dense(0, last)["decoder.final_layernorm.weight"].detach().cpu().clone()
    if not m.tie_embeddings:
        out["lm_head.weight"] = torch.cat(tp_parts(last, "output_layer.weight"), dim=0)
    return out
