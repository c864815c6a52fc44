"""Smallest multi-node job: launched by ``deepspeed --hostfile`` on every rank of the fake cluster.

Each rank joins the gloo process group from the environment DeepSpeed's launcher sets (MASTER_ADDR/PORT,
RANK, WORLD_SIZE, LOCAL_RANK; plain ``torch.distributed``, no DeepSpeed import, to keep it cheap), all-reduces its rank and all-gathers the identity of
its host (network namespace, address of the interface gloo is told to use), then writes
``<out>/rank<R>.json``.  Usage: ``python -m tests.multinode.gloo_probe --out DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path


def _iface_addr(ifname: str) -> str | None:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))  # SIOCGIFADDR
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)  # passed by deepspeed.launcher.launch
    ap.add_argument("--loop-seconds", type=float, default=0.0,
                    help="then keep all-reducing every 0.1 s this long (a job to kill a host under)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="process-group timeout")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "")
    me = {
        "rank": rank,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "netns": os.readlink("/proc/self/ns/net"),
        "addr": _iface_addr(ifname) if ifname else None,
        "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        "cross_rank": os.environ.get("CROSS_RANK"),
        "probe_env": os.environ.get("QSD_PROBE_ENV"),
    }
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, me)
    me.update(world_size=world, rank_sum=t.item(), all=everyone)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(me))
    dist.barrier()
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < args.loop_seconds:
        try:
            dist.all_reduce(torch.ones(1))
        except Exception as e:  # a peer died: say so on this rank, then fail
            print(f"[rank {rank}] all_reduce #{step} failed after {time.monotonic() - t0:.1f} s: "
                  f"{type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None
        step += 1
        (out / f"rank{rank}.step").write_text(str(step))
        time.sleep(0.1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
