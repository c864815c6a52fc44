"""The supervised fine-tuning loss: token cross-entropy weighted by a loss mask, so prompt tokens
contribute exactly nothing — ``Σ mask·CE / Σ mask`` over the batch (:func:`masked_lm_loss`), and the
same reduction of a megatron-core ``GPTModel``'s per-token loss on packed rows
(:func:`megatron_sft_loss`).  The rows come from :mod:`qsparse_dist.data.sft`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import packed_attention_mask

__all__ = ["masked_lm_loss", "megatron_sft_loss"]


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``Σ mask·CE(logits, labels) / Σ mask`` over all positions of the batch."""
    ce = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten().long(), reduction="none")
    m = loss_mask.flatten().to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def megatron_sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """SFT loss of one micro-batch through a megatron-core ``GPTModel`` (one pipeline stage holding
    the whole model): the packed rows run with :func:`packed_attention_mask` and the per-token loss is
    reduced with the loss mask (:func:`masked_lm_loss`'s formula).  Under TP the returned scalar is
    the same on every TP rank (megatron's vocab-parallel cross-entropy)."""
    tokens, labels = batch["tokens"].long(), batch["labels"].long()
    mask = batch.get("attention_mask")
    mask = packed_attention_mask(batch["doc_ids"]) if mask is None else (mask if mask.dim() == 4 else mask[:, None])
    pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    per_token = model(tokens, pos, mask, labels=labels).float()
    m = batch["loss_mask"].to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)
