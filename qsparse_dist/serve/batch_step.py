"""One decode step for several requests at once, each with its own KV cache and position.

Why per-request KV caches instead of one padded batch: requests join and leave the batch at every
step (continuous batching) and have different lengths.  Everything in a decoder layer except attention
works on one token at a time — RMSNorm, the projections (Q-Sparse top-K and the int8 activation
quantization are per token, so each row of ``[B, 1, H]`` gets exactly the mask and scale it would get
alone), the GLU / MoE FFN, the LM head — so those run on the stacked ``[B, 1, H]`` rows, which is
where the (sparse) weights are read once for the whole batch.  Attention is the only part that mixes
positions; it runs row by row against that row's own cache with the same call the runtime's
single-request decode makes (``QSparseGPT`` attention with a cache: RoPE at the row's absolute
position, ``scaled_dot_product_attention`` with the all-true causal mask).  No padding, no masks to
get wrong, and a row's result does not depend on which other rows share the step.

The model is the runtime's :class:`~qsparse_dist.model.reference.QSparseGPT` with inference linears
(:func:`qsparse_dist.infer.runtime.load_model`); :func:`supports_batched_step` says whether its
structure is the one this module knows, else the scheduler decodes the rows one by one through the
model's own ``forward(tokens, kv_caches, start_pos)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KVCache", "prefill", "decode_step", "decode_step_unbatched", "supports_batched_step"]

KVCache = list  # per layer: (k [1, groups, L, hd], v [1, groups, L, hd]), as QSparseGPT.forward returns them


def supports_batched_step(model: nn.Module) -> bool:
    """True when ``model`` is a reference ``QSparseGPT`` (embed, layers with attn/ffn, final_norm)."""
    from ..model.reference import Attention, QSparseGPT

    return isinstance(model, QSparseGPT) and all(isinstance(layer.attn, Attention) for layer in model.layers)


def prefill(model: nn.Module, prompt: list[int], device: torch.device) -> tuple[torch.Tensor, KVCache]:
    """Logits ``[V]`` of the last prompt position and the prompt's KV cache (one forward, as
    :func:`qsparse_dist.infer.generate.generate_ids` does)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    logits, caches = model(ids, kv_caches=[], start_pos=0)
    return logits[0, -1], caches


def decode_step_unbatched(model: nn.Module, tokens: list[int], positions: list[int], caches: list[KVCache],
                          device: torch.device) -> torch.Tensor:
    """Fallback: one ``model.forward`` per row; returns logits ``[B, V]`` and updates ``caches``."""
    out = []
    for b, (tok, pos) in enumerate(zip(tokens, positions)):
        x = torch.tensor([[tok]], dtype=torch.long, device=device)
        logits, caches[b] = model(x, kv_caches=caches[b], start_pos=pos)
        out.append(logits[0, -1])
    return torch.stack(out)


def _attend_one(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One row: ``q, k, v`` ``[1, heads|groups, 1, hd]`` (RoPE applied) against the row's cache;
    ``mask`` ``[1, L]`` is the runtime's causal mask for one new query after ``L − 1`` cached keys."""
    k = torch.cat([cache[0], k], dim=2)
    v = torch.cat([cache[1], v], dim=2)
    new_cache = (k, v)
    if attn.ng != attn.nh:
        rep = attn.nh // attn.ng
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), new_cache


def decode_step(model: nn.Module, tokens: list[int], positions: list[int], caches: list[KVCache],
                device: torch.device) -> torch.Tensor:
    """Feed token ``tokens[b]`` at absolute position ``positions[b]`` for every row ``b``; return the
    next-token logits ``[B, V]`` and append each row's K/V to ``caches[b]`` (replaced in place)."""
    from ..model.reference import apply_rope

    b = len(tokens)
    x = model.embed(torch.tensor(tokens, dtype=torch.long, device=device).view(b, 1))  # [B, 1, H]
    rope = [model._rope(p, 1) for p in positions]  # ([1, hd], [1, hd]) per row
    cos = torch.stack([c for c, _ in rope]).unsqueeze(1)  # [B, 1, 1, hd]: broadcasts over heads
    sin = torch.stack([s for _, s in rope]).unsqueeze(1)
    # the cache of row r holds positions[r] keys; with the new one, L = positions[r] + 1 (same every layer)
    masks = [torch.ones(1, p + 1, dtype=torch.bool, device=device).tril(p) for p in positions]
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        h = layer.attn_norm(x)
        q, k, v = attn.qkv(h).split([attn.nh * attn.hd, attn.ng * attn.hd, attn.ng * attn.hd], dim=-1)
        q = apply_rope(q.view(b, 1, attn.nh, attn.hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, 1, attn.ng, attn.hd).transpose(1, 2), cos, sin)
        v = v.view(b, 1, attn.ng, attn.hd).transpose(1, 2)
        ys = []
        for r in range(b):
            y, caches[r][i] = _attend_one(attn, q[r:r + 1], k[r:r + 1], v[r:r + 1], caches[r][i], masks[r])
            ys.append(y)
        y = torch.cat(ys).transpose(1, 2).reshape(b, 1, attn.nh * attn.hd)
        x = x + attn.out(y)
        x = x + layer.ffn(layer.ffn_norm(x))
    x = model.final_norm(x)
    w = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return F.linear(x, w)[:, -1]
