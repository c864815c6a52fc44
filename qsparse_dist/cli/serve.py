"""``qsparse-dist serve``: serve an exported model over an OpenAI-compatible HTTP API (docs/serving.md)."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

HELP = "serve an exported model with an OpenAI-compatible API (completions, chat, streaming, batching)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="directory written by `qsparse-dist export --format hf`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (export dtype on GPU, float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--backend", default="auto", help="linear-layer backend: auto | torch | kernels")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together per step")
    p.add_argument("--max-len", type=int, default=None, metavar="N",
                   help="limit on prompt + max_tokens per request (default: the model's seq_length)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="model id in the API (default: the directory name)")
    p.add_argument("--track-sparsity", action=argparse.BooleanOptionalAction, default=True,
                   help="measure each projection's input sparsity for /metrics (one host sync per linear call)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (info shows every request)")


def _fail(msg: str) -> int:
    print(f"qsparse-dist serve: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.max_batch < 1:
        return _fail(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_len is not None and args.max_len < 2:
        return _fail(f"--max-len must be >= 2, got {args.max_len}")
    if not 0 <= args.port <= 65535:
        return _fail(f"--port must be in 0..65535, got {args.port}")
    try:
        import uvicorn

        from ..serve.app import create_app
    except ModuleNotFoundError as e:
        return _fail(f"{e.name} is not installed: pip install 'qsparse-dist[serve]'")
    from ..export.errors import ExportError
    from ..infer import load_model

    try:
        lm = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
        if lm.tokenizer is None:
            raise ExportError(f"--model {args.model}: no tokenizer in the directory (tokenizer_config.json)")
    except (ExportError, ValueError, OSError) as e:
        return _fail(str(e))
    max_len = args.max_len or lm.model_config.seq_length
    name = args.served_model_name or Path(args.model).resolve().name
    try:
        # proto=IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
        # and without it the last small SSE/response write waits ~40 ms for the client's delayed ACK
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        return _fail(f"--host {args.host} --port {args.port}: cannot listen ({e.strerror or e})")
    app = create_app(lm, model_name=name, max_len=max_len, max_batch=args.max_batch,
                     track_sparsity=args.track_sparsity)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=10,
                            access_log=args.log_level in ("debug", "trace"))
    server = _Server(config)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"qsparse-dist serve: {name} ({lm.arch} {lm.sparsity.linear}, {lm.device}, backend {lm.backend}, "
          f"max batch {args.max_batch}, max len {max_len}) on http://{host}:{port}", file=sys.stderr, flush=True)
    server.run(sockets=[sock])  # SIGINT / SIGTERM: stop accepting, finish in-flight requests, return
    print("qsparse-dist serve: stopped", file=sys.stderr, flush=True)
    return 130 if server.stopped_by == signal.SIGINT else 0


def _make_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the signal it shut down on after a graceful exit (so the process dies of
        SIGTERM, status 143); a server that drained cleanly should exit 0 instead."""

        stopped_by: int | None = None

        def handle_exit(self, sig, frame) -> None:
            self.stopped_by = sig
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: do not wait for in-flight requests
            else:
                self.should_exit = True

    return Server


def _Server(config):
    return _make_server_class()(config)
