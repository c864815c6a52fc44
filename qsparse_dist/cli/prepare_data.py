"""``qsparse-dist prepare-data --input PATH_OR_HF_NAME... --out DIR [--vocab-size N | --tokenizer MODEL]``."""

from __future__ import annotations

import argparse
import sys

HELP = "tokenize text/jsonl/parquet files (or a hub dataset) into packed train/valid token files"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_HF_NAME",
                   help="local .txt/.md/.jsonl/.json/.parquet files or folders, or a hub dataset name")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (meta.json, *.bin, tokenizer)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vocab-size", type=int, metavar="N", help="train a sentencepiece BPE tokenizer of N pieces")
    tok.add_argument("--tokenizer", metavar="MODEL",
                     help="use an existing tokenizer: sentencepiece .model file or Hugging Face tokenizer dir")
    p.add_argument("--glob", action="append", default=[], metavar="PATTERN",
                   help="read every file under folder inputs matching PATTERN (repeatable, '**' recurses, "
                        "e.g. '**/*.py'); matched binary/non-UTF-8 files are skipped with a warning")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep exact-duplicate documents (default: only the first of each is kept)")
    p.add_argument("--text-field", default="text", help="jsonl/parquet/hub column holding the text (default: text)")
    p.add_argument("--text-unit", default="paragraph", choices=("paragraph", "line", "document"),
                   help="how plain-text files are cut into documents (default: paragraph)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="fraction of documents held out (default 0.01)")
    p.add_argument("--num-proc", type=int, default=None, help="tokenizer processes for datasets.map")
    p.add_argument("--max-documents", type=int, default=None, help="use at most this many documents")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")


def run(args: argparse.Namespace) -> int:
    from ..data import DataError, prepare_data

    try:
        prepare_data(args.input, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                     text_field=args.text_field, text_unit=args.text_unit, valid_fraction=args.valid_fraction,
                     num_proc=args.num_proc, seed=args.seed, max_documents=args.max_documents,
                     overwrite=args.overwrite, globs=args.glob, keep_duplicates=args.keep_duplicates)
    except DataError as e:
        print(f"qsparse-dist prepare-data: error: {e}", file=sys.stderr)
        return 2
    return 0
