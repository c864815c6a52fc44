"""``qsparse-dist generate``: decode from an exported Hugging Face directory with a KV cache."""

from __future__ import annotations

import argparse
import sys

HELP = "generate text from an exported model (KV-cache decoding, greedy or top-p, streamed)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="directory written by `qsparse-dist export --format hf`")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (deterministic)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (export dtype on GPU, float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--backend", default="auto",
                   help="linear-layer backend: auto (Triton kernels on CUDA, torch on CPU) | torch | kernels")
    p.add_argument("--no-stream", action="store_true", help="print the text once at the end")
    p.add_argument("--show-sparsity", action="store_true",
                   help="report the measured zero fraction of each projection's input")


def run(args: argparse.Namespace) -> int:
    from ..export.errors import ExportError
    from ..infer import generate_text, load_model

    try:
        lm = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
        if lm.tokenizer is None:
            raise ExportError(f"--model {args.model}: no tokenizer in the directory")
        lm.set_track_sparsity(args.show_sparsity)
        out = sys.stdout
        if not args.no_stream:
            out.write(args.prompt)
            out.flush()

        def emit(chunk: str) -> None:
            out.write(chunk)
            out.flush()

        res = generate_text(lm, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, on_text=None if args.no_stream else emit)
    except (ExportError, ValueError) as e:
        print(f"qsparse-dist generate: {e}", file=sys.stderr)
        return 2
    out.write((args.prompt + res.text if args.no_stream else "") + "\n")
    out.flush()
    print(f"[{lm.arch} {lm.sparsity.linear}, {lm.device}, {str(lm.dtype).removeprefix('torch.')}, backend {lm.backend}] "
          f"prompt {len(res.prompt_ids)} tokens, {len(res.new_ids)} new; prefill {res.prefill_s * 1e3:.1f} ms, "
          f"decode {res.decode_tokens_per_s:.1f} tokens/s{' (stopped at EOS)' if res.stopped_at_eos else ''}",
          file=sys.stderr)
    if args.show_sparsity:
        stats = lm.measured_sparsity()
        print("measured input sparsity: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()), file=sys.stderr)
    return 0
