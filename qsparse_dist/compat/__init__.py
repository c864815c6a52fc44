"""One home for every patch of a private megatron-core / DeepSpeed API (and the CPU shims).

Each patch calls :func:`~qsparse_dist.compat.versions.require` first: it was written for
megatron-core 0.16.x / DeepSpeed 0.19.x (:data:`~qsparse_dist.compat.versions.SUPPORTED`) and raises
:class:`CompatError` naming the package and version on any other release.

* :mod:`.megatron` — megatron-core: Transformer-Engine names, host split sizes, RNG tracker, log filter;
* :mod:`.deepspeed` — DeepSpeed: shm op build, expert group tables, MoE layer recognition, fp32 clip;
* :mod:`.cpu` — the CPU shims (torch.cuda stand-ins, ``device="cuda"`` → cpu), only without CUDA.

:func:`prepare_megatron` is what :func:`qsparse_dist.parallel.initialize_parallel` calls before it
creates megatron's groups.  Importing this package imports neither library.
"""

from __future__ import annotations

from .versions import SUPPORTED, CompatError, check_version, require

__all__ = ["SUPPORTED", "CompatError", "check_version", "require", "check_supported", "prepare_megatron"]


def check_supported() -> None:
    """Every guarded library at its supported release series (preflight: fail before any work)."""
    for package in SUPPORTED:
        require(package, "qsparse_dist.compat (all patches)")


def prepare_megatron(cuda: bool | None = None) -> bool:
    """Apply what megatron-core needs on this machine; return whether the CPU shims are active.

    * megatron could not import Transformer Engine (CUDA or not): define the names ``moe_utils``
      leaves undefined;
    * no CUDA (``cuda`` defaults to ``torch.cuda.is_available()``): the CPU shims.
    """
    import torch

    from .megatron import define_missing_te_names

    if cuda is None:
        cuda = torch.cuda.is_available()
    define_missing_te_names()  # a no-op when megatron imported Transformer Engine
    if cuda:
        return False
    from .cpu import enable_cpu_shims

    return enable_cpu_shims()
