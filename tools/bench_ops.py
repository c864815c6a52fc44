#!/usr/bin/env python
"""Time the Q-Sparse / BitNet b1.58 ops of ``qsparse_dist.ops`` on realistic activation shapes.

Variants (activation ``x [tokens, features]``, weight ``w [features, features]``, sparsity ``s``):

    topk_threshold        k-th largest |x| per row with ``torch.topk``  (``topk_threshold(..., "topk")``)
    kthvalue_threshold    the same value with ``torch.kthvalue``          (``method="kthvalue"``)
    sparsify_topk         full ``topk_sparsify`` (threshold + lowest-index tie rule + mask), topk
    sparsify_kthvalue     full ``topk_sparsify`` with ``method="kthvalue"``
    block_nm              Block Q-Sparse N:M (``block_size``, default 32 → 16:32 at s = 0.5)
    int8_fake_quant       per-token absmax int8 fake-quant of x
    ternary_fake_quant    per-tensor absmean ternary fake-quant of w
    prepare_qsparse       ``LinearRecipe("qsparse", s).prepare_input(x)``
    prepare_bitnet_qsparse ``LinearRecipe("bitnet_qsparse", s).prepare_input(x)`` (top-K then int8)

On CUDA the ops dispatch the top-K variants (``sparsify_*``, ``block_nm``, ``prepare_*``) to the fused
Triton kernels of ``qsparse_dist.kernels`` (registered into ``qsparse_dist.ops.dispatch``); the table's ``path``
column says which code ran, and ``--torch-only`` (``QSPARSE_TRITON=0``) times the torch reference.

Forward only, under ``torch.no_grad()``.  CUDA: CUDA events, ``--warmup`` untimed calls, median of
``--repeat``; CPU: ``time.perf_counter`` the same way.  "GB/s" = bytes of the op's main input
(``x``, or ``w`` for the ternary quant) divided by the median time — a read-once lower bound on
traffic, useful to compare variants, not a roofline.

    python tools/bench_ops.py --quick --out docs/bench/ops_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import qsparse_dist.kernels  # noqa: F401  registers the Triton kernels the ops dispatch to (ops.dispatch)
from qsparse_dist.ops import (
    LinearRecipe,
    fake_quant_activation_int8,
    fake_quant_weight_ternary,
    kept_count,
    topk_sparsify,
    topk_threshold,
)

FULL_SHAPES = [(t, f) for t in (4096, 8192, 16384) for f in (2048, 4096, 8192)]
QUICK_SHAPES = [(4096, 2048), (4096, 8192), (16384, 4096)]
DISPATCHING = {"sparsify_topk", "sparsify_kthvalue", "block_nm", "prepare_qsparse", "prepare_bitnet_qsparse"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_variants(sparsity: float, block_size: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> fn(x, w); each returns a tensor so the work cannot be skipped."""
    qs = LinearRecipe("qsparse", sparsity)
    bq = LinearRecipe("bitnet_qsparse", sparsity)

    def thr(method: str):
        return lambda x, w: topk_threshold(x.abs(), kept_count(x.shape[-1], sparsity), method)

    return {
        "topk_threshold": thr("topk"),
        "kthvalue_threshold": thr("kthvalue"),
        "sparsify_topk": lambda x, w: topk_sparsify(x, sparsity, method="topk"),
        "sparsify_kthvalue": lambda x, w: topk_sparsify(x, sparsity, method="kthvalue"),
        "block_nm": lambda x, w: topk_sparsify(x, sparsity, block_size=block_size),
        "int8_fake_quant": lambda x, w: fake_quant_activation_int8(x),
        "ternary_fake_quant": lambda x, w: fake_quant_weight_ternary(w),
        "prepare_qsparse": lambda x, w: qs.prepare_input(x),
        "prepare_bitnet_qsparse": lambda x, w: bq.prepare_input(x),
    }


