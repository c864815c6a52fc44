"""Run metrics: ``metrics.jsonl`` (one object per optimizer step), tensorboard scalars, a tqdm bar and one
readable console line per log interval — all on global rank 0.

Model FLOPs per trained token ``F_token``: :func:`qsparse_dist.config.shapes.flops_per_token`, where the
formula and what it counts are stated once (:data:`FLOPS_FORMULA` carries its text into the run log).

``model TFLOP/s = F_token · tokens/s / 1e12`` (whole job) and
``MFU = F_token · tokens/s / (peak FLOP/s per device · devices)``; the peak is ``logging.peak_tflops``
when set, else the datasheet dense bf16 peak of a known GPU, else (CPU) a measured ``torch.mm``
throughput of this machine in the training dtype (so CPU MFU reads "fraction of the matmul speed
this machine reached in a probe").
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..config import RunConfig, shapes

__all__ = ["flops_per_token", "FLOPS_FORMULA", "peak_flops_per_device", "MetricsWriter",
           "summarize_sparsity"]

FLOPS_FORMULA = shapes.FLOPS_PER_TOKEN_FORMULA + "; MFU = F_token*tokens_per_s/(peak*devices)"

_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def flops_per_token(cfg: RunConfig) -> float:
    """``F_token`` of the run's model at its ``model.seq_length`` (:func:`~qsparse_dist.config.shapes.flops_per_token`)."""
    return shapes.flops_per_token(cfg.model)


def peak_flops_per_device(cfg: RunConfig, override_tflops: float | None = None) -> tuple[float, str]:
    """``(peak FLOP/s of one device, where the number comes from)``."""
    if override_tflops:
        return override_tflops * 1e12, "logging.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, val in _GPU_PEAK_BF16.items():
            if key in name:
                return val, f"datasheet dense bf16 peak of {name}"
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    n = 512
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        torch.mm(a, b)
        reps += 1
    dt = time.perf_counter() - t0
    return 2 * n**3 * reps / dt, f"measured torch.mm {n}x{n} {dtype} on this process ({torch.get_num_threads()} threads)"


def summarize_sparsity(per_layer: dict[str, float]) -> dict[str, float]:
    """``{"layers.i.proj": z}`` → mean zero fraction per projection ``{"qkv": …, "out": …, …}``."""
    acc: dict[str, list[float]] = {}
    for key, z in per_layer.items():
        acc.setdefault(key.rsplit(".", 1)[-1], []).append(z)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


class MetricsWriter:
    """Rank 0 only (``enabled=False`` elsewhere makes every method a no-op)."""

    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int, total_steps: int,
                 tensorboard: bool, progress_bar: bool, log_interval: int) -> None:
        self.enabled = enabled
        self.log_interval = log_interval
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after the checkpoint we resume from
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                    purge_step=start_step + 1 if start_step > 0 else None)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, leave=True)
        self._fh = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        """Keep only records of steps ≤ ``step`` (a resumed run rewrites what followed its checkpoint)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.path)

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        step = rec["step"]
        if self.tb is not None:
            for key, val in _flatten(rec).items():
                if key != "step" and isinstance(val, (int, float)) and math.isfinite(val):
                    self.tb.add_scalar(key, val, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
        if step % self.log_interval == 0 or "val_loss" in rec:
            self.console(rec)

    def console(self, rec: dict) -> None:
        sp = rec.get("sparsity") or {}
        parts = [f"step {rec['step']:>6}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.3e}"]
        if rec.get("grad_norm") is not None:
            parts.append(f"gnorm {rec['grad_norm']:.3f}")
        parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
        if rec.get("mfu") is not None:
            parts.append(f"MFU {100 * rec['mfu']:.1f}%")
        if sp:
            parts.append("sparsity " + " ".join(f"{k}={v:.2f}" for k, v in sp.items()))
        if "val_loss" in rec:
            parts.append(f"val {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.1f})")
        line = " | ".join(parts)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def text(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def _flatten(rec: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                out[f"{key}/{i}"] = x
        else:
            out[key] = v
    return out
