"""Batch-1 ternary GEMV side by side: cuBLAS bf16, gemlite's 2-bit GEMVs, our ``ternary_gemv_k16`` (issue 16).

For each decode projection of the two presets (``8b``: qkv 4096x6144, out 4096x4096, fc1 4096x28672,
fc2 14336x4096; ``1b``: 2048x2560, 2048x2048, 2048x11264, 5632x2048; K inputs x N outputs), batch 1:

* ``cublas``: ``F.linear`` on the bf16 weight ``(codes - 1) * scale`` (2 bytes per weight);
* ``gemlite A16W2``: gemlite's BitNet layout (its ``helper.A16W158_INT``: codes {0,1,2} = w + 1, 16 per
  int32 word, integer zero point 1, one fp32 scale per output row, post-scaled), bf16 activations,
  each of its batch-1 kernels (``GEMV_REVSPLITK``, gemlite's default at M = 1 for < 8 bits, and
  ``GEMV``) after gemlite's own Triton autotune (``--gemlite-autotune``, default "fast"); the faster
  kernel is reported;
* ``gemlite A8W2``: the same weights with int8 activations (its ``helper.A8W158_INT_dynamic``): the
  public forward (per-token int8 quantization of x, then the GEMV) and the GEMV alone on a
  pre-quantized x, which is what our kernel is given;
* ``k16``: ``qsparse_dist.kernels.ternary_dp4a.ternary_gemv_k16`` with ``default_k16_config`` on int8
  x + scale, timed as ``tools/bench_decode.py`` times it (output buffer zeroed once, as in the decode
  graph) and, like gemlite, zeroing its output on every call; without programmatic dependent launch
  (PDL; gemlite's kernels have none) and, where ``qsparse_dist.kernels.pdl`` supports it, with it.

Timing: every call in a CUDA graph over enough weight copies to exceed 4x the L2 (HBM, not L2,
numbers), median of replays (``_bench_common.graph_time_ms``).  ``%`` = bytes the kernel must read
(weights as stored + scales) / time / the copy bandwidth measured in the same run.  Correctness first:
each kernel's output against the float64 product of its own inputs (``x @ ((codes - 1) * scale)``; for
the int8 paths x quantized per token with absmax / 127), relative L2 error printed.

gemlite (mobiusml, Apache-2.0) is optional and not a dependency of the package: without it the tool
exits 2.  BitBLAS is not measured: its wheel is 82 MB (more than a GPU run can carry) and it needs a
TVM built for CUDA 12.

    python tools/bench_gemlite.py --json docs/bench/gemlite_vs_ternary_h200.json
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import copy_bandwidth_gbs, env_info, graph_time_ms, print_table, write_json  # noqa: E402

SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "8b": [("qkv", 4096, 6144), ("out", 4096, 4096), ("fc1", 4096, 28672), ("fc2", 14336, 4096)],
    "1b": [("qkv", 2048, 2560), ("out", 2048, 2048), ("fc1", 2048, 11264), ("fc2", 5632, 2048)],
}
GEMLITE_KERNELS = ("GEMV_REVSPLITK", "GEMV")
_GEMLITE_MODULES = {"GEMV_REVSPLITK": "gemlite.triton_kernels.gemv_revsplitK_kernels",
                    "GEMV": "gemlite.triton_kernels.gemv_kernels"}
W_SCALE = 0.0173  # any positive per-tensor scale; the BitNet absmean scale of a trained layer is of this order

COLS = ["proj", "K", "N", "cublas_us", "cublas_%", "gl_a16_us", "gl_a16_%", "gl_a16_kernel", "gl_a16_err",
        "gl_a8_us", "gl_a8_gemv_us", "gl_a8_%", "gl_a8_err", "k16_us", "k16_%", "k16_zeroing_us", "k16_pdl_us",
        "k16_err",
        "k16_vs_gl_a16", "k16_vs_gl_a8_gemv"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="8b,1b", help=f"comma list of {','.join(SHAPES)}")
    p.add_argument("--gemlite-kernels", default=",".join(GEMLITE_KERNELS),
                   help="gemlite matmul types to time at batch 1 (the fastest is reported)")
    p.add_argument("--gemlite-autotune", default="fast", choices=("fast", "max", "default"),
                   help="gemlite's autotune setting (its default: fast)")
    p.add_argument("--no-a8", action="store_true", help="skip gemlite's int8-activation path")
    p.add_argument("--warm-procs", type=int, default=0,
                   help="first compile gemlite's autotune candidates in this many parallel processes (fills "
                        "Triton's disk cache; the timed autotune then runs alone on the GPU)")
    p.add_argument("--warm-timeout-s", type=float, default=90.0, help="stop the --warm-procs workers after this")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="start no new projection after this many seconds (0: no limit); JSON is written "
                        "after every projection")
    p.add_argument("--iters", type=int, default=30, help="graph replays per timing (median)")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--warm-only", default="", help=argparse.SUPPRESS)  # "K,N,a16|a8": a --warm-procs worker
    return p.parse_args(argv)


def _import_gemlite():
    try:
        import gemlite  # noqa: F401
        from gemlite.core import GEMLITE_TRITON_MAPPING, DType, GemLiteLinearTriton
    except Exception as e:  # ImportError, or gemlite's import-time CUDA query failing
        return None, f"{type(e).__name__}: {e}"
    return (gemlite, GemLiteLinearTriton, DType, GEMLITE_TRITON_MAPPING), None


def _gemlite_setup(gl, autotune: str) -> None:
    """gemlite's autotune candidate list (``gemlite.set_autotune`` reloads its kernel modules, but
    ``gemlite.core`` keeps the kernels it imported first, so the list is set on those), and a shorter
    benchmark per candidate (5 ms warm-up, 20 ms of repetitions instead of Triton's 25 / 100)."""
    import importlib

    import triton

    get = {"fast": "get_fast_autotune_config", "max": "get_max_autotune_config", "default": "get_default_config"}
    for mt in GEMLITE_KERNELS:
        module = importlib.import_module(_GEMLITE_MODULES[mt])
        for kern in gl[3][mt].kernel:
            kern.configs = getattr(module, get[autotune])()
            if hasattr(kern, "_do_bench"):
                kern._do_bench = functools.partial(triton.testing.do_bench, warmup=5, rep=20)


def gemlite_ternary(gl, w_q: torch.Tensor, scale: float, a8: bool, dtype: torch.dtype = torch.bfloat16):
    """gemlite layer for ``y = x @ ((codes - 1) * scale)^T``, as its ``A16W158_INT`` / ``A8W158_INT_dynamic``
    helpers build it (the helpers leave the scales on the CPU; here everything is on the weight's device)."""
    _, GemLiteLinearTriton, DType, _ = gl
    n, k = w_q.shape
    io = DType.BF16 if dtype == torch.bfloat16 else DType.FP16
    lin = GemLiteLinearTriton(2, group_size=k, in_features=k, out_features=n,
                              input_dtype=DType.INT8 if a8 else io, output_dtype=io,
                              scaled_activations=a8)
    codes = (w_q + 1).to(torch.uint8)
    scales = torch.full((n, 1), scale, dtype=torch.float32, device=w_q.device)
    lin.pack(codes, scales=scales, zeros=1)
    lin.W_group_mode = 1  # integer zero point only (shift), as the helpers set it
    lin.channel_scale_mode = 3 if a8 else 1  # post-scale by activation x weight scale / by weight scale
    return lin


def gemlite_gemv_only(gl, lin, x_q: torch.Tensor, x_s: torch.Tensor, matmul_type: str) -> torch.Tensor:
    """gemlite's GEMV on an already int8 x (what ``gemlite.core.forward_functional`` runs after its
    per-token activation quantization), so that it gets the same input as ours."""
    meta, targs = lin.get_meta_args(), lin.get_tensor_args()
    type_id = meta[5] * 100 + meta[1]
    return gl[3][matmul_type].forward(x_q, *targs[:3], x_s, *meta[1:-1], bool(meta[1]), type_id,
                                      meta_scale=0.0)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: ``x ≈ q · s``, ``s = max|x| / 127`` (gemlite's and BitNet's rule)."""
    s = (x.float().abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-6)
    return (x.float() / s).round().clamp(-127, 127).to(torch.int8), s


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def n_copies(nbytes: int, l2: int) -> int:
    return max(2, -(-4 * l2 // nbytes))


def per_call_us(fn_list, iters: int) -> float:
    return graph_time_ms(lambda: [f() for f in fn_list], iters=iters) * 1e3 / len(fn_list)


def measure(gl, name: str, k: int, n: int, kernels: list[str], a8: bool, bw: float, iters: int) -> dict:
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    g = torch.Generator(device=dev).manual_seed(k * 100003 + n)
    w_q = torch.randint(-1, 2, (n, k), device=dev, dtype=torch.int8, generator=g)
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16, generator=g)
    wd = w_q.double() * W_SCALE
    ref = x.double() @ wd.t()
    x_q, x_s = quantize_int8(x)
    ref_q = (x_q.double() * x_s.double()) @ wd.t()
    r: dict = {"proj": name, "K": k, "N": n}

    # (a) cuBLAS bf16
    w_bf = (w_q.float() * W_SCALE).to(torch.bfloat16)
    r["cublas_err"] = rel_err(F.linear(x, w_bf), ref)
    ws = [w_bf.clone() for _ in range(n_copies(w_bf.nbytes, l2))]
    r["cublas_us"] = per_call_us([functools.partial(F.linear, x, w) for w in ws], iters)
    r["cublas_%"] = 100 * w_bf.nbytes / (r["cublas_us"] * 1e3) / bw
    ws = w_bf = None
    torch.cuda.empty_cache()

    # (b) gemlite A16W2 and A8W2
    for mode in (("a16", "a8") if a8 else ("a16",)) if gl is not None else ():
        try:
            r.update(_gemlite_mode(gl, mode, w_q, x, x_q, x_s, ref_q if mode == "a8" else ref, kernels, l2, bw, iters))
        except Exception as e:  # recorded; the other columns are still measured
            r[f"gl_{mode}_error"] = repr(e)[:400]
        torch.cuda.empty_cache()

    # (c) ours: k16 dp4a on int8 x
    try:
        r.update(_k16(w_q, x_q, x_s, ref, ref_q, l2, bw, iters))
    except Exception as e:  # recorded; the other columns are still measured
        r["k16_error"] = repr(e)[:400]
    if "gl_a16_us" in r and "k16_us" in r:
        r["k16_vs_gl_a16"] = r["gl_a16_us"] / r["k16_us"]
    if "gl_a8_gemv_us" in r and "k16_us" in r:
        r["k16_vs_gl_a8_gemv"] = r["gl_a8_gemv_us"] / r["k16_us"]
    return r


def _k16(w_q, x_q, x_s, ref, ref_q, l2: int, bw: float, iters: int) -> dict:
    """Our ``ternary_gemv_k16`` (``default_k16_config``) on the int8 x, timed as tools/bench_decode.py does."""
    from qsparse_dist.kernels.ternary_dp4a import default_k16_config, pack_k16, ternary_gemv_k16
    from qsparse_dist.ops import pack_ternary

    r: dict = {}
    n, k = w_q.shape
    dev = w_q.device
    p0 = pack_k16(pack_ternary(w_q), k)
    w_s = torch.tensor(W_SCALE, device=dev)
    cfg = default_k16_config(k, n, dev)
    xs1 = x_s.reshape(1)
    r["k16_err"] = rel_err(ternary_gemv_k16(x_q, xs1, p0, w_s, skip_zeros=False, config=cfg), ref_q)
    r["k16_err_vs_bf16_x"] = rel_err(ternary_gemv_k16(x_q, xs1, p0, w_s, skip_zeros=False, config=cfg), ref)
    ps = [p0] + [p0.clone() for _ in range(n_copies(p0.nbytes, l2) - 1)]
    outs = torch.zeros(len(ps), 1, n, device=dev)
    pdl = _pdl_module()
    r["pdl_default"] = bool(pdl and pdl.enabled(dev))
    for key, pdl_on in [("k16", False)] + ([("k16_pdl", True)] if pdl and pdl.pdl_supported(dev) else []):
        old = pdl.ENABLED if pdl else None
        if pdl:
            pdl.ENABLED = pdl_on
        try:  # a failure with PDL leaves the PDL-off numbers
            r[f"{key}_us"] = per_call_us([functools.partial(ternary_gemv_k16, x_q, xs1, p, w_s, skip_zeros=False,
                                                            config=cfg, out=outs[i], out_is_zeroed=True)
                                          for i, p in enumerate(ps)], iters)
            r[f"{key}_zeroing_us"] = per_call_us([functools.partial(ternary_gemv_k16, x_q, xs1, p, w_s,
                                                                    skip_zeros=False, config=cfg, out=outs[i])
                                                  for i, p in enumerate(ps)], iters)
        except Exception as e:
            if not pdl_on:
                raise
            r[f"{key}_error"] = repr(e)[:400]
        finally:
            if pdl:
                pdl.ENABLED = old
    r["k16_bytes"] = p0.nbytes + 4
    r["k16_%"] = 100 * r["k16_bytes"] / (r["k16_us"] * 1e3) / bw
    r["k16_config"] = cfg.__dict__
    return r


def _gemlite_mode(gl, mode: str, w_q, x, x_q, x_s, ref, kernels: list[str], l2: int, bw: float,
                  iters: int) -> dict:
    """Time every gemlite batch-1 kernel for one activation mode ("a16" bf16 / "a8" int8); best kept."""
    r: dict = {}
    k, n = w_q.shape[1], w_q.shape[0]
    lin0 = gemlite_ternary(gl, w_q, W_SCALE, a8=mode == "a8")
    nbytes = lin0.W_q.nbytes + lin0.scales.nbytes
    lins = [lin0] + [gemlite_ternary(gl, w_q, W_SCALE, a8=mode == "a8") for _ in range(n_copies(nbytes, l2) - 1)]
    r[f"gl_{mode}_bytes"] = nbytes
    for mt in kernels:
        try:
            y = lin0.forward_manual(x, mt)  # autotunes this shape on the first call
            torch.cuda.synchronize()
            r[f"gl_{mode}_{mt}_err"] = rel_err(y, ref)
            r[f"gl_{mode}_{mt}_us"] = per_call_us([functools.partial(lin.forward_manual, x, mt) for lin in lins], iters)
            r[f"gl_{mode}_{mt}_config"] = _tuned_config(gl, mt, k, n)
            if mode == "a8":
                r[f"gl_a8_{mt}_gemv_err"] = rel_err(gemlite_gemv_only(gl, lin0, x_q, x_s, mt), ref)
                r[f"gl_a8_{mt}_gemv_us"] = per_call_us(
                    [functools.partial(gemlite_gemv_only, gl, lin, x_q, x_s, mt) for lin in lins], iters)
        except Exception as e:  # recorded; the other kernel is still measured
            r[f"gl_{mode}_{mt}_error"] = repr(e)[:400]
    timed = [mt for mt in kernels if f"gl_{mode}_{mt}_us" in r]
    if timed:
        mt = min(timed, key=lambda m: r[f"gl_{mode}_{m}_us"])
        r[f"gl_{mode}_us"], r[f"gl_{mode}_kernel"], r[f"gl_{mode}_err"] = (
            r[f"gl_{mode}_{mt}_us"], mt, r[f"gl_{mode}_{mt}_err"])
        if mode == "a16":
            r["gl_a16_%"] = 100 * nbytes / (r["gl_a16_us"] * 1e3) / bw
    gemv = [r[f"gl_a8_{m}_gemv_us"] for m in timed if f"gl_a8_{m}_gemv_us" in r]
    if mode == "a8" and gemv:
        r["gl_a8_gemv_us"] = min(gemv)
        r["gl_a8_%"] = 100 * nbytes / (r["gl_a8_gemv_us"] * 1e3) / bw
    return r


def _pdl_module():
    """``qsparse_dist.kernels.pdl`` where this tree has it (programmatic dependent launch), else None."""
    try:
        from qsparse_dist.kernels import pdl
    except ImportError:
        return None
    return pdl


def _tuned_config(gl, matmul_type: str, k: int, n: int) -> str:
    """The config gemlite's autotuner picked for this shape (its cache key starts with M, N, K)."""
    for kern in gl[3][matmul_type].kernel:
        for key, cfg in getattr(kern, "cache", {}).items():
            if tuple(key[:3]) == (1, n, k):
                return str(cfg)
    return ""


def warm_worker(gl, spec: str, kernels: list[str]) -> int:
    """--warm-procs worker: build one shape's gemlite layer and call each kernel once (autotune +
    compile into Triton's disk cache); timings taken here are discarded."""
    k, n, mode = spec.split(",")
    w_q = torch.randint(-1, 2, (int(n), int(k)), device="cuda", dtype=torch.int8)
    x = torch.randn(1, int(k), device="cuda", dtype=torch.bfloat16)
    lin = gemlite_ternary(gl, w_q, W_SCALE, a8=mode == "a8")
    failed = 0
    for mt in kernels:
        try:
            lin.forward_manual(x, mt)
            if mode == "a8":
                x_q, x_s = quantize_int8(x)
                gemlite_gemv_only(gl, lin, x_q, x_s, mt)
            torch.cuda.synchronize()
        except Exception as e:  # the timed run records the error; warm the other kernel anyway
            print(f"{mt}: {e!r}"[:400], flush=True)
            failed = 1
    return failed


def warm_cache(specs: list[str], args: argparse.Namespace) -> float:
    """Run one worker per (shape, activation dtype), ``args.warm_procs`` at a time; returns seconds."""
    t0 = time.time()
    base = [sys.executable, os.path.abspath(__file__), "--gemlite-kernels", args.gemlite_kernels,
            "--gemlite-autotune", args.gemlite_autotune, "--warm-only"]
    pending, running, logs = list(specs), [], {}
    while pending or running:
        if time.time() - t0 > args.warm_timeout_s:  # the timed autotune compiles whatever is left
            for proc in running:
                proc.kill()
                proc.wait()
                logs[proc].close()
            print(f"warm-up stopped after {args.warm_timeout_s:.0f} s: {len(running)} workers killed, "
                  f"{len(pending)} not started", flush=True)
            break
        while pending and len(running) < args.warm_procs:
            spec = pending.pop(0)
            log = open(f"/tmp/bench_gemlite_warm_{spec.replace(',', '_')}.log", "w")  # noqa: SIM115
            running.append(subprocess.Popen(base + [spec], stdout=log, stderr=subprocess.STDOUT))
            logs[running[-1]] = log
        for proc in list(running):
            if proc.poll() is not None:
                running.remove(proc)
                logs[proc].close()
                if proc.returncode:
                    tail = Path(logs[proc].name).read_text().strip().splitlines()[-1:]
                    print(f"warm worker {proc.args[-1]} exited {proc.returncode}: {tail}", flush=True)
        time.sleep(0.2)
    return time.time() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemlite: needs a CUDA GPU", file=sys.stderr)
        return 2
    gl, why = _import_gemlite()
    if gl is None:
        print(f"bench_gemlite: gemlite is not importable ({why}); pip install gemlite", file=sys.stderr)
        return 2
    kernels = [m.strip() for m in args.gemlite_kernels.split(",") if m.strip()]
    bad = [m for m in kernels if m not in GEMLITE_KERNELS]
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if bad or not kernels or any(p not in SHAPES for p in presets):
        print(f"bench_gemlite: --gemlite-kernels must be from {GEMLITE_KERNELS} and --presets from "
              f"{tuple(SHAPES)}", file=sys.stderr)
        return 2
    _gemlite_setup(gl, args.gemlite_autotune)
    if args.warm_only:
        return warm_worker(gl, args.warm_only, kernels)

    t0 = time.time()
    shapes = [(f"{p} {name}", k, n) for p in presets for name, k, n in SHAPES[p]]
    result = {"tool": "bench_gemlite", "env": env_info(), "gemlite": gl[0].__version__,
              "gemlite_autotune": args.gemlite_autotune, "gemlite_kernels": kernels, "w_scale": W_SCALE,
              "argv": sys.argv[1:], "rows": []}
    if args.warm_procs > 0:
        specs = [f"{k},{n},{m}" for _, k, n in shapes for m in (("a16",) if args.no_a8 else ("a16", "a8"))]
        result["warm_cache_s"] = warm_cache(specs, args)
        print(f"gemlite autotune candidates compiled in {result['warm_cache_s']:.1f} s "
              f"({args.warm_procs} processes)", flush=True)
    bw = copy_bandwidth_gbs()
    result["copy_bw_gbs"] = bw
    print(f"copy bandwidth {bw:.0f} GB/s (read + write); gemlite {gl[0].__version__}, autotune "
          f"{args.gemlite_autotune}", flush=True)
    for name, k, n in shapes:
        if args.deadline_s and time.time() - t0 > args.deadline_s:
            result.setdefault("skipped", []).append(name)
            continue
        ts = time.time()
        try:
            row = measure(gl, name, k, n, kernels, not args.no_a8, bw, args.iters)
        except Exception as e:  # keep measuring the rest; the error is part of the record
            row = {"proj": name, "K": k, "N": n, "error": repr(e)[:400]}
        row["wall_s"] = time.time() - ts
        result["rows"].append(row)
        print(row, flush=True)
        if args.json:
            write_json(result, args.json)
        torch.cuda.empty_cache()
    print()
    print(f"µs per call, batch 1; % = bytes read (weights as stored + scales) / time / {bw:.0f} GB/s; "
          "err = relative L2 error vs float64 of the kernel's own inputs")
    print_table(result["rows"], COLS)
    if result.get("skipped"):
        print(f"not measured (--deadline-s): {', '.join(result['skipped'])}")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
