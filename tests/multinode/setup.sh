#!/usr/bin/env bash
# Install, idempotently, the system tools the network-namespace cluster needs: iproute2 (ip netns,
# veth, bridge), OpenSSH server + client (one sshd per fake host) and pdsh (DeepSpeed's default
# multi-node launcher).  Debian/Ubuntu only; needs root.  Does nothing when every tool is present.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v pdsh >/dev/null 2>&1 || need+=(pdsh)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "multinode setup: missing ${need[*]} and not root; install them or run as root" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "multinode setup: missing ${need[*]} and no apt-get on this system" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2046
apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
