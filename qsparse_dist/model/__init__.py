"""Models built from config: the torch building blocks (:mod:`.blocks`, also shipped as the HF remote
code), the plain-PyTorch reference GPT (:mod:`.reference`), the megatron-core GPT/MoE
(:mod:`.megatron`) and the external-format adapters (:mod:`.adapters`).

``QSparseGPT`` is resolved lazily, so ``import qsparse_dist.model.blocks`` (used by the megatron specs and the remote code) does not
pull in the reference model and, through it, ``layers``."""

from __future__ import annotations

__all__ = ["QSparseGPT"]


def __getattr__(name: str):
    if name == "QSparseGPT":
        from .reference import QSparseGPT

        return QSparseGPT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
