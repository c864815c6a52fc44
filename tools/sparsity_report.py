#!/usr/bin/env python
"""Per-layer / per-projection activation sparsity and MoE expert load of a checkpoint on a dataset.

    python tools/sparsity_report.py --checkpoint runs/sweep_cpu/h64_s50 --data runs/sweep_cpu/data --out report/

``--checkpoint`` is a run directory, a training checkpoint (``checkpoints/step_*``) or a reference
checkpoint (``reference.safetensors`` + ``config.yaml``); it is consolidated into the reference
layout (``qsparse_dist.export.consolidate``) and evaluated with the single-device reference model.
``--data`` is a directory written by ``qsparse-dist prepare-data`` (with the model's tokenizer).
Writes ``sparsity_report.txt``, ``sparsity_report.json`` and ``sparsity_heatmap.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, training checkpoint or reference checkpoint")
    p.add_argument("--data", required=True, help="prepared data directory (qsparse-dist prepare-data)")
    p.add_argument("--split", default="valid", help="split to read (default valid; falls back to train)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=None, help="default: the model's seq_length")
    p.add_argument("--batch-union", type=int, default=0, metavar="G",
                   help="also report the fraction of weight rows a batch of G decode streams must read "
                        "(union of the G tokens' masks: the model's own and 2:4)")
    p.add_argument("--out", default=None, help="output directory (default: print only)")
    args = p.parse_args(argv)
    if args.batch_union < 0 or args.batch_union > args.batch_size:
        print(f"sparsity_report: --batch-union must be between 0 and --batch-size ({args.batch_size})", file=sys.stderr)
        return 2
    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            print(f"sparsity_report: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.seq_length is not None and args.seq_length < 1:
        print("sparsity_report: --seq-length must be >= 1", file=sys.stderr)
        return 2

    from qsparse_dist.analysis.sparsity_report import (
        format_report,
        measure_batch_union,
        measure_sparsity,
        plot_report,
        token_batches,
    )
    from qsparse_dist.data import DataError, TokenFile
    from qsparse_dist.export.consolidate import load_checkpoint
    from qsparse_dist.export.errors import CheckpointError
    from qsparse_dist.model import QSparseGPT

    try:
        ck = load_checkpoint(args.checkpoint)
        meta_splits = TokenFile(args.data, "train", field="--data").meta["splits"]
        split = args.split if args.split in meta_splits else "train"
        tokens = TokenFile(args.data, split, field="--data")
        cfg = ck.config
        model = QSparseGPT(cfg.model, cfg.sparsity)
        model.load_state_dict(ck.state_dict, strict=True)
        seq = args.seq_length or cfg.model.seq_length
        rep = measure_sparsity(model, cfg, token_batches(tokens.tokens, seq, args.batch_size, args.batches))
        if args.batch_union:
            rep.meta["batch_union"] = {"group": args.batch_union, "per_projection": measure_batch_union(
                model, token_batches(tokens.tokens, seq, args.batch_size, args.batches), args.batch_union)}
    except (CheckpointError, DataError, ValueError) as e:
        print(f"sparsity_report: {e}", file=sys.stderr)
        return 2
    rep.meta.update(checkpoint=str(ck.source), step=ck.step, data=str(args.data), split=split,
                    linear=cfg.sparsity.linear, seq_length=seq)
    text = format_report(rep)
    if "batch_union" in rep.meta:
        g = rep.meta["batch_union"]["group"]
        text += f"\n\nfraction of weight rows a batch of {g} decode streams reads (union of the {g} masks)\n"
        text += f"{'proj':>5} {'1 token':>8} {'own, g':>8} {'2:4, g':>8}\n"
        for proj, d in rep.meta["batch_union"]["per_projection"].items():
            text += f"{proj:>5} {d['single']:>8.4f} {d['own']:>8.4f} {d['nm']:>8.4f}\n"
    print(f"checkpoint {ck.source} (step {ck.step}, {cfg.sparsity.linear}), data {args.data} [{split}]")
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sparsity_report.txt").write_text(text + "\n")
        (out / "sparsity_report.json").write_text(json.dumps(rep.as_dict(), indent=1) + "\n")
        png = plot_report(rep, out / "sparsity_heatmap.png", title=f"{Path(args.checkpoint).name} ({cfg.sparsity.linear})")
        print(f"wrote {out / 'sparsity_report.txt'}, {out / 'sparsity_report.json'}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
