"""Single-device reference GPT in plain PyTorch (nanoGPT-sized): the semantics every parallel and
exported model must reproduce.

Llama-style decoder: token embedding → N × [RMSNorm → attention (RoPE, optional GQA, causal) →
residual → RMSNorm → FFN (GLU activation, or an MoE of GLU experts) → residual] → RMSNorm → LM head.
No biases (except the optional QKV bias, ``model.qkv_bias``, for Qwen2).  Every projection is a
:class:`~qsparse_dist.layers.SparseLinear` configured from ``sparsity`` (``qkv``, ``out``, ``up`` = the
fused gate/up fc1, ``down``); the router and the LM head stay dense, as in the paper.

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
from ..layers import SparseLinear
from ..ops import glu_activation

__all__ = ["RMSNorm", "QSparseGPT", "rope_cache", "apply_rope", "switch_aux_loss"]


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x²) + eps) · w`` (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[S, hd]`` for rotate-half RoPE (the Llama / megatron non-interleaved form)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` for ``x`` of shape ``[B, heads, S, hd]``."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, m: ModelConfig, s: SparsityConfig) -> None:
        super().__init__()
        self.nh, self.ng, self.hd = m.num_attention_heads, m.query_groups, m.head_dim
        qkv_out = (self.nh + 2 * self.ng) * self.hd
        self.qkv = SparseLinear(m.hidden_size, qkv_out, bias=m.qkv_bias, recipe=s.recipe("qkv"),
                                init_std=m.init_std)
        self.out = SparseLinear(self.nh * self.hd, m.hidden_size, recipe=s.recipe("out"), init_std=m.init_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.nh * self.hd, self.ng * self.hd, self.ng * self.hd], dim=-1)
        q = q.view(b, t, self.nh, self.hd).transpose(1, 2)
        k = k.view(b, t, self.ng, self.hd).transpose(1, 2)
        v = v.view(b, t, self.ng, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        new_cache = (k, v)
        if self.ng != self.nh:
            rep = self.nh // self.ng
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new query i (absolute position past + i) sees every cached key and new keys <= i
            past = k.shape[2] - t
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, self.nh * self.hd)
        return self.out(y), new_cache


class GLUMLP(nn.Module):
    """``fc2( act(fc1(x)) )`` with ``fc1`` producing the fused ``[gate ‖ up]``."""

    def __init__(self, m: ModelConfig, s: SparsityConfig, ffn_size: int) -> None:
        super().__init__()
        self.fc1 = SparseLinear(m.hidden_size, 2 * ffn_size, recipe=s.recipe("up"), init_std=m.init_std)
        self.fc2 = SparseLinear(ffn_size, m.hidden_size, recipe=s.recipe("down"), init_std=m.init_std)
        self.act = glu_activation(m.ffn_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def switch_aux_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, topk: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss as megatron-core computes it (without the coefficient):
    ``E / (T² · k) · Σ_e (Σ_t p_te) · n_e`` with ``p`` the softmax over all experts and ``n_e`` the
    number of (token, slot) assignments routed to expert ``e``."""
    t, e = probs.shape
    return (probs.sum(0) * tokens_per_expert.to(probs.dtype)).sum() * e / (t * t * topk)


class MoEMLP(nn.Module):
    """Top-k routed mixture of GLU experts (megatron-core's router semantics: top-k on the logits,
    softmax over the selected k, Switch aux loss on the full softmax)."""

    def __init__(self, m: ModelConfig, s: SparsityConfig) -> None:
        super().__init__()
        assert m.moe is not None
        self.moe = m.moe
        ffn = m.moe.ffn_hidden_size or m.ffn_size
        self.router = nn.Linear(m.hidden_size, m.moe.num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=m.init_std)
        self.experts = nn.ModuleList(GLUMLP(m, s, ffn) for _ in range(m.moe.num_experts))
        self.last_aux_loss: torch.Tensor | None = None
        self.last_tokens_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        logits = self.router(h).float()
        top_logits, top_idx = logits.topk(self.moe.router_topk, dim=-1)
        weights = top_logits.softmax(dim=-1).to(x.dtype)
        counts = torch.bincount(top_idx.flatten(), minlength=self.moe.num_experts)
        self.last_tokens_per_expert = counts.detach()
        self.last_aux_loss = switch_aux_loss(logits.softmax(-1), counts, self.moe.router_topk)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(h[rows]) * weights[rows, slot, None])
            else:  # idle this forward: drop last forward's stats so sparsity_stats skips this expert
                expert.fc1.last_input_zero_fraction = expert.fc2.last_input_zero_fraction = None
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, m: ModelConfig, s: SparsityConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.attn = Attention(m, s)
        self.ffn_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.ffn = MoEMLP(m, s) if m.moe is not None else GLUMLP(m, s, m.ffn_size)

    def forward(self, x, cos, sin, kv_cache=None):
        a, cache = self.attn(self.attn_norm(x), cos, sin, kv_cache)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), cache


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
        names = {"attn.qkv": "qkv", "attn.out": "out", "fc1": "up", "fc2": "down"}
        acc: dict[str, list[float]] = {}
        for name, mod in self.named_modules():
            if isinstance(mod, SparseLinear) and mod.last_input_zero_fraction is not None:
                layer = name.split(".")[1]
                proj = next(v for k, v in names.items() if name.endswith(k))
                acc.setdefault(f"layers.{layer}.{proj}", []).append(float(mod.last_input_zero_fraction))
        return {k: sum(v) / len(v) for k, v in sorted(acc.items())}
