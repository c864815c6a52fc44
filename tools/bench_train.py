"""Training throughput: dense vs Q-Sparse vs BitNet+Q-Sparse at equal shapes, in one run.

Runs the real training job (``qsparse_dist.train.loop.train``: megatron-core model in the DeepSpeed
engine) once per linear kind with identical model, batch, parallel layout and data, skips the first
``--warmup`` steps, and reports step time, tokens/s, model TFLOP/s and MFU (formula in
``qsparse_dist.train.metrics``) plus each kind's throughput relative to dense.  ``--rounds R`` repeats
the kinds in turn R times; the reported step time is the **minimum** over all timed steps (robust on a
shared machine, where other processes only ever add time) with the median beside it.  MFU uses one
peak for all kinds: ``logging.peak_tflops`` if given, else the best of several ``torch.mm`` probes
taken between rounds (CPU) or the GPU's datasheet value.

    python tools/bench_train.py [--preset cpu|gpu-125m|gpu-1.3b] [--steps 12] [--warmup 4] [--rounds 2] [--json out.json] [key=value ...]
    python tools/bench_train.py --preset gpu-1.3b --kinds dense qsparse --profile dense --profile-json prof.json
    torchrun --nproc-per-node 2 tools/bench_train.py parallel.tp=2       (every rank runs it; rank 0 reports)

Kinds: ``dense``, ``qsparse``, ``block_qsparse`` (N:M in blocks of 32), ``bitnet``, ``bitnet_qsparse``;
``dense_unfused`` = dense with the fused kernels off (``QSPARSE_FUSED=0``: eager RMSNorm, GLU and RoPE);
``moe_qsparse`` = the model of ``configs/moe_8x_qsparse.yaml`` (8 experts, top-2, Q-Sparse experts) at
EP = 1 and ``moe_dense_ref`` = the dense model of the same active size (its trunk with FFN
``top_k × expert FFN``), both at the preset's batch.  A kind that fails is recorded with its error.
On CUDA each kind's peak memory (``torch.cuda.max_memory_allocated``) is reported, and MFU is given
against the measured bf16 matmul peak (best of 8192³ ``torch.mm`` probes) beside the datasheet's.

``--profile KIND ...`` profiles one optimizer step (the first timed one) of those kinds with
``torch.profiler`` and writes the GPU time per category (GEMM, attention, norm, GLU, RoPE, top-K,
elementwise, copies, reductions, optimizer, ...) and the top kernels to ``--profile-json``.

Data: ``--data DIR`` (a prepare-data directory) or, by default, the standard library's pydoc_data
topics prepared once into ``runs/bench_train/data`` (the content does not affect the timing).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_DENSE = ["sparsity.linear=dense", "sparsity.qkv=0", "sparsity.out=0", "sparsity.up=0", "sparsity.down=0"]
KINDS = {
    "dense": _DENSE,
    "qsparse": ["sparsity.linear=qsparse"],
    "block_qsparse": ["sparsity.linear=block_qsparse", "sparsity.block_size=32"],
    # 2:4 Block Q-Sparse (issue 20): default (dense GEMM, one-pass 2:4 selection) and on sparse tensor cores
    "block24": ["sparsity.linear=block_qsparse", "sparsity.block_size=4", *[f"sparsity.{p}=0.5" for p in
                                                                           ("qkv", "out", "up", "down")]],
    "block24_stc": ["sparsity.linear=block_qsparse", "sparsity.block_size=4", "sparsity.sparse_tensor_cores=on",
                    *[f"sparsity.{p}=0.5" for p in ("qkv", "out", "up", "down")]],
    "bitnet": ["sparsity.linear=bitnet"],
    "bitnet_qsparse": ["sparsity.linear=bitnet_qsparse"],
    "dense_unfused": _DENSE,
    "moe_qsparse": ["sparsity.linear=qsparse"],
    "moe_dense_ref": _DENSE,
}
DEFAULT_KINDS = ["dense", "qsparse", "bitnet_qsparse"]
UNFUSED_KINDS = {"dense_unfused"}
MOE_CONFIG = ROOT / "configs" / "moe_8x_qsparse.yaml"


def _kind_patch(kind: str) -> dict:
    """Model changes of the MoE kinds (from ``configs/moe_8x_qsparse.yaml``; EP = 1)."""
    if kind not in ("moe_qsparse", "moe_dense_ref"):
        return {}
    import yaml

    model = yaml.safe_load(MOE_CONFIG.read_text())["model"]
    moe = model.pop("moe")
    if kind == "moe_dense_ref":
        model["ffn_hidden_size"] = moe["router_topk"] * (moe.get("ffn_hidden_size") or model["ffn_hidden_size"])
        return {"model": model}
    moe["dispatcher"] = "alltoall"
    return {"model": {**model, "moe": moe}, "parallel": {"ep": 1}}


def _merge(base: dict, patch: dict) -> dict:
    for k, v in patch.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base

PRESETS = {
    # small enough for a shared 2-core CPU, large enough that matmuls dominate
    "cpu": {"model": {"hidden_size": 256, "num_layers": 4, "num_attention_heads": 4, "ffn_hidden_size": 704,
                      "seq_length": 256, "ffn_activation": "relu2glu"},
            "sparsity": {"qkv": 0.4, "out": 0.4, "up": 0.4, "down": 0.5},
            "data": {"micro_batch_size": 4, "global_batch_size": 8},
            "train": {"dtype": "fp32"}},
    "gpu-125m": {"model": {"hidden_size": 768, "num_layers": 12, "num_attention_heads": 12, "ffn_hidden_size": 2048,
                           "seq_length": 2048, "ffn_activation": "relu2glu"},
                 "sparsity": {"qkv": 0.4, "out": 0.4, "up": 0.4, "down": 0.5},
                 "data": {"micro_batch_size": 8, "global_batch_size": 64},
                 "parallel": {"zero_stage": 1},
                 "train": {"dtype": "bf16"}},
    # issue 17's shape: a 1.3B Llama-style model on one H200
    "gpu-1.3b": {"model": {"hidden_size": 2048, "num_layers": 24, "num_attention_heads": 16, "ffn_hidden_size": 5504,
                           "seq_length": 2048, "ffn_activation": "relu2glu"},
                 "sparsity": {"qkv": 0.4, "out": 0.4, "up": 0.4, "down": 0.5},
                 "data": {"micro_batch_size": 8, "global_batch_size": 32},
                 "parallel": {"zero_stage": 1},
                 "train": {"dtype": "bf16"}},
}

_CATEGORIES = [  # (category, substrings of the lower-cased kernel name), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90_", "wgmma")),
    ("topk", ("topk_rows",)),
    ("rmsnorm", ("rms_norm",)),
    ("glu", ("_glu_",)),
    ("rope", ("rope",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("communication", ("nccl",)),
    ("cross_entropy", ("cross_entropy", "softmax", "nll_loss")),
    ("copy", ("copy", "memcpy", "memset", "catarray", "fill")),
    ("reduction", ("reduce", "count_nonzero")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "index", "where")),
]


def _category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in _CATEGORIES if any(k in low for k in keys)), "other")


class _StepProfiler:
    """Profile the optimizer step number ``at`` (counted by a global ``torch.optim`` step hook, so the
    training loop needs no change): the window runs from the end of step ``at`` to the end of ``at+1``."""

    def __init__(self, at: int) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.at, self.count, self.prof, self.summary = at, 0, None, None
        self.torch = torch
        self.handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, *_: object) -> None:
        torch = self.torch
        self.count += 1
        if self.count == self.at:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
        elif self.count == self.at + 1 and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            self.summary = _summarize_profile(self.prof)
            self.prof = None

    def close(self) -> dict | None:
        self.handle.remove()
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None
        return self.summary


def _summarize_profile(prof) -> dict:
    """GPU kernel time (ms) and launches per category and the 40 costliest kernels."""
    from torch.autograd import DeviceType

    cats: dict[str, list[float]] = {}
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        us = float(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) or 0.0)
        c = cats.setdefault(_category(e.name), [0.0, 0])
        c[0] += us / 1e3
        c[1] += 1
        k = kernels.setdefault(e.name[:160], [0.0, 0])
        k[0] += us / 1e3
        k[1] += 1
    total = sum(v[0] for v in cats.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]
    return {"gpu_ms_total": total,
            "categories": {k: {"ms": v[0], "launches": v[1]} for k, v in sorted(cats.items(), key=lambda kv: -kv[1][0])},
            "top_kernels": [{"name": n, "ms": v[0], "launches": v[1], "category": _category(n)} for n, v in top]}


def _matmul_peak_tflops() -> float | None:
    """Best of several bf16 8192³ ``torch.mm`` probes (CUDA events), TFLOP/s; ``None`` off CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    best = 0.0
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            torch.mm(a, b)
        e.record()
        e.synchronize()
        best = max(best, 10 * 2 * n**3 / (s.elapsed_time(e) / 1e3) / 1e12)
    del a, b
    torch.cuda.empty_cache()
    return best


