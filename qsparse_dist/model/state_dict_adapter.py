"""Old home of the reference ⇄ megatron adapter, kept so existing imports work: the code is
:mod:`qsparse_dist.model.adapters.megatron`."""

from .adapters.megatron import (  # noqa: F401
    local_key,
    megatron_to_reference,
    qkv_megatron_to_reference,
    qkv_reference_to_megatron,
    reference_to_megatron,
    shard_key,
)

__all__ = ["reference_to_megatron", "megatron_to_reference", "qkv_reference_to_megatron",
           "qkv_megatron_to_reference", "shard_key", "local_key"]
