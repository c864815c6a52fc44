"""The decoder's building blocks in plain torch — ONE home for RMSNorm, RoPE, attention, the GLU MLP,
the top-k routed MoE and the Switch aux loss.

Used twice: by the reference model (:mod:`qsparse_dist.model.reference`, projections =
``SparseLinear``) and, copied verbatim as ``blocks.py``, by the exported Hugging Face remote code
(``export/hf_remote/modeling_qsparse.py``, projections = its ``QSparseLinear``).  So this file imports
torch only — no package-relative import, no pydantic / megatron / deepspeed — and takes the
projections from a ``make_linear(in_features, out_features, projection, bias)`` factory
(``projection`` ∈ qkv | out | up | down) and the GLU activation as a callable.

Module names are the reference state-dict layout (``attn.qkv``, ``attn.out``, ``ffn.fc1`` = fused
``[gate ‖ up]``, ``ffn.fc2``, ``ffn.router``, ``ffn.experts.{e}.fc1/fc2``, ``attn_norm``, ``ffn_norm``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RMSNorm",
    "rope_cache",
    "rope_tables",
    "apply_rope",
    "cached_causal_mask",
    "switch_aux_loss",
    "Attention",
    "GLUMLP",
    "MoEMLP",
    "DecoderBlock",
    "MakeLinear",
]

MakeLinear = Callable[[int, int, str, bool], nn.Module]
"""``(in_features, out_features, projection, bias) -> module`` with ``projection`` ∈ qkv|out|up|down."""


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


def _rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """``[..., hd]`` angles ``pos · θ^(-2i/hd)``, duplicated over both halves (rotate-half RoPE)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv
    return torch.cat([freqs, freqs], dim=-1)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[S, hd]`` for rotate-half RoPE (the Llama / megatron non-interleaved form)."""
    emb = _rope_angles(torch.arange(seq_len, device=device, dtype=torch.float32), head_dim, theta)
    return emb.cos(), emb.sin()


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, 1, S, hd]`` for rotate-half RoPE at integer positions ``[B, S]``."""
    emb = _rope_angles(position_ids, head_dim, theta)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` for ``x`` of shape ``[B, heads, S, hd]``."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


def cached_causal_mask(new: int, total: int, device=None) -> torch.Tensor:
    """Boolean ``[new, total]``: new query ``i`` (absolute position ``total - new + i``) sees every
    cached key and the new keys ``<= i``."""
    return torch.ones(new, total, dtype=torch.bool, device=device).tril(total - new)


def switch_aux_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, topk: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss as megatron-core computes it (without the coefficient):
    ``E / (T² · k) · Σ_e (Σ_t p_te) · n_e`` with ``p`` the softmax over all experts and ``n_e`` the
    number of (token, slot) assignments routed to expert ``e``."""
    t, e = probs.shape
    return (probs.sum(0) * tokens_per_expert.to(probs.dtype)).sum() * e / (t * t * topk)


class Attention(nn.Module):
    """Causal self-attention with rotate-half RoPE and GQA; fused QKV rows ``[q heads ‖ k groups ‖ v
    groups]``.  Two cache protocols share :meth:`project` / :meth:`attend`: :meth:`forward` (a
    ``(k, v)`` tuple, the reference runtime's) and :meth:`forward_hf` (a transformers ``Cache``)."""

    def __init__(self, hidden_size: int, num_heads: int, num_groups: int, head_dim: int,
                 make_linear: MakeLinear, qkv_bias: bool = False, layer_idx: int = 0) -> None:
        super().__init__()
        self.nh, self.ng, self.hd, self.layer_idx = num_heads, num_groups, head_dim, layer_idx
        self.qkv = make_linear(hidden_size, (num_heads + 2 * num_groups) * head_dim, "qkv", qkv_bias)
        self.out = make_linear(num_heads * head_dim, hidden_size, "out", False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``q [B, nh, T, hd]``, ``k, v [B, ng, T, hd]`` of ``x [B, T, H]``, RoPE applied to q and k."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.nh * self.hd, self.ng * self.hd, self.ng * self.hd], dim=-1)
        q = q.view(b, t, self.nh, self.hd).transpose(1, 2)
        k = k.view(b, t, self.ng, self.hd).transpose(1, 2)
        v = v.view(b, t, self.ng, self.hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``out(softmax(q kᵀ/√hd + mask) v)``; ``mask=None`` is plain causal (no cache, no padding)."""
        b, _, t, _ = q.shape
        if self.ng != self.nh:
            rep = self.nh // self.ng
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``(y, (k, v))``: with ``kv_cache`` the new keys/values are appended to the cached ones."""
        q, k, v = self.project(x, cos, sin)
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        mask = None if kv_cache is None else cached_causal_mask(q.shape[2], k.shape[2], x.device)
        return self.attend(q, k, v, mask), (k, v)

    def forward_hf(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                   cache) -> torch.Tensor:
        """transformers' protocol: ``cache.update(k, v, layer_idx)`` returns all keys/values so far;
        ``mask`` (``None`` or boolean ``[B, 1, T, past+T]``) is built by the caller."""
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return self.attend(q, k, v, mask)


class GLUMLP(nn.Module):
    """``fc2( act(fc1(x)) )`` with ``fc1`` producing the fused ``[gate ‖ up]``."""

    def __init__(self, hidden_size: int, ffn_size: int, make_linear: MakeLinear,
                 act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc1 = make_linear(hidden_size, 2 * ffn_size, "up", False)
        self.fc2 = make_linear(ffn_size, hidden_size, "down", False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MoEMLP(nn.Module):
    """Top-k routed mixture of GLU experts (megatron-core's router semantics: top-k on the logits,
    softmax over the selected k).  With ``track_routing`` each forward also keeps the tokens per
    expert and the Switch aux loss on the full softmax (``last_tokens_per_expert``, ``last_aux_loss``)."""

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, topk: int, make_linear: MakeLinear,
                 act: Callable[[torch.Tensor], torch.Tensor], router_init_std: float | None = None,
                 track_routing: bool = True) -> None:
        super().__init__()
        self.num_experts, self.topk, self.track_routing = num_experts, topk, track_routing
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        if router_init_std is not None:
            nn.init.normal_(self.router.weight, std=router_init_std)
        self.experts = nn.ModuleList(GLUMLP(hidden_size, ffn_size, make_linear, act) for _ in range(num_experts))
        self.last_aux_loss: torch.Tensor | None = None
        self.last_tokens_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        logits = self.router(h).float()
        top_logits, top_idx = logits.topk(self.topk, dim=-1)
        weights = top_logits.softmax(dim=-1).to(x.dtype)
        if self.track_routing:
            counts = torch.bincount(top_idx.flatten(), minlength=self.num_experts)
            self.last_tokens_per_expert = counts.detach()
            self.last_aux_loss = switch_aux_loss(logits.softmax(-1), counts, self.topk)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(h[rows]) * weights[rows, slot, None])
            elif self.track_routing:  # idle: drop last forward's input stats so sparsity_stats skips it
                for fc in (expert.fc1, expert.fc2):
                    if hasattr(fc, "last_input_zero_fraction"):
                        fc.last_input_zero_fraction = None
        return out.view(shape)


class DecoderBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + ffn(norm(x))`` (pre-norm residual block)."""

    def __init__(self, attn: Attention, ffn: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(hidden_size, eps)
        self.attn = attn
        self.ffn_norm = RMSNorm(hidden_size, eps)
        self.ffn = ffn

    def forward(self, x, cos, sin, kv_cache=None):
        """``(x, (k, v))`` with the tuple cache of :meth:`Attention.forward`."""
        a, cache = self.attn(self.attn_norm(x), cos, sin, kv_cache)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), cache

    def forward_hf(self, x, cos, sin, mask, cache):
        """Hidden states, with the transformers cache protocol of :meth:`Attention.forward_hf`."""
        x = x + self.attn.forward_hf(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))
