"""Attention masks built from batch metadata (megatron-core's convention: ``True`` = masked).

:func:`packed_attention_mask` is the block-diagonal causal mask of packed rows (several examples in
one row of ``seq_length`` positions, numbered by ``doc_ids``): a query attends to earlier-or-same
positions of its own example only, so packed examples never see each other.  megatron-core's local
``DotProductAttention`` applies it as given; RoPE needs no position reset under it (scores depend only
on ``q_pos − k_pos`` inside an example).
"""

from __future__ import annotations

import torch

__all__ = ["packed_attention_mask"]


def packed_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` document ids → ``[B, 1, S, S]`` bool mask, ``True`` where attention is *forbidden*:
    a query attends to earlier-or-same positions of its own document only (padding, id -1, forms
    its own causal block, so no row is fully masked)."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}")
    s = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return ~(same & causal)[:, None]
