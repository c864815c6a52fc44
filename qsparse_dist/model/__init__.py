"""Models built from config: the plain-PyTorch reference GPT (and the megatron-core GPT/MoE)."""

from .reference import QSparseGPT

__all__ = ["QSparseGPT"]