def code_path(variant: str, x: torch.Tensor) -> str:
    """"triton" when the ops hand this variant's input to the Triton kernels, else "torch"."""
    if variant not in DISPATCHING:
        return "torch"
    try:
        from qsparse_dist.ops.dispatch import triton_kernels_for
    except ImportError:
        return "torch"
    return "triton" if triton_kernels_for(x) else "torch"


def time_call(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeat: int) -> list[float]:
    """Per-call wall times in milliseconds (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
            del out
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
            del out
    return times


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            t, f = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not TOKENSxFEATURES (e.g. 4096x2048)") from None
        shapes.append((t, f))
    return shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES} instead of the 3×3 grid")
    p.add_argument("--shapes", help="comma list TOKENSxFEATURES, overrides --quick / the grid")
    p.add_argument("--dtypes", help="comma list of fp32,bf16,fp16 (default: fp32 on CPU, fp32,bf16 on CUDA)")
    p.add_argument("--variants", help="comma list, default all: " + ",".join(make_variants(0.5, 32)))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=None, help="default 1 on CPU, 5 on CUDA")
    p.add_argument("--repeat", type=int, default=None, help="default 3 on CPU, 20 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--torch-only", action="store_true", help="QSPARSE_TRITON=0: time the torch reference ops")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    if args.torch_only:
        os.environ["QSPARSE_TRITON"] = "0"
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    repeat = args.repeat if args.repeat is not None else (20 if cuda else 3)
    shapes = parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick else FULL_SHAPES)
    dtype_names = (args.dtypes or ("fp32,bf16" if cuda else "fp32")).split(",")
    for name in dtype_names:
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: unknown {name!r}, choose from {sorted(DTYPES)}")
    variants = make_variants(args.sparsity, args.block_size)
    chosen = args.variants.split(",") if args.variants else list(variants)
    for name in chosen:
        if name not in variants:
            raise SystemExit(f"--variants: unknown {name!r}, choose from {list(variants)}")
    for _, f in shapes:
        if f % args.block_size:
            raise SystemExit(f"--block-size {args.block_size} does not divide features={f}")

    meta = machine_info(device)
    meta.update(device=str(device), warmup=warmup, repeat=repeat, sparsity=args.sparsity,
                block_size=args.block_size, torch_only=args.torch_only, shapes=[f"{t}x{f}" for t, f in shapes], quick=args.quick)
    print(f"# {meta.get('gpu') or meta.get('cpu', 'cpu')} | torch {meta['torch']} | threads "
          f"{meta['torch_threads']} | warmup {warmup} repeat {repeat} | sparsity {args.sparsity}")
    header = f"{'shape':>12} {'dtype':>5} {'variant':<24} {'path':<6} {'median ms':>10} {'min ms':>9} {'GB/s':>7}"
    print(header)
    print("-" * len(header))
    results = []
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for dname in dtype_names:
            dtype = DTYPES[dname]
            for tokens, feats in shapes:
                x = torch.randn(tokens, feats, device=device, dtype=torch.float32, generator=gen).to(dtype)
                w = None
                if "ternary_fake_quant" in chosen:
                    w = torch.randn(feats, feats, device=device, dtype=torch.float32, generator=gen).to(dtype)
                for name in chosen:
                    fn = variants[name]
                    times = time_call(functools.partial(fn, x, w), device, warmup, repeat)
                    med = statistics.median(times)
                    src = w if name == "ternary_fake_quant" else x
                    gbs = src.numel() * src.element_size() / (med * 1e-3) / 1e9
                    path = code_path(name, x)
                    row = {"tokens": tokens, "features": feats, "dtype": dname, "variant": name, "path": path,
                           "median_ms": round(med, 4), "min_ms": round(min(times), 4),
                           "times_ms": [round(t, 4) for t in times], "input_gb_per_s": round(gbs, 3)}
                    results.append(row)
                    print(f"{tokens:>6}x{feats:<5} {dname:>5} {name:<24} {path:<6} {med:>10.2f} {min(times):>9.2f} {gbs:>7.2f}",
                          flush=True)
                x = w = None  # free before the next shape
                if cuda:
                    torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
