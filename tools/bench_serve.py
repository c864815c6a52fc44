"""Load test for ``qsparse-dist serve``: N concurrent streaming clients, time to first token and
tokens/s per client and in total.

Each client sends ``--requests`` streaming ``/v1/completions`` requests one after the other
(``max_tokens = --tokens``, ``ignore_eos`` so every request decodes exactly that many tokens, greedy).
Per request: TTFT = time from sending to the first streamed token; decode rate = (tokens − 1) /
(last token − first token).  Per client: mean TTFT, tokens, tokens / busy time.  Total: all tokens /
wall time of the whole run (the server's throughput at that concurrency).  Token counts come from the
server's ``token_ids`` extension (``return_token_ids``), not from text length.

Targets (one or several; each gets its own server on a free port, started and stopped here):
    --url URL                  an already running server (nothing started)
    --model DIR[,DIR...]       exported model directories
    --kinds K[,K...]           random-weight models built here and exported through the project's
                               exporter (``dense``, ``qsparse``, ``bitnet_qsparse``…), shape --preset
                               (``tiny`` for the CPU; ``1b`` / ``8b`` as in tools/bench_decode.py —
                               bf16, ~16 GB per 8b export, built one at a time and deleted after
                               its run unless --work-dir keeps them); tokenizer: SentencePiece
                               trained on the standard library's pydoc topics.

    python tools/bench_serve.py --kinds dense,qsparse,bitnet_qsparse --preset tiny --clients 4 \\
        --device cpu --json docs/bench/serve_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {  # hidden, layers, ffn, heads, kv groups, vocab
    "tiny": (128, 4, 384, 4, 2, 2048),
    "1b": (2048, 22, 5632, 32, 4, 32000),
    "8b": (4096, 32, 14336, 32, 8, 32000),
}
SPARSITY = {
    "dense": {"linear": "dense"},
    "qsparse": {"linear": "qsparse", "qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.5},
    "block_qsparse": {"linear": "block_qsparse", "block_size": 8, "qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.5},
    "bitnet": {"linear": "bitnet"},
    "bitnet_qsparse": {"linear": "bitnet_qsparse", "qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.5},
}
PROMPTS = ["The with statement", "A class definition", "Exceptions are raised", "The import system",
           "Operator precedence", "Assignment statements", "The for loop", "Lambda expressions"]


def _tokenizer(out: Path, vocab: int) -> Path:
    import pydoc_data.topics as topics

    from qsparse_dist.data.tokenizer import train_sentencepiece

    if not (out / "tokenizer.model").is_file():
        train_sentencepiece([t for _, t in sorted(topics.topics.items())], vocab, out)
    return out / "tokenizer.model"


def build_export(kind: str, preset: str, seq_length: int, root: Path, pack_ternary: bool = False) -> Path:
    """Random-weight reference checkpoint of ``kind`` at ``preset`` → ``qsparse-dist export`` HF dir
    (bf16 weights above ``tiny``; the intermediate checkpoint is deleted once exported)."""
    import shutil

    import torch

    from qsparse_dist.config import config_from_dict
    from qsparse_dist.export import export_hf, load_checkpoint, save_reference_checkpoint
    from qsparse_dist.model import QSparseGPT

    hidden, layers, ffn, heads, groups, vocab = PRESETS[preset]
    out = root / f"{kind}_{preset}"
    if (out / "config.json").is_file():
        return out
    tok = _tokenizer(root / f"tok{vocab}", vocab)
    cfg = config_from_dict({"model": {"vocab_size": vocab, "hidden_size": hidden, "num_layers": layers,
                                      "num_attention_heads": heads, "num_query_groups": groups,
                                      "ffn_hidden_size": ffn, "seq_length": seq_length,
                                      "ffn_activation": "relu2glu" if kind != "dense" else "swiglu"},
                            "sparsity": SPARSITY[kind]})
    torch.manual_seed(0)
    model = QSparseGPT(cfg.model, cfg.sparsity)
    if preset != "tiny":
        model = model.to(torch.bfloat16)
    ckpt = save_reference_checkpoint(root / f"ck_{kind}_{preset}", model.state_dict(), cfg, tokenizer_file=tok)
    del model
    try:
        return export_hf(load_checkpoint(ckpt), out, pack_ternary=pack_ternary and kind.startswith("bitnet")).out_dir
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)


class ServerProcess:
    """``qsparse-dist serve`` on port 0 (the OS picks a free one; the server prints the address)."""

    def __init__(self, model: Path, args) -> None:
        self.log = Path(tempfile.mkstemp(prefix="bench_serve_", suffix=".log")[1])
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, "-m", "qsparse_dist.cli", "serve", "--model", str(model), "--port", "0",
               "--device", args.device, "--max-batch", str(args.max_batch), "--max-len", str(args.max_len)]
        if not args.track_sparsity:
            cmd.append("--no-track-sparsity")
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        self.url = self._wait()

    def _wait(self, timeout: float = 600) -> str:
        import httpx

        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench_serve: the server exited:\n{self.log.read_text()}")
            text = self.log.read_text()
            if " on http://" in text:
                url = "http://" + text.split(" on http://", 1)[1].split()[0]
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise SystemExit("bench_serve: the server did not come up")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


async def _one_request(client, url: str, model: str, prompt: str, tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"bench_serve: {r.status_code} {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise SystemExit(f"bench_serve: server error {ev['error']}")
            got = sum(len(c.get("token_ids", [])) for c in ev.get("choices", []))
            if got:
                now = time.perf_counter()
                first = first or now
                last = now
                n += got
    return {"ttft_s": (first or t0) - t0, "tokens": n, "decode_s": (last or t0) - (first or t0),
            "total_s": (last or t0) - t0}


async def _client(i: int, client, url: str, model: str, args) -> dict:
    reqs = [await _one_request(client, url, model, PROMPTS[(i + j) % len(PROMPTS)], args.tokens)
            for j in range(args.requests)]
    busy = sum(r["total_s"] for r in reqs)
    return {"client": i, "requests": len(reqs), "ttft_ms": 1e3 * statistics.mean(r["ttft_s"] for r in reqs),
            "tokens": sum(r["tokens"] for r in reqs),
            "tokens_per_s": sum(r["tokens"] for r in reqs) / busy if busy > 0 else float("nan"),
            "decode_tokens_per_s": statistics.mean((r["tokens"] - 1) / r["decode_s"] for r in reqs if r["decode_s"] > 0)
            if any(r["decode_s"] > 0 for r in reqs) else float("nan")}


async def _run(url: str, args) -> tuple[list[dict], dict]:
    import httpx

    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    clients = [httpx.AsyncClient(timeout=None) for _ in range(args.clients)]  # built before the clock starts
    try:
        for c in clients:  # warm-up: connections open, first-call costs paid
            await _one_request(c, url, model, PROMPTS[0], 4)
        t0 = time.perf_counter()
        rows = await asyncio.gather(*(_client(i, c, url, model, args) for i, c in enumerate(clients)))
        wall = time.perf_counter() - t0
    finally:
        for c in clients:
            await c.aclose()
    toks = sum(r["tokens"] for r in rows)
    total = {"client": "total", "requests": sum(r["requests"] for r in rows),
             "ttft_ms": statistics.mean(r["ttft_ms"] for r in rows), "tokens": toks, "tokens_per_s": toks / wall,
             "decode_tokens_per_s": None, "wall_s": wall}
    metrics = httpx.get(url + "/metrics").text
    mean_batch = None
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines() if ln and not ln.startswith("#")}
    if vals.get("qsparse_decode_steps_total"):
        mean_batch = vals["qsparse_decode_rows_total"] / vals["qsparse_decode_steps_total"]
    total["mean_decode_batch"] = mean_batch
    return list(rows), total


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None)
    ap.add_argument("--model", default=None, help="exported model dir(s), comma-separated")
    ap.add_argument("--kinds", default=None, help="random-weight models to build: dense,qsparse,bitnet_qsparse,…")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--work-dir", default=None, help="where --kinds exports go (default: a temporary dir)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens of each request")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--track-sparsity", action=argparse.BooleanOptionalAction, default=False,
                    help="measure input sparsity in the server (a host sync per linear call; off for speed)")
    ap.add_argument("--pack-ternary", action="store_true", help="--kinds bitnet*: export 2-bit packed weights")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if sum(x is not None for x in (args.url, args.model, args.kinds)) != 1:
        ap.error("give exactly one of --url, --model, --kinds")

    # targets: (name, url | model dir | kind to build); a built model is deleted after its run unless
    # --work-dir keeps it (an 8b export is ~16 GB)
    if args.url:
        targets: list[tuple[str, str | Path]] = [("url", args.url)]
    elif args.model:
        targets = [(Path(m).name, Path(m)) for m in args.model.split(",")]
    else:
        targets = [(k, k) for k in args.kinds.split(",")]
        for kind in args.kinds.split(","):
            if kind not in SPARSITY:
                ap.error(f"--kinds: unknown kind {kind!r} (one of {sorted(SPARSITY)})")
        root = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_serve_"))
        root.mkdir(parents=True, exist_ok=True)

    results = []
    for name, target in targets:
        if args.kinds:
            print(f"building a random {name} model, preset {args.preset} …", file=sys.stderr)
            target = build_export(name, args.preset, args.max_len, root, args.pack_ternary)
        server = None if args.url else ServerProcess(target, args)
        url = target if server is None else server.url
        try:
            rows, total = asyncio.run(_run(url, args))
        finally:
            rc = server.stop() if server is not None else None
            if args.kinds and not args.work_dir:
                import shutil

                shutil.rmtree(target, ignore_errors=True)
        print(f"\n== {name}: {args.clients} clients × {args.requests} requests × {args.tokens} tokens "
              f"(mean decode batch {_fmt(total['mean_decode_batch'])}; server exit {rc})")
        print_table(rows + [total], ["client", "requests", "ttft_ms", "tokens", "tokens_per_s", "decode_tokens_per_s"])
        results.append({"model": name, "clients": rows, "total": total})

    if args.kinds and not args.work_dir:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        import torch

        info = {"date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
                "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": "python tools/bench_serve.py " + " ".join(argv or sys.argv[1:]),
                                   "env": info, "args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
