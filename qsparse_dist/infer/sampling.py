"""Next-token choice from logits: greedy, temperature and nucleus (top-p) sampling.

    greedy        t = argmax(logits)                      (temperature <= 0; ties: lowest id)
    temperature   p = softmax(logits / T)
    top-p         keep the smallest set of most probable tokens whose mass reaches top_p
                  (the most probable token is always kept), renormalise, sample with ``generator``
"""

from __future__ import annotations

import torch

__all__ = ["sample_next", "top_p_filter", "validate_sampling"]


def validate_sampling(temperature: float, top_p: float) -> None:
    if not (temperature >= 0.0):
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus of ``probs`` ``[..., V]`` and renormalise."""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep_sorted = mass_before < top_p  # the first token always has mass_before = 0
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids ``[B]`` from logits ``[B, V]``."""
    validate_sampling(temperature, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
