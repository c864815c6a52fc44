"""``qsparse-dist import-hf --model HF_DIR --out DIR [key.path=value ...]``"""

from __future__ import annotations

import argparse
import json
import sys

HELP = ("import a local Hugging Face Llama / Mistral / Qwen2 / Mixtral checkpoint (safetensors) into the "
        "reference layout + a run config, keeping its tokenizer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="HF_DIR",
                        help="local transformers checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weight dtype to store (auto: keep the checkpoint's)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="training sequence length for config.yaml (default: min(max positions, 4096, "
                             "sliding window))")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="split weight files past this size")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="overrides for the written config.yaml, e.g. sparsity.linear=qsparse "
                             "sparsity.down=0.5 sparsity.ramp_steps=1000")


def run(args: argparse.Namespace) -> int:
    from ..convert import HFImportError, import_hf

    try:
        meta = import_hf(args.model, args.out, dtype=args.dtype, seq_length=args.seq_length,
                         overrides=args.overrides, max_shard_bytes=int(args.max_shard_gb * 2**30),
                         overwrite=args.overwrite)
    except HFImportError as e:
        print(f"qsparse-dist import-hf: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=1))
    print(f"wrote {args.out} (config.yaml, weights, tokenizer/); train from it with "
          f"checkpoint.init_from={args.out}")
    return 0
