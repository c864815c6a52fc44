"""All Triton code of the project: training kernels (top-K mask, mask+STE, N:M, fused int8 fake-quant
and BitNet input codes in :mod:`.topk`; the scales around BitNet's integer-code product in
:mod:`.codes_scale`; the fused GLU activation in :mod:`.glu`) and decode kernels (sparse / ternary GEMVs in
:mod:`.gemv` and :mod:`.ternary_dp4a`, radix top-K in :mod:`.select`, the fused decode prologue,
RoPE/KV-cache and attention kernels plus :class:`~.decoder.DecodeLinear` in :mod:`.decoder`, tile
tuning in :mod:`.tune`).

Layering: this package sits ABOVE :mod:`qsparse_dist.ops` (it imports the ops' constants and
reference math) and ``ops`` never imports it.  Instead, importing this package REGISTERS the
kernels into :mod:`qsparse_dist.ops.dispatch` (:func:`_register`): a gate (:func:`use_triton`) and the
named implementations the ops hand work to.  With nothing registered (an export's remote code, a
process that never imported this package) the ops run their torch code.  ``qsparse_dist.layers``
(every model: reference, megatron) and ``qsparse_dist.infer`` (the runtime's backends) import this
package, so training and decode take the Triton path on CUDA exactly as before.  The kernel
submodules (and ``triton`` itself) are imported only on the first dispatched call.

The torch ops are the reference and the CPU path; these kernels compute the same values (the top-K
mask bit for bit, tie rule included).  Design and measured numbers: ``docs/kernels.md``.

Switches (environment):
    QSPARSE_TRITON=0   never dispatch to the kernels (torch ops everywhere)
    QSPARSE_TRITON=1   with TRITON_INTERPRET=1 also dispatch CPU tensors (tests of the wiring)
"""

from __future__ import annotations

import functools
import os

import torch

from ..ops import dispatch

__all__ = ["triton_available", "use_triton"]


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




def _topk_mask(x, sparsity, *, block_size=None):
    from .topk import topk_mask_triton

    return topk_mask_triton(x, sparsity, block_size=block_size)


def _keeps_2_of_4(sparsity) -> bool:
    from ..ops.sparsify import kept_count

    try:
        return kept_count(4, sparsity) == 2
    except ValueError:
        return False


def _topk_sparsify(x, sparsity, *, block_size=None, ste=True, quantize=False):
    if block_size == 4 and ste and not quantize and _keeps_2_of_4(sparsity):  # one-pass 2:4 kernel, same values
        from .sparse24 import sparse24_sparsify_ste

        return sparse24_sparsify_ste(x)
    from .topk import topk_sparsify_triton

    return topk_sparsify_triton(x, sparsity, block_size=block_size, ste=ste, quantize=quantize)


def _sparse24_linear(x, weight, bias=None):
    from .sparse24 import sparse24_linear

    return sparse24_linear(x, weight, bias)


def _topk_codes(x, sparsity, *, block_size=None, ste=True):
    from .codes_scale import topk_codes_triton

    return topk_codes_triton(x, sparsity, block_size=block_size, ste=ste)


def _scale_codes_product(y_int, s_x, s_w, dtype):
    from .codes_scale import scale_codes_product_triton

    return scale_codes_product_triton(y_int, s_x, s_w, dtype)


def _register() -> None:
    """Hand the ops their kernels: ``topk_mask`` (mask only), ``topk_sparsify`` (mask + STE, with
    ``quantize=True`` also the int8 fake-quant, fused), ``topk_codes`` (BitNet's integer codes and
    per-token scales of the top-K input, fused), ``scale_codes_product`` (BitNet's scales after the
    integer-code matmul, one pass each way, :mod:`.codes_scale`), ``sparse24_linear`` (2:4 Block Q-Sparse on sparse
    tensor cores, :mod:`.sparse24`; the layers decide when).  Imports of the submodules wait for the
    first call."""
    dispatch.register_kernels(use_triton, {"topk_mask": _topk_mask, "topk_sparsify": _topk_sparsify,
                                           "topk_codes": _topk_codes, "scale_codes_product": _scale_codes_product,
                                           "sparse24_linear": _sparse24_linear})


_patch_old_interpreter_index()
_register()
