#!/usr/bin/env bash
# Fake multi-host cluster on this machine (root): network namespaces + bridge + one sshd per host.
#   launch/multinode/netns_cluster.sh up --hosts 2 --slots 2 --dir /tmp/qsd-cluster
#   launch/multinode/netns_cluster.sh exec --dir /tmp/qsd-cluster --host 0 -- launch/multinode/launch.sh \
#       --hostfile /tmp/qsd-cluster/hostfile -- --config my.yaml
#   launch/multinode/netns_cluster.sh kill --dir /tmp/qsd-cluster --host 1 --mode poweroff
#   launch/multinode/netns_cluster.sh down --dir /tmp/qsd-cluster
# Implementation and details: tests/multinode/netns_cluster.py, docs/multinode.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -m tests.multinode.netns_cluster "$@"
