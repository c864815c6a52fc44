"""Start jobs on a :class:`~tests.multinode.netns_cluster.NetnsCluster` the way a user would: on the
first host, through ``launch/multinode/launch.sh`` (DeepSpeed's launcher, pdsh over ssh by default),
with one log per rank (``--enable_each_rank_log``) so each rank's last words can be checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .netns_cluster import NetnsCluster

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "multinode" / "launch.sh"


@dataclass
class Job:
    proc: subprocess.Popen
    out: Path  # launcher.log, ranklogs/, deepspeed_env
    started: float

    @property
    def log(self) -> Path:
        return self.out / "launcher.log"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"job did not end within {timeout:.0f} s; launcher log tail:\n"
                                 f"{self.tail()}") from None

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no log)"

    def rank_log(self, rank: int) -> str:
        """Everything rank ``rank`` printed (DeepSpeed names the file ``<timestamp>_rank<R>.log``)."""
        found = sorted((self.out / "ranklogs").glob(f"*_rank{rank}.log"))
        assert found, f"no log of rank {rank} in {self.out / 'ranklogs'}; launcher log:\n{self.tail()}"
        return "\n".join(p.read_text(errors="replace") for p in found)


def launch(cluster: NetnsCluster, out: Path, args: list, *, ds_args: list = (), module: str = "qsparse_dist.train",
           launcher: str = "pdsh", env: dict | None = None, host: int = 0) -> Job:
    """``launch.sh --hostfile <cluster hostfile> [ds_args] --module MOD -- args`` on ``host``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    argv = [LAUNCH, "--hostfile", cluster.hostfile, "--master-addr", cluster.master_addr,
            "--launcher", launcher, "--module", module, "--enable_each_rank_log", out / "ranklogs",
            *ds_args, "--", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                "QSD_DS_ENV_FILE": str(out / "deepspeed_env"), **(env or {})}
    with open(out / "launcher.log", "wb") as log:
        proc = cluster.popen(host, argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)
    return Job(proc, out, time.monotonic())


def launch_one_host(cluster: NetnsCluster, out: Path, args: list, *, nproc: int, module: str = "qsparse_dist.train",
                    host: int = 0, master_port: int = 29700) -> Job:
    """The single-node reference: DeepSpeed's launcher without a hostfile on one host, ``nproc``
    processes (``--num_gpus N``; the CPU accelerator reports one device, ``--include localhost:0,1``
    is refused)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", out / "no-hostfile",
            "--num_gpus", str(nproc), "--master_port", str(master_port),
            "--enable_each_rank_log", out / "ranklogs", "--module", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(out / "launcher.log", "wb") as log:
        proc = cluster.popen(host, argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    return Job(proc, out, time.monotonic())


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out


def latest_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the checkpoint ``checkpoints/latest`` names (``step_00000004`` -> 4), if any."""
    p = Path(run_dir) / "checkpoints" / "latest"
    if not p.exists():
        return None
    name = p.read_text().strip()
    return int(name.rsplit("_", 1)[1]) if name.startswith("step_") else None
