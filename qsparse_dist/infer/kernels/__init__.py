"""Triton kernels for Q-Sparse / BitNet: training (top-K mask, mask+STE, N:M, fused int8 fake-quant)
and decode (sparse GEMV, ternary 2-bit GEMV, both combined).

The torch ops in :mod:`qsparse_dist.ops` are the reference and the CPU path; these kernels compute
the same values (the top-K mask bit for bit, tie rule included) and are used when
:func:`use_triton` says so.  Design and measured numbers: ``docs/kernels.md``.

Switches (environment):
    QSPARSE_TRITON=0   never dispatch to the kernels (torch ops everywhere)
    QSPARSE_TRITON=1   with TRITON_INTERPRET=1 also dispatch CPU tensors (tests of the wiring)
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["triton_available", "use_triton", "make_decode_linear"]


def _patch_old_interpreter_index() -> None:
    """Triton's CPU interpreter before 3.6-ish converts a scalar to a Python int with
    ``int(handle.data)`` on a shape-``(1,)`` array, which numpy >= 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"): every kernel whose loop bound is a kernel argument
    or a loaded value then fails under ``TRITON_INTERPRET=1`` (seen with triton 3.5.1 + numpy 2.4.6).
    Newer interpreters squeeze first; for the old one, wrap its patch hook to do the same.  Only
    touches the interpreter, only when it has the old form."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or not triton_available():
        return
    try:
        import inspect

        from triton.runtime import interpreter
    except Exception:  # pragma: no cover
        return
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_qsparse_patched", False):
        return
    try:
        src = inspect.getsource(orig)
    except (OSError, TypeError):  # pragma: no cover
        return
    if "int(self.handle.data)" not in src:
        return

    @functools.wraps(orig)
    def patched(tensor, *args, **kwargs):
        orig(tensor, *args, **kwargs)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    patched._qsparse_patched = True
    interpreter._patch_lang_tensor = patched


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    """Whether the ops should run the Triton kernels for tensor ``x``."""
    flag = os.environ.get("QSPARSE_TRITON", "")
    if flag == "0" or not triton_available():
        return False
    if x.is_cuda:
        return True
    return flag == "1" and os.environ.get("TRITON_INTERPRET", "0") == "1"


_patch_old_interpreter_index()


def make_decode_linear(recipe, weight, bias, packed):
    """Runtime kernel backend (see :mod:`.decode_linear`); imported lazily so that importing this
    package stays free of the runtime."""
    from .decode_linear import make_decode_linear as make

    return make(recipe, weight, bias, packed)
