"""``qsparse-dist export``: consolidate a checkpoint and write it as a Hugging Face directory or GGUF."""

from __future__ import annotations

import argparse
import sys

HELP = "export a checkpoint to Hugging Face (safetensors + config + tokenizer) or GGUF"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT_DIR",
                   help="a run directory (its latest checkpoint), a checkpoints/ folder, one checkpoint, "
                   "or a reference checkpoint (reference.safetensors + config.yaml)")
    p.add_argument("--format", required=True, choices=("hf", "gguf"), help="output format")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (gguf: or a .gguf file path)")
    p.add_argument("--dtype", default="auto", help="hf: auto (the run's train.dtype) | float32 | bfloat16 | "
                   "float16; gguf: float32 | float16 | bfloat16 select the tensor type when --gguf-type is auto")
    p.add_argument("--pack-ternary", action="store_true",
                   help="hf, BitNet models: store ternary weights as 2-bit codes + fp32 scale (ops/packing.py)")
    p.add_argument("--gguf-type", default="auto", help="gguf tensor type: auto (f16, or tq2_0 for BitNet) | f32 | "
                   "f16 | bf16 | q8_0 | tq2_0 | tq1_0")
    p.add_argument("--max-shard-size", default="2GB", help="hf: split safetensors past this size (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")


def run(args: argparse.Namespace) -> int:
    from ..export import ExportError, export_gguf, export_hf, load_checkpoint

    try:
        ckpt = load_checkpoint(args.checkpoint)
        print(f"export: {ckpt.source} ({ckpt.layout}, step {ckpt.step}) — {ckpt.config.sparsity.linear} "
              f"model, {sum(v.numel() for v in ckpt.state_dict.values()) / 1e6:.2f}M parameters", file=sys.stderr)
        if args.format == "hf":
            res = export_hf(ckpt, args.out, dtype=args.dtype, pack_ternary=args.pack_ternary,
                            max_shard_size=args.max_shard_size, overwrite=args.overwrite)
            print(f"export: wrote {res.out_dir} as {res.arch} ({str(res.dtype).removeprefix('torch.')}"
                  f"{', packed ternary' if res.packed else ''}): {', '.join(res.files)}", file=sys.stderr)
        else:
            if args.pack_ternary:
                raise ExportError("--pack-ternary applies to --format hf (GGUF uses --gguf-type tq2_0)")
            qtype = args.gguf_type
            if qtype == "auto" and args.dtype != "auto":
                alias = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "bfloat16": "bf16",
                         "bf16": "bf16"}
                if args.dtype not in alias:
                    raise ExportError(f"--dtype {args.dtype!r} is not a GGUF type; use --gguf-type")
                qtype = alias[args.dtype]
            path = export_gguf(ckpt, args.out, qtype=qtype, overwrite=args.overwrite)
            print(f"export: wrote {path}", file=sys.stderr)
    except ExportError as e:
        print(f"qsparse-dist export: {e}", file=sys.stderr)
        return 2
    return 0
