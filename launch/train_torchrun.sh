#!/usr/bin/env bash
# One node, torchrun:  launch/train_torchrun.sh CONFIG [key.path=value ...]
#   NPROC=8 (default: GPUs on this node, or 2 on a CPU-only machine)
set -euo pipefail
cfg="${1:?usage: launch/train_torchrun.sh CONFIG [key.path=value ...]}"; shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc-per-node "$NPROC" -m qsparse_dist.train --config "$cfg" "$@"
