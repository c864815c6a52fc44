"""Single-device reference GPT in plain PyTorch (nanoGPT-sized): the semantics every parallel and
exported model must reproduce.

Llama-style decoder: token embedding → N × [RMSNorm → attention (RoPE, optional GQA, causal) →
residual → RMSNorm → FFN (GLU activation, or an MoE of GLU experts) → residual] → RMSNorm → LM head.
No biases (except the optional QKV bias, ``model.qkv_bias``, for Qwen2).  Every projection is a
:class:`~qsparse_dist.layers.SparseLinear` configured from ``sparsity`` (``qkv``, ``out``, ``up`` = the
fused gate/up fc1, ``down``); the router and the LM head stay dense, as in the paper.  The layers
themselves (RMSNorm, RoPE, attention, GLU MLP, MoE) are the torch blocks of :mod:`.blocks`, shared
with the exported Hugging Face remote code; this module binds them to the config and ``SparseLinear``.

Weight layout (the state-dict contract shared with export/import):
    embed.weight [V, H]
    layers.{i}.attn_norm.weight, layers.{i}.ffn_norm.weight [H]
    layers.{i}.attn.qkv.weight  [(nh + 2·ng)·hd, H]  rows = [q heads ‖ k groups ‖ v groups]
    layers.{i}.attn.qkv.bias    [(nh + 2·ng)·hd]     same row order; only with model.qkv_bias (Qwen2)
    layers.{i}.attn.out.weight  [H, nh·hd]
    layers.{i}.ffn.fc1.weight   [2F, H]  rows = [gate ‖ up]       (dense FFN)
    layers.{i}.ffn.fc2.weight   [H, F]
    layers.{i}.ffn.router.weight [E, H]; layers.{i}.ffn.experts.{e}.fc1/fc2.weight   (MoE FFN)
    final_norm.weight [H]; lm_head.weight [V, H] (absent when embeddings are tied)
The fused QKV and gate/up tensors matter for BitNet: the absmean ternary scale is per tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import ModelConfig, SparsityConfig
from ..config.shapes import ffn_width, projection_of_module
from ..layers import SparseLinear
from ..ops import glu_activation
from . import blocks
from .blocks import RMSNorm, apply_rope, rope_cache, switch_aux_loss

__all__ = ["RMSNorm", "QSparseGPT", "rope_cache", "apply_rope", "switch_aux_loss"]


def sparse_linear_factory(m: ModelConfig, s: SparsityConfig) -> blocks.MakeLinear:
    """The reference projections: a :class:`SparseLinear` with the ``sparsity`` recipe of each."""

    def make(in_features: int, out_features: int, projection: str, bias: bool) -> SparseLinear:
        return SparseLinear(in_features, out_features, bias=bias, recipe=s.recipe(projection), init_std=m.init_std,
                            sparse_tensor_cores=s.sparse_tensor_cores)

    return make


class Attention(blocks.Attention):
    """:class:`blocks.Attention` built from the config (``Attention(model, sparsity)``)."""

    def __init__(self, m: ModelConfig, s: SparsityConfig) -> None:
        super().__init__(m.hidden_size, m.num_attention_heads, m.query_groups, m.head_dim,
                         sparse_linear_factory(m, s), qkv_bias=m.qkv_bias)


class GLUMLP(blocks.GLUMLP):
    """:class:`blocks.GLUMLP` built from the config."""

    def __init__(self, m: ModelConfig, s: SparsityConfig, ffn_size: int) -> None:
        super().__init__(m.hidden_size, ffn_size, sparse_linear_factory(m, s), glu_activation(m.ffn_activation))


class MoEMLP(blocks.MoEMLP):
    """:class:`blocks.MoEMLP` built from the config (``model.moe``), tracking routing for the aux loss."""

    def __init__(self, m: ModelConfig, s: SparsityConfig) -> None:
        assert m.moe is not None
        super().__init__(m.hidden_size, ffn_width(m), m.moe.num_experts, m.moe.router_topk,
                         sparse_linear_factory(m, s), glu_activation(m.ffn_activation), router_init_std=m.init_std)
        self.moe = m.moe


class Block(blocks.DecoderBlock):
    """One decoder layer from the config: attention + (MoE or dense) GLU FFN."""

    def __init__(self, m: ModelConfig, s: SparsityConfig) -> None:
        attn = Attention(m, s)
        ffn = MoEMLP(m, s) if m.moe is not None else GLUMLP(m, s, m.ffn_size)
        super().__init__(attn, ffn, m.hidden_size, m.norm_eps)


class QSparseGPT(nn.Module):
    """The reference model.  ``forward(tokens) -> logits [B, S, V]``."""

    def __init__(self, model: ModelConfig, sparsity: SparsityConfig) -> None:
        super().__init__()
        if model.vocab_size is None:
            raise ValueError("model.vocab_size must be set (prepare-data writes it from the tokenizer)")
        self.config, self.sparsity = model, sparsity
        self.embed = nn.Embedding(model.vocab_size, model.hidden_size)
        nn.init.normal_(self.embed.weight, std=model.init_std)
        self.layers = nn.ModuleList(Block(model, sparsity) for _ in range(model.num_layers))
        self.final_norm = RMSNorm(model.hidden_size, model.norm_eps)
        self.lm_head = None
        if not model.tie_embeddings:
            self.lm_head = nn.Linear(model.hidden_size, model.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=model.init_std)
        cos, sin = rope_cache(model.seq_length, model.head_dim, model.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        if end > self.rope_cos.shape[0]:
            cos, sin = rope_cache(end, self.config.head_dim, self.config.rope_theta, self.rope_cos.device)
        else:
            cos, sin = self.rope_cos, self.rope_sin
        return cos[start:end], sin[start:end]

    def forward(self, tokens: torch.Tensor, kv_caches: list | None = None, start_pos: int = 0):
        """Logits for ``tokens`` ``[B, S]``.  With ``kv_caches`` (a list, possibly empty) the call
        appends each layer's K/V and returns ``(logits, kv_caches)``; used by the runtime."""
        x = self.embed(tokens)
        cos, sin = self._rope(start_pos, tokens.shape[1])
        new_caches = []
        for i, layer in enumerate(self.layers):
            past = kv_caches[i] if kv_caches else None
            x, cache = layer(x, cos, sin, past)
            new_caches.append(cache)
        x = self.final_norm(x)
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, w)
        return (logits, new_caches) if kv_caches is not None else logits

    def aux_loss(self) -> torch.Tensor | None:
        """Sum over MoE layers of the last forward's load-balancing loss times its coefficient."""
        if self.config.moe is None:
            return None
        losses = [blk.ffn.last_aux_loss for blk in self.layers if blk.ffn.last_aux_loss is not None]
        return self.config.moe.aux_loss_coeff * torch.stack(losses).sum() if losses else None

    def set_track_sparsity(self, on: bool = True) -> None:
        for mod in self.modules():
            if isinstance(mod, SparseLinear):
                mod.track_sparsity = on

    def sparsity_stats(self) -> dict[str, float]:
        """Zero fraction of each projection's input in the last forward (tracking must be on),
        keyed ``layers.{i}.{qkv|out|up|down}`` (MoE: averaged over the experts that ran)."""
        acc: dict[str, list[float]] = {}
        for name, mod in self.named_modules():
            if isinstance(mod, SparseLinear) and mod.last_input_zero_fraction is not None:
                layer = name.split(".")[1]
                proj = projection_of_module(name)
                acc.setdefault(f"layers.{layer}.{proj}", []).append(float(mod.last_input_zero_fraction))
        return {k: sum(v) / len(v) for k, v in sorted(acc.items())}
