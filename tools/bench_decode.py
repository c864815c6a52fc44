"""End-to-end batch-1 greedy decode of a ~1B Q-Sparse model: Triton kernels vs the same model dense.

Builds :class:`qsparse_dist.model.reference.QSparseGPT` with random weights (TinyLlama-like shape:
hidden 2048, 22 layers, 32 heads / 4 KV groups, FFN 5632, vocab 32000, ~1.1B parameters) in bf16,
wraps it in :class:`qsparse_dist.infer.kernels.decoder.KernelDecoder` (dense = cuBLAS GEMVs; qsparse
= top-K + sparse GEMV; bitnet kinds = 2-bit ternary GEMV), captures one decode step in a CUDA graph
(``qsparse_dist.infer.cuda_graph.GraphedStep``) and times ``--tokens`` steps.  Each variant's
first logits are checked against the reference model (torch ops) on the same prompt token.

    python tools/bench_decode.py --json docs/bench/decode_h100.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import env_info, print_table, write_json  # noqa: E402

from qsparse_dist.config.schema import ModelConfig, SparsityConfig  # noqa: E402
from qsparse_dist.infer.cuda_graph import GraphedStep  # noqa: E402
from qsparse_dist.infer.kernels.decoder import KernelDecoder  # noqa: E402
from qsparse_dist.infer.kernels.tune import tune_gemv  # noqa: E402
from qsparse_dist.model.reference import QSparseGPT  # noqa: E402

TUNED: dict = {}
PROMPT_TOKEN = 17


def model_config(args) -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=args.hidden, num_layers=args.layers,
                       num_attention_heads=32, num_query_groups=4, ffn_hidden_size=args.ffn,
                       seq_length=args.max_len, ffn_activation="relu2glu")


def decode_tokens_per_s(dec: KernelDecoder, n_tokens: int, graphed: bool) -> tuple[float, torch.Tensor]:
    dev = dec.residual.device
    tok = torch.full((1,), PROMPT_TOKEN, dtype=torch.long, device=dev)
    positions = torch.arange(n_tokens + 8, device=dev)
    step = GraphedStep(dec.step, (tok, positions[:1]), enabled=graphed)
    dec.reset()
    first = None
    for p in range(4):  # warm
        logits = step(tok, positions[p:p + 1])
        if first is None:
            first = logits.clone()
        tok = logits.argmax(-1)
    dec.reset()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for p in range(n_tokens):
        logits = step(tok, positions[p:p + 1])
        tok = logits.argmax(-1)
    e.record()
    e.synchronize()
    return n_tokens / (s.elapsed_time(e) / 1e3), first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--kinds", default="dense,qsparse,bitnet,bitnet_qsparse")
    ap.add_argument("--eager", action="store_true", help="also time without the CUDA graph")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-gather", action="store_true", help="predicated-row GEMVs instead of compacted lists")
    ap.add_argument("--no-tune", action="store_true", help="default GEMV configs (no per-shape tuning)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU")
        return 2
    t0 = time.time()
    info = env_info()
    info["command"] = "python tools/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    m = model_config(args)
    rows = []
    base = None
    prompt = torch.tensor([[PROMPT_TOKEN]], device="cuda")
    for kind in args.kinds.split(","):
        sp = args.sparsity
        scfg = (SparsityConfig(linear=kind, qkv=sp, out=sp, up=sp, down=sp) if kind.endswith("qsparse")
                else SparsityConfig(linear=kind))
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = QSparseGPT(m, scfg).to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).eval()
        n_params = sum(p.numel() for p in model.parameters())
        os.environ["QSPARSE_TRITON"] = "0"
        with torch.no_grad():
            ref = model(prompt)[0, -1].float()
        os.environ.pop("QSPARSE_TRITON")
        configs, tuned = {}, {}
        if kind != "dense" and not args.no_tune:  # pick each projection's GEMV tiling on this GPU (cached across kinds)
            gk = "ternary" if kind.startswith("bitnet") else "sparse"
            spv = sp if kind.endswith("qsparse") else 0.0
            nqkv = (m.num_attention_heads + 2 * m.query_groups) * m.head_dim
            shapes = {"qkv": (m.hidden_size, nqkv), "out": (m.num_attention_heads * m.head_dim, m.hidden_size),
                      "up": (m.hidden_size, 2 * m.ffn_size), "down": (m.ffn_size, m.hidden_size)}
            for proj, (k, n) in shapes.items():
                key = (gk, k, n, spv)
                if key not in TUNED:
                    TUNED[key] = tune_gemv(gk, k, n, spv, gather=not args.no_gather)
                configs[proj] = TUNED[key][0]
                tuned[proj] = {"config": str(TUNED[key][0]), "us": TUNED[key][1]}
        dec = KernelDecoder(model, args.max_len, dense=(kind == "dense"), configs=configs,
                            gather=not args.no_gather)
        with torch.no_grad():
            tps, first = decode_tokens_per_s(dec, args.tokens, graphed=True)
            row = {"kind": kind, "sparsity": sp if kind.endswith("qsparse") else 0.0, "params_M": n_params / 1e6,
                   "tok_per_s": tps, "ms_per_tok": 1e3 / tps,
                   "logits_rel_err_vs_reference": float((first[0] - ref).norm() / ref.norm()),
                   "gemv_configs": tuned}
            if args.eager:
                row["tok_per_s_eager"] = decode_tokens_per_s(dec, 32, graphed=False)[0]
        if kind == "dense":
            base = tps
        row["vs_dense"] = tps / base if base else None
        row["dtype"], row["gather"] = args.dtype, not args.no_gather
        rows.append(row)
        print(row, flush=True)
        del model, dec
        torch.cuda.empty_cache()
    res = {"env": info, "model": m.model_dump(), "tokens": args.tokens, "rows": rows, "wall_s": time.time() - t0}
    if args.json:
        write_json(res, args.json)
    print("\n== batch-1 greedy decode, CUDA graph per step ==")
    print_table(rows, ["kind", "sparsity", "params_M", "tok_per_s", "ms_per_tok", "vs_dense",
                       "logits_rel_err_vs_reference"] + (["tok_per_s_eager"] if args.eager else []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
