#!/usr/bin/env bash
# Multi-node launch of qsparse-dist training with DeepSpeed's launcher (docs/multinode.md).
#
#   launch/multinode/launch.sh --hostfile HOSTFILE [options] -- --config CFG [train args...]
#
# Run it on the first host of the hostfile (the "master").  It writes a DeepSpeed environment file
# (DS_ENV_FILE, the same format as ~/.deepspeed_env) so that every rank on every host gets
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME = --ifname   (the NIC the hosts reach each other on)
#   OMP_NUM_THREADS, and every variable of this shell named QSD_*, HF_*, TRITON_*, TOKENIZERS_*,
#   TORCH_*, DS_ACCELERATOR (DeepSpeed itself forwards only PYTHON*, UCX*, MV2*, MLFLOW*)
# then runs
#   deepspeed --hostfile H --master_addr A --master_port P --launcher L --module M -- <train args>
#
# Options:
#   --hostfile FILE     lines "<host> slots=<procs on that host>"                    (required)
#   --master-addr ADDR  address of the first host as the others see it  (default: first host, resolved)
#   --master-port PORT  rendezvous port on the master                                (default: 29500)
#   --ifname IF         network interface of the cluster network                      (default: eth0)
#   --launcher NAME     pdsh (default, needs passwordless ssh + pdsh) | openmpi | mpich | slurm ...
#   --module MOD        python module to run on every rank                 (default: qsparse_dist.train)
#   --env-file FILE     extra KEY=VALUE lines appended to the generated environment file
#   --ssh-port PORT     sshd port of the hosts, if not 22
#   --dry-run           print the environment file and the command, launch nothing
# Environment: QSD_DS_ENV_FILE=path writes the environment file there (default: a mktemp file).
# Any other option before "--" is passed to the deepspeed launcher unchanged (e.g. --num_nodes 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

hostfile="" master_addr="" master_port=29500 ifname=eth0 launcher=pdsh module=qsparse_dist.train
extra_env="" ssh_port="" dry_run=0 ds_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hostfile) hostfile="$2"; shift 2 ;;
    --master-addr) master_addr="$2"; shift 2 ;;
    --master-port) master_port="$2"; shift 2 ;;
    --ifname) ifname="$2"; shift 2 ;;
    --launcher) launcher="$2"; shift 2 ;;
    --module) module="$2"; shift 2 ;;
    --env-file) extra_env="$2"; shift 2 ;;
    --ssh-port) ssh_port="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) ds_args+=("$1"); shift ;;
  esac
done
[ -n "$hostfile" ] || { echo "launch.sh: --hostfile is required" >&2; exit 2; }
[ -f "$hostfile" ] || { echo "launch.sh: --hostfile $hostfile: no such file" >&2; exit 2; }
hostfile="$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")"

if [ -z "$master_addr" ]; then
  first_host="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")"
  [ -n "$first_host" ] || { echo "launch.sh: --hostfile $hostfile names no host" >&2; exit 2; }
  master_addr="$(getent ahostsv4 "$first_host" | awk '{print $1; exit}')"
  [ -n "$master_addr" ] || { echo "launch.sh: cannot resolve first host '$first_host'; pass --master-addr" >&2; exit 2; }
fi

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
PY="${PYTHON:-python}"

env_file="${QSD_DS_ENV_FILE:-$(mktemp -t qsd-deepspeed-env.XXXXXX)}"
{
  echo "GLOO_SOCKET_IFNAME=$ifname"
  echo "NCCL_SOCKET_IFNAME=$ifname"
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"
  env | grep -E '^(QSD_|HF_|TRITON_|TOKENIZERS_|TORCH_|DS_ACCELERATOR=)' | grep -v '^QSD_DS_ENV_FILE=' || true
  if [ -n "$extra_env" ]; then grep -vE '^[[:space:]]*(#|$)' "$extra_env" || true; fi
} > "$env_file"
export DS_ENV_FILE="$env_file"

cmd=("$PY" -m deepspeed.launcher.runner --hostfile "$hostfile" --master_addr "$master_addr"
     --master_port "$master_port" --launcher "$launcher")
[ -n "$ssh_port" ] && cmd+=(--ssh_port "$ssh_port")
cmd+=("${ds_args[@]}" --module "$module" "$@")

cd "$ROOT"  # DeepSpeed's pdsh runner cd's every host into this directory (shared filesystem)
if [ "$dry_run" = 1 ]; then
  echo "# DS_ENV_FILE=$env_file"; cat "$env_file"; printf '%q ' "${cmd[@]}"; echo
  [ -n "${QSD_DS_ENV_FILE:-}" ] || rm -f "$env_file"
  exit 0
fi
echo "launch.sh: master $master_addr:$master_port, interface $ifname, launcher $launcher, env $env_file" >&2
exec "${cmd[@]}"
