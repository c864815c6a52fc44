"""Multi-node launch on real (network-namespace) hosts: DeepSpeed's launcher fans out over ssh/pdsh,
training spans the hosts with gloo, a dead host stops the job in bounded time, a relaunch resumes.

The hosts are Linux network namespaces joined by a bridge, each with its own sshd, hostname and
address (``tests/multinode/netns_cluster.py``); they need root and ``ip netns``.  Where that is
impossible the tests skip with the reason.  The cluster fixture removes every namespace and kills
every process started in them, whatever the outcome.  See docs/multinode.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.corpus import write_corpus
from tests.multinode.jobs import Job, latest_checkpoint_step, launch, launch_one_host, read_metrics
from tests.multinode.netns_cluster import NetnsCluster, unavailable_reason

pytestmark = [pytest.mark.dist, pytest.mark.slow]
DIST_TIMEOUT_S = 20  # parallel.dist_timeout_s of the killed-host run (> startup skew under load)

TINY = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 64, "seq_length": 32},
    "sparsity": {"linear": "qsparse", "qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.5},
    "data": {"micro_batch_size": 2},
    "optimizer": {"lr": 3.0e-3, "min_lr": 3.0e-4, "grad_clip": 0.5},
    "train": {"log_interval": 1, "seed": 7},
    "checkpoint": {"interval": 2, "keep_last": 2},
    "logging": {"progress_bar": False, "tensorboard": False, "peak_tflops": 1.0},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-node tests need Linux network namespaces (root, iproute2): {reason}")
    c = NetnsCluster(n_hosts=3, workdir=tmp_path_factory.mktemp("netns-cluster"), slots=2)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from qsparse_dist.data import prepare_data

    base = tmp_path_factory.mktemp("mn-data")
    src = write_corpus(base / "corpus.txt", 100_000)
    prepare_data([str(src)], base / "data", vocab_size=320, valid_fraction=0.05, log=lambda *a: None)
    return base / "data"


def _config(path: Path, data_dir: Path, run_dir: Path, **sections) -> Path:
    import copy

    d = copy.deepcopy(TINY)
    d["data"]["path"] = str(data_dir)
    d["train"]["run_dir"] = str(run_dir)
    for sec, vals in sections.items():
        d.setdefault(sec, {}).update(vals)
    path.write_text(yaml.safe_dump(d))
    return path


def _ok(job: Job, timeout: float) -> None:
    rc = job.wait(timeout)
    assert rc == 0, f"launch failed (rc={rc}):\n{job.tail()}"


# --------------------------------------------------------------------------- the hosts themselves
def test_hosts_are_separate_and_reach_each_other_over_ssh(cluster):
    p = cluster.run(0, ["pdsh", "-R", "ssh", "-w", "node0,node1,node2", "hostname; hostname -I"], timeout=60)
    assert p.returncode == 0, p.stderr
    lines = sorted(p.stdout.split("\n"))
    for i, h in enumerate(cluster.hosts):
        assert f"{h.name}: {h.name}" in lines, p.stdout
        assert f"{h.name}: {h.addr}" in [x.strip() for x in lines], p.stdout
        assert cluster.run(i, ["readlink", "/proc/self/ns/net"]).stdout != cluster.run(
            (i + 1) % 3, ["readlink", "/proc/self/ns/net"]).stdout
    # the test network exists only inside the namespaces: the machine itself has no such address
    own = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    assert "10.231.0." not in own


# --------------------------------------------------------------------------- launcher fan-out
def test_deepspeed_pdsh_places_ranks_on_hosts_and_propagates_env(cluster, tmp_path):
    """2 hosts × 2 processes (``--num_nodes 2`` trims the 3-host hostfile): ranks 0,1 on node0 and
    2,3 on node1, gloo through eth0, the launcher's environment reaches remote ranks."""
    job = launch(cluster, tmp_path / "job", ["--out", tmp_path / "res"], ds_args=["--num_nodes", "2"],
                 module="tests.multinode.gloo_probe", env={"QSD_PROBE_ENV": "from-the-launcher"})
    _ok(job, 240)
    import json

    res = [json.loads((tmp_path / "res" / f"rank{r}.json").read_text()) for r in range(4)]
    netns = {h: cluster.run(i, ["readlink", "/proc/self/ns/net"]).stdout.strip()
             for i, h in enumerate(("node0", "node1"))}
    for r, d in enumerate(res):
        host = cluster.hosts[r // 2]
        assert d["world_size"] == 4 and d["rank_sum"] == 6.0
        assert d["netns"] == netns[host.name], (r, d)
        assert d["addr"] == host.addr and d["local_rank"] == r % 2 and d["cross_rank"] == str(r // 2)
        assert d["master"] == f"{cluster.master_addr}:29500"
        assert d["probe_env"] == "from-the-launcher"
    assert "GLOO_SOCKET_IFNAME=eth0" in (tmp_path / "job" / "deepspeed_env").read_text()


def test_deepspeed_no_ssh_mode_one_launcher_per_host(cluster, tmp_path):
    """``--no_ssh --node_rank i`` started on every host by hand (what a scheduler would do): same
    rank layout, no ssh involved; ``--num_gpus 1`` trims each host to one process."""
    procs = []
    for i in (0, 1):
        argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", cluster.hostfile,
                "--num_nodes", "2", "--num_gpus", "1", "--no_ssh", "--node_rank", str(i),
                "--master_addr", cluster.master_addr, "--master_port", "29600",
                "--module", "tests.multinode.gloo_probe", "--out", tmp_path / "res"]
        log = open(tmp_path / f"node{i}.log", "wb")  # noqa: SIM115
        procs.append((cluster.popen(i, argv, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=Path(__file__).resolve().parents[1]), log))
    for i, (p, log) in enumerate(procs):
        rc = p.wait(timeout=240)
        log.close()
        assert rc == 0, (tmp_path / f"node{i}.log").read_text()[-4000:]
    import json

    for r in (0, 1):
        d = json.loads((tmp_path / "res" / f"rank{r}.json").read_text())
        assert d["world_size"] == 2 and d["addr"] is None and d["cross_rank"] == str(r)
        assert d["all"][0]["netns"] != d["all"][1]["netns"]


# --------------------------------------------------------------------------- training across hosts
def test_train_two_hosts_matches_single_node(cluster, data_dir, tmp_path):
    """TP=2 inside each host, ZeRO-1 data parallelism across the 2 hosts: the same per-step losses and
    gradient norms as the 4 processes of one host with the same layout (measured: bit-identical)."""
    cfg = _config(tmp_path / "tp2.yaml", data_dir, tmp_path / "multi",
                  parallel={"tp": 2, "zero_stage": 1}, data={"global_batch_size": 8},
                  train={"steps": 4}, schedule={"kind": "cosine", "warmup_steps": 1},
                  checkpoint={"interval": 0})
    multi = launch(cluster, tmp_path / "job-multi", ["--config", cfg], ds_args=["--num_nodes", "2"])
    _ok(multi, 420)
    log = multi.log.read_text(errors="replace")
    assert re.search(r"^node1: .*dist_world_size=4", log, re.M), multi.tail()
    assert re.search(r"^node1: .*process \d+ spawned", log, re.M), multi.tail()
    # the reference: one host, 4 processes, no hostfile (--num_gpus: the CPU accelerator reports 1 device)
    single = launch_one_host(cluster, tmp_path / "job-single",
                             ["--config", cfg, f"train.run_dir={tmp_path / 'single'}"], nproc=4)
    _ok(single, 420)
    a, b = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert [m["step"] for m in a] == [1, 2, 3, 4] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-6 * max(1.0, y["grad_norm"])
    assert a[0]["loss"] - a[-1]["loss"] > 0.05  # it trains
    assert latest_checkpoint_step(tmp_path / "multi") == 4


def test_dead_host_stops_job_in_bounded_time_and_relaunch_resumes(cluster, data_dir, tmp_path):
    """3 hosts × 1 process (ZeRO-1 over 3 hosts).  After a checkpoint, node2 is powered off (its link
    deleted, then its processes SIGKILLed: no FIN/RST reaches the others).  Every surviving rank must
    fail with a clear error within ``dist_timeout_s`` + margin, the newest checkpoint must verify,
    and a relaunch (node2 back) must resume from it and reproduce the killed run's losses."""
    from qsparse_dist.train.checkpoint import verify_checkpoint

    run = tmp_path / "run"
    cfg = _config(tmp_path / "dp3.yaml", data_dir, run, parallel={"zero_stage": 1, "dist_timeout_s": DIST_TIMEOUT_S},
                  data={"global_batch_size": 6}, train={"steps": 10_000},
                  schedule={"kind": "constant", "warmup_steps": 1})  # constant: the relaunch may stop earlier
    job = launch(cluster, tmp_path / "job-killed", ["--config", cfg], ds_args=["--num_gpus", "1"])
    deadline = time.monotonic() + 300
    while True:  # wait for a checkpoint and at least one step logged after it
        latest, steps = latest_checkpoint_step(run), [m["step"] for m in read_metrics(run)]
        if latest and steps and steps[-1] > latest:
            break
        assert job.proc.poll() is None, f"job ended before the kill:\n{job.tail()}"
        assert time.monotonic() < deadline, f"no checkpoint within 300 s:\n{job.tail()}"
        time.sleep(0.1)
    t_kill = time.monotonic()
    assert cluster.kill_host(2, mode="poweroff")
    rc = job.wait(DIST_TIMEOUT_S + 60)
    stopped_after = time.monotonic() - t_kill
    assert rc != 0, job.tail()
    for rank in (0, 1):
        text = job.rank_log(rank)
        m = re.search(rf"qsparse-dist train: error: rank {rank} on node{rank}: a collective failed.*", text)
        assert m, f"rank {rank} gave no clear error:\n{text[-3000:]}"
        assert re.search(r"Timed out waiting|Connection closed by peer|Connection reset", m.group(0)), m.group(0)
    killed_metrics = {m["step"]: m for m in read_metrics(run)}

    last = latest_checkpoint_step(run)
    assert last is not None and last >= latest
    verify_checkpoint(run / "checkpoints" / f"step_{last:08d}")  # raises CheckpointError if damaged

    cluster.restart_host(2)  # the replaced node
    resumed = launch(cluster, tmp_path / "job-resumed", ["--config", cfg, f"train.steps={last + 2}"],
                     ds_args=["--num_gpus", "1"])
    _ok(resumed, 420)
    assert re.search(rf"resumed from \S*step_{last:08d} at step {last}\b", resumed.rank_log(0)), resumed.tail()
    after = read_metrics(run)
    assert [m["step"] for m in after] == list(range(1, last + 3))
    overlap = [s for s in (last + 1, last + 2) if s in killed_metrics]
    for s in overlap:  # same batches, same RNG, same weights: the same loss as before the kill
        assert after[s - 1]["loss"] == killed_metrics[s]["loss"], (s, after[s - 1], killed_metrics[s])
    print(f"\nkill -> job stopped in {stopped_after:.1f} s (dist_timeout_s={DIST_TIMEOUT_S}); resumed at "
          f"step {last}; loss compared with the killed run at steps {overlap}")
