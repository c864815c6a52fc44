"""Held-out perplexity of an exported model: the reference path against the kernel decode path.

Issue 16's bf16 correctness goal: on a *trained* model, decoding through the kernels must not cost
quality — perplexity within 0.5 % of the reference path on held-out text.  For each window of
``--len + 1`` tokens of the prepared data's ``--split`` it computes the summed next-token NLL three
ways, all in ``--dtype``:

* ``reference``: the reference model (``load_model(backend="torch")``) over the whole window at once,
  with the torch ops (``QSPARSE_TRITON=0``: ``torch.topk`` selections, eager int8/ternary math);
* ``torch_decode``: the same model decoding one token at a time through its KV cache — separates the
  effect of token-by-token decoding (bf16 KV cache, attention over a growing cache) from the kernels;
* ``kernels``: the runtime's ``kernels`` backend (what ``qsparse-dist generate`` uses on CUDA: the Triton
  top-K / int8 / sparse and ternary GEMVs), one token at a time through the KV cache.

``ppl = exp(Σ NLL / Σ tokens)``; the JSON also holds the per-window NLLs.

    python3 tools/decode_perplexity.py --model EXPORT_DIR --data DATA_DIR --windows 8 --len 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qsparse_dist.data.dataset import TokenFile  # noqa: E402
from qsparse_dist.infer.runtime import load_model  # noqa: E402

GOAL_REL = 0.005


def windows(data: str, split: str, n: int, length: int) -> list[torch.Tensor]:
    """``n`` windows of ``length + 1`` tokens spread evenly over the split (int64)."""
    tf = TokenFile(data, split)
    total = tf.num_samples(length)
    if total < 1:
        raise SystemExit(f"--data {data}: split {split!r} has fewer than {length + 1} tokens")
    picks = sorted({int(i * total / n) for i in range(n)})
    return [torch.from_numpy(tf.sample(i, length)) for i in picks]


def nll_full(model, seq: torch.Tensor) -> float:
    """Summed NLL of ``seq[1:]`` from one forward over ``seq[:-1]``, with the torch ops."""
    old = os.environ.get("QSPARSE_TRITON")
    os.environ["QSPARSE_TRITON"] = "0"
    try:
        logits = model(seq[None, :-1]).float()[0]
    finally:
        if old is None:
            os.environ.pop("QSPARSE_TRITON")
        else:
            os.environ["QSPARSE_TRITON"] = old
    return float(F.cross_entropy(logits, seq[1:], reduction="sum"))


def nll_decode(model, seq: torch.Tensor) -> float:
    """Summed NLL of ``seq[1:]`` decoding one token at a time through the model's KV cache."""
    caches: list = []
    total = 0.0
    for t in range(seq.numel() - 1):
        logits, caches = model(seq[None, t:t + 1], kv_caches=caches, start_pos=t)
        total += float(F.cross_entropy(logits[0, -1:].float(), seq[t + 1:t + 2], reduction="sum"))
    return total


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="an export directory (qsparse-dist export --format hf)")
    ap.add_argument("--data", required=True, help="a prepared data directory (prepare-data) of the same tokenizer")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--len", type=int, default=256, dest="length")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    ref = load_model(args.model, device=args.device, dtype=args.dtype, backend="torch", load_tokenizer=False)
    ker = load_model(args.model, device=args.device, dtype=args.dtype, backend="kernels", load_tokenizer=False)
    seqs = [s.to(ref.device) for s in windows(args.data, args.split, args.windows, args.length)]
    paths = {"reference": lambda s: nll_full(ref.model, s), "torch_decode": lambda s: nll_decode(ref.model, s),
             "kernels": lambda s: nll_decode(ker.model, s)}
    per: dict[str, list[float]] = {}
    secs: dict[str, float] = {}
    for name, fn in paths.items():
        t0 = time.perf_counter()
        per[name] = [fn(s) for s in seqs]
        secs[name] = time.perf_counter() - t0
    n_tok = sum(s.numel() - 1 for s in seqs)
    ppl = {k: math.exp(sum(v) / n_tok) for k, v in per.items()}
    rel = {k: ppl[k] / ppl["reference"] - 1 for k in ppl}
    arch = f"{ref.arch}, {ref.sparsity.linear}, {ref.model_config.num_layers}x{ref.model_config.hidden_size}"
    print(f"{args.model} ({arch}), {args.dtype}, {len(seqs)} windows x {args.length} tokens of {args.split}")
    print("| path | perplexity | vs reference | seconds |")
    print("|---|---|---|---|")
    for k in ppl:
        print(f"| {k} | {ppl[k]:.4f} | {rel[k]:+.3%} | {secs[k]:.1f} |")
    ok = abs(rel["kernels"]) <= GOAL_REL
    print(f"kernels within {GOAL_REL:.1%} of reference: {'yes' if ok else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "arch": arch, "dtype": args.dtype, "device": str(ref.device),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "windows": len(seqs), "len": args.length, "tokens": n_tok, "perplexity": ppl, "rel_to_reference": rel,
            "nll_per_window": per, "seconds": secs, "goal_rel": GOAL_REL, "within_goal": ok,
            "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
