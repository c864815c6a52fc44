"""Decode prologue latency: the top-K selection variants of the fused batch-1 prologue, per row width.

The prologue (``qsparse_dist.kernels.decoder.prologue``) is one CTA per token: residual add + RMSNorm (or
the GLU activation), the exact top-K of ``|x|``, the compacted kept list for the gather GEMV and, for
BitNet rows, the int8 codes.  At batch 1 it is pure latency, and four of them run per layer.  This tool
times every selection (``bisect``, ``radix``, ``swar``; ``none`` = the same prologue without
top-K) at the 1.1B and 8B widths, bf16 and int8 rows, several warp counts, each call amortized over 20
back-to-back launches in one CUDA graph (the decode graph's launch gaps included), and checks that every
variant keeps exactly the kept list of the torch top-K.

    python tools/bench_prologue.py --json docs/bench/prologue_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import env_info, graph_time_ms, print_table, write_json  # noqa: E402

import qsparse_dist.kernels.decoder as decoder_mod  # noqa: E402
from qsparse_dist.kernels.decoder import prologue  # noqa: E402
from qsparse_dist.ops import kept_count, topk_mask  # noqa: E402

#: (row width, prologue kind) of the 1.1B (2048 / FFN 5632) and 8B (4096 / FFN 14336) decode steps:
#: ``norm`` = residual + RMSNorm (qkv, fc1 inputs), ``act`` = ReLU²GLU of the fc1 output (fc2 input).
ROWS = [(2048, "norm"), (5632, "act"), (4096, "norm"), (14336, "act")]
DEFAULT_WIDTHS = "4096,14336"
SELECTS = ["none", "bisect", "radix", "swar", "swar/noidx"]  # /noidx: masked row, no kept list


def amortized_us(fn, reps: int = 20) -> float:
    return graph_time_ms(lambda: [fn() for _ in range(reps)], iters=10) * 1e3 / reps


def bench_row(d: int, kind: str, sparsity: float, warps: list[int], selects: list[str]) -> list[dict]:
    """One width: every selection (the SWAR ones at each of ``warps``, the others at their default)."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(d)
    k = kept_count(d, sparsity)
    inp = torch.randn(1, 2 * d if kind == "act" else d, device=dev, generator=g)
    res = torch.randn(1, d, device=dev, generator=g)
    w = torch.rand(d, device=dev, generator=g) + 0.5
    y = torch.zeros(1, d, device=dev, dtype=torch.bfloat16)
    idx = torch.zeros(k, device=dev, dtype=torch.int32)
    q = (torch.zeros(1, d, device=dev, dtype=torch.int8), torch.zeros(1, device=dev))
    kw = {"act": "relu2glu"} if kind == "act" else {"residual": res, "norm_weight": w}
    full = torch.zeros_like(y)
    prologue(inp, full, d=d, **kw)
    ref_idx = topk_mask(full, sparsity)[0].nonzero().flatten().int()
    rows = []
    for quant in (False, True):
        for sel in selects:
            if sel == "none" and quant:
                continue
            r = {"d": d, "kind": kind, "rows": "int8" if quant else "bf16", "select": sel}
            sel, _, noidx = sel.partition("/")
            ix = None if noidx else idx
            qo = q if quant else None
            call = (lambda: prologue(inp, y, d=d, **kw)) if sel == "none" else (
                lambda qo=qo, sel=sel, ix=ix: prologue(inp, y, d=d, k=k, idx_out=ix, q_out=qo, select=sel, **kw))
            for nw in (warps if sel.startswith("swar") else [None]):  # None: the default warps of the width
                decoder_mod.PROLOGUE_WARPS = nw
                name = f"w{nw}_us" if nw else "default_us"
                try:
                    call()
                    if sel != "none" and ix is not None:
                        r["exact"] = bool(torch.equal(idx, ref_idx)) and r.get("exact", True)
                    r[name] = round(amortized_us(call), 2)
                except Exception as e:  # a warp count that does not compile for this width
                    r[name] = None
                    r["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            times = [v for key, v in r.items() if key.endswith("_us") and v is not None]
            r["best_us"] = min(times) if times else None
            print({key: v for key, v in r.items()}, flush=True)
            rows.append(r)
    decoder_mod.PROLOGUE_WARPS = None
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--warps", default="4,8,16", help="warps tried for the swar select")
    ap.add_argument("--selects", default=",".join(SELECTS))
    ap.add_argument("--widths", default=DEFAULT_WIDTHS, help=f"of {[d for d, _ in ROWS]}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_prologue: needs a CUDA GPU", file=sys.stderr)
        return 2
    warps = [int(w) for w in args.warps.split(",")]
    widths = {int(d) for d in args.widths.split(",")}
    rows = []
    for d, kind in ROWS:
        if d in widths:
            rows += bench_row(d, kind, args.sparsity, warps, args.selects.split(","))
    cols = sorted({c for r in rows for c in r if c.endswith("_us") and c != "best_us"},
                  key=lambda c: (c != "default_us", int(c[1:-3]) if c[1:-3].isdigit() else 0))
    print_table(rows, ["d", "kind", "rows", "select", *cols, "best_us", "exact"])
    if args.json:
        write_json({"env": env_info(), "sparsity": args.sparsity, "rows": rows}, args.json)
    return 0 if all(r.get("exact", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