def _default_data() -> str:
    out = ROOT / "runs" / "bench_train" / "data"
    if not (out / "meta.json").exists():
        import pydoc_data.topics as topics

        from qsparse_dist.data import prepare_data

        corpus = out.parent / "pydoc_topics.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in topics.topics.values()))
        prepare_data([str(corpus)], out, vocab_size=2048, valid_fraction=0.0, log=lambda *a: None)
    return str(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="steps excluded from the statistics")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all kinds this many times (interleaved)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--kinds", nargs="+", default=DEFAULT_KINDS, choices=list(KINDS))
    ap.add_argument("--json", default=None, help="write the results here (rank 0; rewritten after every kind)")
    ap.add_argument("--profile", nargs="*", default=[], choices=list(KINDS),
                    help="profile one timed step of these kinds (first round)")
    ap.add_argument("--profile-json", default=None, help="write the per-category profiles here")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="let each run write its final checkpoint (off: the timing does not include it, and a "
                         "1.3B ZeRO checkpoint per kind costs tens of seconds of disk writes)")
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every kind")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1" if "RANK" in os.environ else str(os.cpu_count() or 1))

    import torch.distributed as dist

    from qsparse_dist.config import config_from_dict
    from qsparse_dist.train.loop import train
    from qsparse_dist.train.metrics import FLOPS_FORMULA

    if not args.keep_checkpoints:
        import qsparse_dist.train.loop as loop_module

        loop_module.save_checkpoint = lambda *a, **k: "(skipped by bench_train)"
    rank = int(os.environ.get("RANK", "0"))
    data = args.data or (_default_data() if rank == 0 else None)
    if "RANK" in os.environ:
        from qsparse_dist.train.engine import init_distributed

        init_distributed()
        box = [data]
        dist.broadcast_object_list(box, src=0)
        data = box[0]
    from qsparse_dist.train.metrics import peak_flops_per_device

    def probe_peak() -> float:
        if rank != 0:
            return 0.0
        base_cfg = config_from_dict({"train": {"dtype": PRESETS[args.preset]["train"]["dtype"]}})
        return peak_flops_per_device(base_cfg)[0]

    user_peak = next((float(o.split("=", 1)[1]) for o in args.overrides if o.startswith("logging.peak_tflops=")), None)
    peaks = [] if user_peak else [probe_peak()]
    import torch

    mm_peak = _matmul_peak_tflops() if rank == 0 else None
    steps: dict[str, list[dict]] = {k: [] for k in args.kinds}
    last: dict[str, dict] = {}
    errors: dict[str, str] = {}
    memory: dict[str, float] = {}
    profiles: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_")) if rank == 0 else None

    def report(final: bool) -> None:
        if rank != 0:
            return
        peak = user_peak * 1e12 if user_peak else max(peaks)
        results: dict[str, dict] = {}
        for kind, timed in steps.items():
            if kind in errors and not timed:
                results[kind] = {"error": errors[kind]}
                continue
            if not timed:
                continue
            best = min(timed, key=lambda r: r["step_time_s"])
            world = int(os.environ.get("WORLD_SIZE", "1"))
            results[kind] = {
                "step_time_s_min": best["step_time_s"],
                "step_time_s_median": statistics.median(r["step_time_s"] for r in timed),
                "tokens_per_s": best["tokens_per_s"],
                "model_tflops": best["model_tflops"],
                "mfu": best["model_tflops"] * 1e12 / (peak * world),
                "mfu_of_measured_matmul_peak": best["model_tflops"] / (mm_peak * world) if mm_peak else None,
                "final_loss": last[kind]["loss"], "steps_timed": len(timed),
                "sparsity": last[kind].get("sparsity"),
                "peak_memory_gib": memory.get(kind),
            }
            if kind in errors:
                results[kind]["error"] = errors[kind]
        dense = results.get("dense")
        for r in results.values():
            if "tokens_per_s" in r:
                r["tokens_per_s_vs_dense"] = r["tokens_per_s"] / dense["tokens_per_s"] if dense and "tokens_per_s" in dense else None
        meta = {"date": datetime.date.today().isoformat(), "host": platform.node(),
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
                "world_size": int(os.environ.get("WORLD_SIZE", "1")), "preset": args.preset,
                "preset_config": PRESETS[args.preset], "kinds": {k: KINDS[k] for k in args.kinds},
                "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                "peak_tflops_per_device": peak / 1e12, "measured_matmul_peak_tflops": mm_peak,
                "flops": FLOPS_FORMULA, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "complete": final}
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        if args.profile_json and profiles:
            Path(args.profile_json).write_text(json.dumps({"meta": meta, "profiles": profiles}, indent=2))
        if not final:
            return
        mm = f", measured matmul peak {mm_peak:.0f} TFLOP/s" if mm_peak else ""
        print(f"\n{meta['device']}, world {meta['world_size']}, preset {args.preset} {' '.join(args.overrides)}; "
              f"{args.rounds} round(s) × {args.steps - args.warmup} timed steps; peak {peak / 1e12:.3f} TFLOP/s/device{mm}")
        print("| linear | step time min (median) s | tokens/s | vs dense | model TFLOP/s | MFU | MFU of matmul peak | peak mem GiB |")
        print("|---|---|---|---|---|---|---|---|")
        for kind, r in results.items():
            if "tokens_per_s" not in r:
                print(f"| {kind} | failed: {r['error'][:120]} | | | | | | |")
                continue
            ratio = f"{r['tokens_per_s_vs_dense']:.3f}×" if r["tokens_per_s_vs_dense"] else "–"
            mmfu = f"{100 * r['mfu_of_measured_matmul_peak']:.1f} %" if r["mfu_of_measured_matmul_peak"] else "–"
            mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "–"
            print(f"| {kind} | {r['step_time_s_min']:.3f} ({r['step_time_s_median']:.3f}) | {r['tokens_per_s']:,.0f} | "
                  f"{ratio} | {r['model_tflops']:.1f} | {100 * r['mfu']:.1f} % | {mmfu} | {mem} |")
        for kind, prof in profiles.items():
            cats = ", ".join(f"{c} {v['ms']:.0f}" for c, v in prof["categories"].items())
            print(f"profile {kind}: GPU {prof['gpu_ms_total']:.0f} ms/step: {cats}")

    for rnd in range(args.rounds):
        for kind in args.kinds:
            base = _merge(json.loads(json.dumps(PRESETS[args.preset])), _kind_patch(kind))
            base["data"]["path"] = data
            base.setdefault("train", {}).update(steps=args.steps, log_interval=10**6, eval_interval=0)
            base["checkpoint"] = {"interval": 0}
            base["logging"] = {"tensorboard": False, "progress_bar": False, "peak_tflops": 1.0}
            run_dir = str((tmp or Path("/tmp")) / f"{kind}_{rnd}")
            if "RANK" in os.environ:
                box = [run_dir]
                dist.broadcast_object_list(box, src=0)
                run_dir = box[0]
            cfg = config_from_dict(base, [*KINDS[kind], f"train.run_dir={run_dir}", *args.overrides])
            prev_fused = os.environ.get("QSPARSE_FUSED")
            if kind in UNFUSED_KINDS:
                os.environ["QSPARSE_FUSED"] = "0"
            prof = _StepProfiler(args.warmup) if (rnd == 0 and kind in args.profile and torch.cuda.is_available()) else None
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            try:
                train(cfg)
            except Exception as e:  # noqa: BLE001  (recorded; the other kinds still run)
                errors[kind] = f"{type(e).__name__}: {e}"
                print(f"[bench_train] {kind} failed: {errors[kind]}", flush=True)
            finally:
                if kind in UNFUSED_KINDS:
                    if prev_fused is None:
                        os.environ.pop("QSPARSE_FUSED", None)
                    else:
                        os.environ["QSPARSE_FUSED"] = prev_fused
                if prof is not None and (summary := prof.close()) is not None:
                    profiles[kind] = summary
            if torch.cuda.is_available():
                memory[kind] = max(memory.get(kind, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                gc.collect()
                torch.cuda.empty_cache()
            metrics = Path(run_dir) / "metrics.jsonl"
            if rank == 0 and kind not in errors and metrics.exists():
                rows = [json.loads(line) for line in metrics.read_text().splitlines()]
                steps[kind] += rows[args.warmup:] or rows
                last[kind] = next((r for r in reversed(rows) if "sparsity" in r), rows[-1])
                last[kind] = {**last[kind], "loss": rows[-1]["loss"]}
            report(final=False)
        if not user_peak:
            peaks.append(probe_peak())
    report(final=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
