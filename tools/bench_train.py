"""Training throughput: dense vs Q-Sparse vs BitNet+Q-Sparse at equal shapes, in one run.

Runs the real training job (``qsparse_dist.train.loop.train``: megatron-core model in the DeepSpeed
engine) once per linear kind with identical model, batch, parallel layout and data, skips the first
``--warmup`` steps, and reports step time, tokens/s, model TFLOP/s and MFU (formula in
``qsparse_dist.train.metrics``) plus each kind's throughput relative to dense.  ``--rounds R`` repeats
the kinds in turn R times; the reported step time is the **minimum** over all timed steps (robust on a
shared machine, where other processes only ever add time) with the median beside it.  MFU uses one
peak for all kinds: ``logging.peak_tflops`` if given, else the best of several ``torch.mm`` probes
taken between rounds (CPU) or the GPU's datasheet value.

    python tools/bench_train.py [--preset cpu|gpu-125m] [--steps 12] [--warmup 4] [--rounds 2] [--json out.json] [key=value ...]
    torchrun --nproc-per-node 2 tools/bench_train.py parallel.tp=2       (every rank runs it; rank 0 reports)

Data: ``--data DIR`` (a prepare-data directory) or, by default, the standard library's pydoc_data
topics prepared once into ``runs/bench_train/data`` (the content does not affect the timing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = {
    "dense": ["sparsity.linear=dense", "sparsity.qkv=0", "sparsity.out=0", "sparsity.up=0", "sparsity.down=0"],
    "qsparse": ["sparsity.linear=qsparse"],
    "bitnet_qsparse": ["sparsity.linear=bitnet_qsparse"],
}

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
}


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
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--json", default=None, help="write the results here (rank 0)")
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every kind")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1" if "RANK" in os.environ else str(os.cpu_count() or 1))

    import torch.distributed as dist

    from qsparse_dist.config import config_from_dict
    from qsparse_dist.train.loop import train
    from qsparse_dist.train.metrics import FLOPS_FORMULA

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
    steps: dict[str, list[dict]] = {k: [] for k in args.kinds}
    last: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_")) if rank == 0 else None
    for rnd in range(args.rounds):
        for kind in args.kinds:
            base = json.loads(json.dumps(PRESETS[args.preset]))
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
            train(cfg)
            if rank == 0:
                rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
                steps[kind] += rows[args.warmup:] or rows
                last[kind] = rows[-1]
        if not user_peak:
            peaks.append(probe_peak())
    peak = user_peak * 1e12 if user_peak else max(peaks)
    results = {}
    for kind, timed in steps.items():
        if rank != 0:
            break
        best = min(timed, key=lambda r: r["step_time_s"])
        results[kind] = {
            "step_time_s_min": best["step_time_s"],
            "step_time_s_median": statistics.median(r["step_time_s"] for r in timed),
            "tokens_per_s": best["tokens_per_s"],
            "model_tflops": best["model_tflops"],
            "mfu": best["model_tflops"] * 1e12 / (peak * int(os.environ.get("WORLD_SIZE", "1"))),
            "final_loss": last[kind]["loss"], "steps_timed": len(timed), "sparsity": last[kind]["sparsity"],
        }
    if rank != 0:
        return 0
    dense = results.get("dense")
    for r in results.values():
        r["tokens_per_s_vs_dense"] = r["tokens_per_s"] / dense["tokens_per_s"] if dense else None
    import torch

    meta = {"date": datetime.date.today().isoformat(), "host": platform.node(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), "preset": args.preset,
            "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
            "peak_tflops_per_device": peak / 1e12, "flops": FLOPS_FORMULA,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"\n{meta['device']}, world {meta['world_size']}, preset {args.preset} {' '.join(args.overrides)}; "
          f"{args.rounds} round(s) × {args.steps - args.warmup} timed steps; peak {peak / 1e12:.3f} TFLOP/s/device")
    print("| linear | step time min (median) s | tokens/s | vs dense | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for kind, r in results.items():
        ratio = f"{r['tokens_per_s_vs_dense']:.2f}×" if r["tokens_per_s_vs_dense"] else "–"
        print(f"| {kind} | {r['step_time_s_min']:.3f} ({r['step_time_s_median']:.3f}) | {r['tokens_per_s']:,.0f} | "
              f"{ratio} | {r['model_tflops']:.4f} | {100 * r['mfu']:.1f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
