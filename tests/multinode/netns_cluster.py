"""A cluster of fake hosts on one Linux machine, for testing multi-node launches for real.

Each host is a network namespace ``<id>-n<i>`` with one interface ``eth0`` (a veth pair whose other
end is a port of a bridge living in a private switch namespace ``<id>-sw``), the address
``<subnet>.<i+1>/24``, and its own ``sshd`` listening on that address only.  The root namespace is
not connected to the bridge: all traffic stays on the private test addresses inside the namespaces.

Name resolution and ssh configuration are per host: ``ip netns exec NS`` bind-mounts every entry of
``/etc/netns/NS/`` over ``/etc/``, so each host sees its own ``/etc/hosts`` (``node0 … nodeN``) and
``/etc/ssh`` (client config with the cluster's key, no host-key prompts, keep-alives that notice a
dead peer in ~6 s).  Inside the cluster ``ssh node1 hostname`` and ``pdsh -w node0,node1`` work as
on real hosts, which is what DeepSpeed's launcher needs.

Every process of a host (its sshd, hence everything launched over ssh) also runs in a UTS namespace
of its own, so ``hostname`` answers ``node<i>``, which resolves to the host's address.

What the namespaces do *not* isolate: the PID space and the filesystem.  The repository, the
virtualenv and a checkpoint directory are therefore visible on every host (like an NFS home), and
one host's processes are found with ``ip netns pids`` (what :meth:`NetnsCluster.kill_host` kills).

Command line (root)::

    python -m tests.multinode.netns_cluster up --hosts 2 --slots 2 --dir /tmp/qsd-cluster
    python -m tests.multinode.netns_cluster exec --dir /tmp/qsd-cluster --host 0 -- ssh node1 hostname
    python -m tests.multinode.netns_cluster down --dir /tmp/qsd-cluster
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SETUP_SCRIPT = Path(__file__).with_name("setup.sh")
NETNS_ETC = Path("/etc/netns")
IFNAME = "eth0"
"""Interface name of every host (identical in each namespace, so one GLOO_SOCKET_IFNAME fits all)."""


class ClusterError(RuntimeError):
    """The cluster could not be built or driven (message says which step)."""


def _sh(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed (rc={proc.returncode}): {proc.stderr.strip()}")
    return proc


def ensure_tools() -> None:
    """Run ``setup.sh`` (apt-get install of iproute2, openssh, pdsh) when a tool is missing."""
    if all(shutil.which(t) for t in ("ip", "ssh", "ssh-keygen", "pdsh")) and Path("/usr/sbin/sshd").exists():
        return
    proc = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ClusterError(f"{SETUP_SCRIPT} failed: {proc.stderr.strip()[-2000:]}")


def unavailable_reason() -> str | None:
    """None when network namespaces can be made here, else why not (for a pytest skip message)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); not root here"
    if sys.platform != "linux":
        return f"network namespaces are Linux only (platform {sys.platform})"
    try:
        ensure_tools()
    except (ClusterError, subprocess.TimeoutExpired) as e:
        return f"cannot install iproute2/openssh/pdsh: {e}"
    probe = f"qsdprobe-{secrets.token_hex(3)}"
    made = _sh(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"'ip netns add' is not permitted here: {made.stderr.strip()}"
    _sh(["ip", "netns", "del", probe], check=False)
    return None


@dataclass
class Host:
    name: str  # hostname inside the cluster (hostfile, ssh)
    netns: str  # network-namespace name
    addr: str  # IPv4 address on the cluster bridge
    port: str  # bridge port (in the switch namespace) of this host's veth pair


@dataclass
class ClusterState:
    cid: str
    workdir: str
    switch: str
    hosts: list[Host]
    slots: int

    def save(self) -> None:
        Path(self.workdir, "cluster.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, workdir: str | Path) -> ClusterState:
        raw = json.loads(Path(workdir, "cluster.json").read_text())
        raw["hosts"] = [Host(**h) for h in raw["hosts"]]
        return cls(**raw)


def _sshd_config(host: Host, keydir: Path) -> str:
    return "\n".join([
        f"ListenAddress {host.addr}",
        "Port 22",
        f"HostKey {keydir}/ssh_host_ed25519_key",
        f"AuthorizedKeysFile {keydir}/authorized_keys",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",  # the key lives under /tmp (world-writable parent)
        f"PidFile {keydir}/sshd-{host.name}.pid",
        "ClientAliveInterval 2",
        "ClientAliveCountMax 3",
        "MaxStartups 100",
        "MaxSessions 100",
        "LogLevel ERROR",
        "",
    ])


def _ssh_config(keydir: Path) -> str:
    return "\n".join([
        "Host *",
        "  User root",
        f"  IdentityFile {keydir}/id_ed25519",
        "  IdentitiesOnly yes",
        "  StrictHostKeyChecking no",
        "  UserKnownHostsFile /dev/null",
        "  GlobalKnownHostsFile /dev/null",
        "  BatchMode yes",
        "  ConnectTimeout 5",
        # a host that vanishes without a FIN/RST is noticed after 2 s x 3 missed probes
        "  ServerAliveInterval 2",
        "  ServerAliveCountMax 3",
        "  LogLevel ERROR",
        "",
    ])


class NetnsCluster:
    """``n_hosts`` fake hosts with sshd and a hostfile (``slots`` per host).

    Use as a context manager; :meth:`close` always removes the namespaces, their processes and the
    ``/etc/netns`` entries, whatever happened before.
    """

    def __init__(self, n_hosts: int = 2, workdir: str | Path | None = None, slots: int = 1,
                 subnet: str = "10.231.0", cid: str | None = None):
        if not 1 <= n_hosts <= 250:
            raise ValueError(f"n_hosts must be in [1, 250], got {n_hosts}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        cid = cid or f"qsdmn{secrets.token_hex(3)}"
        workdir = Path(workdir) if workdir else Path("/tmp") / cid
        hosts = [Host(name=f"node{i}", netns=f"{cid}-n{i}", addr=f"{subnet}.{i + 1}", port=f"p{i}")
                 for i in range(n_hosts)]
        self.state = ClusterState(cid=cid, workdir=str(workdir), switch=f"{cid}-sw", hosts=hosts,
                                  slots=slots)
        self._started = False

    @classmethod
    def attach(cls, workdir: str | Path) -> NetnsCluster:
        """The cluster described by ``<workdir>/cluster.json`` (made by ``up``)."""
        self = cls.__new__(cls)
        self.state = ClusterState.load(workdir)
        self._started = True
        return self

    # ------------------------------------------------------------------ properties
    @property
    def hosts(self) -> list[Host]:
        return self.state.hosts

    @property
    def workdir(self) -> Path:
        return Path(self.state.workdir)

    @property
    def keydir(self) -> Path:
        return self.workdir / "ssh"

    @property
    def hostfile(self) -> Path:
        return self.workdir / "hostfile"

    @property
    def master_addr(self) -> str:
        return self.hosts[0].addr

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> NetnsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, ready_timeout: float = 60) -> NetnsCluster:
        ensure_tools()
        self._started = True
        try:
            self._build(ready_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _build(self, ready_timeout: float) -> None:
        st = self.state
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keydir.mkdir(exist_ok=True)
        st.save()  # before anything exists, so `down` can always clean up
        kd = self.keydir
        for key in ("id_ed25519", "ssh_host_ed25519_key"):
            if not (kd / key).exists():
                _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{st.cid}-{key}",
                     "-f", str(kd / key)])
        shutil.copy(kd / "id_ed25519.pub", kd / "authorized_keys")
        self.hostfile.write_text("".join(f"{h.name} slots={st.slots}\n" for h in self.hosts))
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # sshd's privsep dir

        _sh(["ip", "netns", "add", st.switch])
        _sh(["ip", "-n", st.switch, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", st.switch, "link", "set", "br0", "up"])
        for h in self.hosts:
            _sh(["ip", "netns", "add", h.netns])
            self._wire(h)
            self._write_etc(h)
            self._start_sshd(h)
        self.wait_ready(ready_timeout)

    def _wire(self, h: Host) -> None:
        """Plug host ``h`` into the bridge: veth pair eth0 <-> switch port, address, links up."""
        sw = self.state.switch
        _sh(["ip", "link", "add", IFNAME, "netns", h.netns, "type", "veth",
             "peer", "name", h.port, "netns", sw])
        _sh(["ip", "-n", sw, "link", "set", h.port, "master", "br0"])
        _sh(["ip", "-n", sw, "link", "set", h.port, "up"])
        _sh(["ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", IFNAME])
        _sh(["ip", "-n", h.netns, "link", "set", IFNAME, "up"])
        _sh(["ip", "-n", h.netns, "link", "set", "lo", "up"])

    def _write_etc(self, h: Host) -> None:
        etc_hosts = "127.0.0.1 localhost\n" + "".join(f"{x.addr} {x.name}\n" for x in self.hosts)
        etc = NETNS_ETC / h.netns
        (etc / "ssh").mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(etc_hosts)
        (etc / "ssh" / "ssh_config").write_text(_ssh_config(self.keydir))
        (etc / "ssh" / "sshd_config").write_text(_sshd_config(h, self.keydir))

    def _start_sshd(self, h: Host) -> None:
        with open(self.workdir / f"sshd-{h.name}.log", "ab") as log:
            subprocess.Popen(self._on(h, ["/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/sshd_config"]),
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def restart_host(self, host: int, ready_timeout: float = 60) -> None:
        """Bring a killed host back (fresh link if it was unplugged, fresh sshd): the "replaced node"."""
        h = self.hosts[host]
        self._kill_netns(h.netns)
        if _sh(["ip", "-n", h.netns, "link", "show", IFNAME], check=False).returncode != 0:
            self._wire(h)
        self._start_sshd(h)
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every host accepts ``ssh <host> true`` from host 0 (raises after ``timeout``)."""
        deadline = time.monotonic() + timeout
        for h in self.hosts:
            while True:
                p = self.run(0, ["ssh", h.name, "true"], timeout=20)
                if p.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    log = (self.workdir / f"sshd-{h.name}.log").read_text(errors="replace")[-1500:]
                    raise ClusterError(f"sshd on {h.name} ({h.addr}) not reachable after {timeout:.0f} s: "
                                       f"{p.stderr.strip()}\nsshd log:\n{log}")
                time.sleep(0.3)

    def close(self) -> None:
        """Kill every process in the cluster's namespaces, delete them and their /etc/netns entries."""
        if not getattr(self, "_started", False):
            return
        st = self.state
        for ns in [h.netns for h in self.hosts] + [st.switch]:
            self._kill_netns(ns)
            _sh(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._started = False

    # ------------------------------------------------------------------ running things on hosts
    @staticmethod
    def _on(h: Host, argv: list[str]) -> list[str]:
        # netns + /etc/netns binds (ip netns exec), own UTS namespace so `hostname` says h.name
        return ["ip", "netns", "exec", h.netns, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', h.name, *map(str, argv)]

    def cmd(self, host: int, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run on host ``host`` (its netns, hostname, hosts file, ssh config)."""
        return self._on(self.hosts[host], argv)

    def run(self, host: int, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(host, argv), timeout=timeout, **kw)

    def popen(self, host: int, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        return subprocess.Popen(self.cmd(host, argv), **kw)

    def pids(self, host: int) -> list[int]:
        return _netns_pids(self.hosts[host].netns)

    # ------------------------------------------------------------------ failures
    def kill_host(self, host: int, mode: str = "poweroff") -> list[int]:
        """Make host ``host`` die; return the PIDs killed.

        ``crash``: SIGKILL every process on the host; its kernel still closes the sockets, so peers
        see a reset at once.  ``poweroff``: first delete the host's link (the veth pair), then
        SIGKILL: nothing more leaves the host, peers see silence and must time out.
        """
        if mode not in ("crash", "poweroff"):
            raise ValueError(f"mode must be 'crash' or 'poweroff', got {mode!r}")
        h = self.hosts[host]
        if mode == "poweroff":
            _sh(["ip", "-n", self.state.switch, "link", "del", h.port], check=False)
        return self._kill_netns(h.netns)

    @staticmethod
    def _kill_netns(ns: str, timeout: float = 10) -> list[int]:
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while (pids := _netns_pids(ns)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return sorted(set(killed))


def _netns_pids(ns: str) -> list[int]:
    p = _sh(["ip", "netns", "pids", ns], check=False)
    if p.returncode != 0:
        return []
    return [int(x) for x in p.stdout.split() if x.isdigit() and int(x) != os.getpid()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.multinode.netns_cluster", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create the hosts, start sshd, write <dir>/hostfile")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--slots", type=int, default=1, help="processes per host in the hostfile")
    up.add_argument("--dir", required=True, help="cluster directory (keys, hostfile, cluster.json)")
    up.add_argument("--subnet", default="10.231.0", help="first three octets of the private /24")
    down = sub.add_parser("down", help="kill everything on the hosts and delete the namespaces")
    down.add_argument("--dir", required=True)
    ex = sub.add_parser("exec", help="run a command on one host (its netns, /etc/hosts, ssh config)")
    ex.add_argument("--dir", required=True)
    ex.add_argument("--host", type=int, default=0)
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    kill = sub.add_parser("kill", help="kill one host (crash: SIGKILL; poweroff: unplug then SIGKILL)")
    kill.add_argument("--dir", required=True)
    kill.add_argument("--host", type=int, required=True)
    kill.add_argument("--mode", choices=["crash", "poweroff"], default="poweroff")
    a = ap.parse_args(argv)
    if a.cmd == "up":
        c = NetnsCluster(a.hosts, a.dir, slots=a.slots, subnet=a.subnet).start()
        print(f"cluster {c.state.cid}: " + ", ".join(f"{h.name}={h.addr} (netns {h.netns})" for h in c.hosts))
        print(f"hostfile: {c.hostfile}\nmaster_addr: {c.master_addr}  interface: {IFNAME}")
        return 0
    c = NetnsCluster.attach(a.dir)
    if a.cmd == "down":
        c.close()
        return 0
    if a.cmd == "kill":
        print("killed pids:", c.kill_host(a.host, a.mode))
        return 0
    argv_ = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    return subprocess.call(c.cmd(a.host, argv_))


if __name__ == "__main__":
    raise SystemExit(main())
