"""Inference: runtime (:mod:`.runtime`: load an HF export, pick a linear backend), the backends
(:mod:`.backends`: ``torch``, ``kernels`` over the Triton GEMVs of ``qsparse_dist.kernels``, and the
fused batch-1 ``KernelDecoder``), decoding (:mod:`.generate`, :mod:`.sampling`) and CUDA-graph helpers.
Names are imported lazily so that importing a submodule stays light."""

from __future__ import annotations

__all__ = ["load_model", "LoadedModel", "generate_text", "generate_ids", "sample_next", "register_linear_backend"]


def __getattr__(name: str):
    if name in ("load_model", "LoadedModel", "register_linear_backend"):
        from . import runtime

        return getattr(runtime, name)
    if name in ("generate_text", "generate_ids"):
        from . import generate

        return getattr(generate, name)
    if name == "sample_next":
        from .sampling import sample_next

        return sample_next
    raise AttributeError(name)
