#!/usr/bin/env bash
# Several nodes from a hostfile (DeepSpeed launcher over pdsh/ssh), run on the first host:
#
#   launch/train_multinode.sh HOSTFILE [CONFIG] [key.path=value ...]
#
# HOSTFILE lines: "<host> slots=<processes on that host>" (e.g. "node1 slots=8").  CONFIG defaults to
# configs/multinode_example.yaml.  data.path and train.run_dir must be on a filesystem every host
# sees (checkpoints are written by all ranks into one directory).  The environment every rank needs
# (network interface, thread counts) is forwarded by launch/multinode/launch.sh: IFNAME=eth0 selects
# the NIC; MASTER_PORT the rendezvous port.  Add `--dry-run` via DRY_RUN=1 to print the command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
hostfile="${1:?usage: launch/train_multinode.sh HOSTFILE [CONFIG] [key.path=value ...]}"; shift
cfg="$ROOT/configs/multinode_example.yaml"
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then cfg="$1"; shift; fi
extra=()
[ "${DRY_RUN:-0}" = 1 ] && extra+=(--dry-run)
exec "$ROOT/launch/multinode/launch.sh" --hostfile "$hostfile" --ifname "${IFNAME:-eth0}" \
  --master-port "${MASTER_PORT:-29500}" "${extra[@]}" -- --config "$cfg" "$@"
