"""Programmatic Dependent Launch (PDL) for the batch-1 decode kernels (Hopper and later).

A batch-1 decode step is ~10 small kernels per layer.  Without PDL a kernel starts only after its
predecessor has fully finished and the launch pipeline has caught up: a few µs of idle SMs per
launch, even inside one CUDA graph.  With PDL (CUDA's programmatic stream serialization, compute
capability >= 9.0) a kernel launched with ``launch_pdl=True`` may be scheduled while its predecessor
drains; its programs then block in ``griddepcontrol.wait`` (:func:`gdc_wait`) until every
prerequisite grid has completed and its memory is visible.  CUDA graphs capture the launch attribute
as a programmatic edge (CUDA >= 12.3), so the graphed decode step keeps it.

**Safety rule.**  A kernel launched with PDL may run concurrently with its predecessor's tail, so it
must neither read its inputs nor write anything before the wait: :func:`grid_dependency_wait` is the
FIRST statement of every kernel that takes the ``PDL`` constexpr, in every program, unconditionally.
Then transitivity holds too (a kernel that waited cannot complete before its predecessor did), and
a kernel launched without PDL after one launched with it waits for it as usual.  With
``TRIGGER`` the wait is followed at once by ``griddepcontrol.launch_dependents``, which lets the
*next* kernel be scheduled as soon as every program of this one is running; still safe, since the
next kernel's wait covers this kernel's completion, not just its trigger.

Switches: :data:`ENABLED` (``None`` = on wherever :func:`pdl_supported`; the environment variable
``QSPARSE_PDL=0`` off, ``1`` wait only, ``2`` wait + early trigger overrides ``None``) and :data:`TRIGGER`
(``None`` = the trigger, unless ``QSPARSE_PDL=1``).  Off on CPU and under ``TRITON_INTERPRET=1`` (the kernels' ``PDL`` constexpr stays
``False``, the interpreter never sees the instructions).

Measured (one H200, Triton 3.6, CUDA 13.0, 8B widths with 8 layers, bf16, batch 1, one CUDA graph per
step; ``tools/bench_decode.py`` kinds ``+nopdl`` / ``+trigger``; docs/bench/decode_pdl_probe_2026-11-29.json):
wait only (the default) +0.3 % dense, +0.3 % Q-Sparse, +1.9 % BitNet (dense, Q-Sparse: within noise);
wait + early trigger: +0.3 % dense, **+8.4 % BitNet** (0.602 -> 0.556 ms per step: ~5.8 µs per layer of
10 launches).  Without the trigger a dependent kernel can only start once every program of its
predecessor has exited, which saves little; dense gains nothing either way because its GEMVs are cuBLAS
kernels, which neither wait nor trigger.  At the 1.1B shape (32 layers' worth of launches) BitNet 1034 ->
1153 tok/s (+11.5 %) with the trigger, greedy tokens identical; the fp32 graph replay (8B widths, 2
layers, 4 positions) gives bit-identical logits with PDL off, wait-only and wait + trigger — the trigger
is therefore the default (docs/benchmarks.md, third session).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.3 (NVIDIA backend); absent elsewhere: PDL then reports unsupported
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None

__all__ = ["ENABLED", "TRIGGER", "pdl_supported", "enabled", "launch_kwargs", "grid_dependency_wait",
           "env_setting"]

#: ``None`` = auto (``QSPARSE_PDL`` if set, else :func:`pdl_supported`); ``True`` / ``False`` force it
#: (``True`` is still refused where unsupported).
ENABLED: bool | None = None
#: Call ``launch_dependents`` right after the wait (``None`` = auto: yes, unless ``QSPARSE_PDL=1``).
TRIGGER: bool | None = None


def env_setting(value: str | None = None) -> int | None:
    """``QSPARSE_PDL`` parsed: ``None`` (unset or empty: the default, wait + early trigger), 0 (off), 1 (wait
    only), 2 (wait + early trigger).

    Raises ValueError naming the variable for anything else."""
    raw = os.environ.get("QSPARSE_PDL") if value is None else value
    if raw is None or raw.strip() == "":
        return None
    v = raw.strip().lower()
    table = {"0": 0, "off": 0, "false": 0, "1": 1, "on": 1, "true": 1, "2": 2, "trigger": 2}
    if v not in table:
        raise ValueError(f"QSPARSE_PDL must be 0, 1 or 2 (2 = with early trigger), got {raw!r}")
    return table[v]


@functools.cache
def _triton_has_pdl() -> bool:
    if gdc_wait is None or gdc_launch_dependents is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def _device_supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_supported(device: torch.device | str | None) -> bool:
    """True on a CUDA device of compute capability >= 9.0, with a Triton that has ``gdc_wait`` and the
    ``launch_pdl`` launch option, not under the Triton interpreter."""
    if device is None:
        return False
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    if not _triton_has_pdl():
        return False
    return _device_supported(device.index if device.index is not None else torch.cuda.current_device())


def enabled(device: torch.device | str | None) -> bool:
    """Whether the decode kernels launch on ``device`` with PDL now (:data:`ENABLED`, ``QSPARSE_PDL``)."""
    want = ENABLED
    if want is None:
        env = env_setting()
        want = True if env is None else env > 0
    return bool(want) and pdl_supported(device)


def _trigger() -> bool:
    if TRIGGER is not None:
        return TRIGGER
    return env_setting() != 1


def launch_kwargs(device: torch.device | str | None) -> dict:
    """Keywords for a launch of a kernel taking the ``PDL`` constexpr: ``{"PDL": 1 or 2,
    "launch_pdl": True}`` when :func:`enabled` (2 = wait then trigger the dependents), else ``{}``."""
    if not enabled(device):
        return {}
    return {"PDL": 2 if _trigger() else 1, "launch_pdl": True}


@triton.jit
def grid_dependency_wait(PDL: tl.constexpr):
    """First statement of a PDL-launched kernel: wait for the predecessor grids (``PDL`` >= 1), then,
    with ``PDL == 2``, let the next kernel launch.  ``PDL`` false: nothing (the interpreter's path)."""
    if PDL:
        gdc_wait()
        if PDL == 2:
            gdc_launch_dependents()
