"""Shared GPU timing helpers for tools/bench_kernels.py and tools/bench_decode.py.

Timing: the work is captured in a CUDA graph (launch overhead out of the way, as in a graphed
decode loop), replayed ``iters`` times, each replay timed with CUDA events; the median is reported.
Weight-streaming kernels are timed over ``R`` distinct weight copies per replay (total > 4× L2) so
the numbers are HBM numbers, not L2 numbers.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from pathlib import Path

import torch


def graph_time_ms(fn, iters: int = 30, warmup: int = 3) -> float:
    """Median ms of one call of ``fn`` replayed from a CUDA graph (the package's timer, also used by
    the kernel autotuner, so benchmarks and tuning measure alike)."""
    from qsparse_dist.kernels.tune import time_graph_ms

    return time_graph_ms(fn, iters=iters, warmup=warmup)


def eager_time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the practical HBM ceiling)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = eager_time_ms(lambda: b.copy_(a), iters=10)
    return 2 * nbytes / ms / 1e6


def env_info() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "sms": p.multi_processor_count,
        "l2_bytes": getattr(p, "L2_cache_size", None),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
    }


def write_json(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)
