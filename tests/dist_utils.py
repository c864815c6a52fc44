"""Run a worker script under ``torchrun`` (real processes, gloo on the CPU) and collect each rank's
JSON result.  Workers live in ``tests/workers/`` and call :func:`write_result`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: str, nproc: int, out_dir: Path, args: list[str] = (), env: dict | None = None,
             timeout: int = 300) -> list[dict]:
    """Start ``tests/workers/<worker>`` on ``nproc`` ranks; return the per-rank result dicts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", str(WORKERS / worker), *map(str, args)]
    full_env = {**os.environ, "QSD_TEST_OUT": str(out_dir), "OMP_NUM_THREADS": "1",
                "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{worker} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]


def write_result(obj: dict) -> None:
    """Called inside a worker: store this rank's result for the test to read."""
    rank = int(os.environ.get("RANK", "0"))
    path = Path(os.environ["QSD_TEST_OUT"]) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)
