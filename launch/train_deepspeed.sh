#!/usr/bin/env bash
# One node, DeepSpeed launcher:  launch/train_deepspeed.sh CONFIG [key.path=value ...]
#   NPROC=8 (default: GPUs on this node, or 2 on a CPU-only machine)   MASTER_PORT=29500
#   DS_LOG_LEVEL=info shows the launcher's own INFO lines (default warning); --verbose those of the ranks
# On the CPU use --num_gpus (what this script does): `--include localhost:0,1` fails there because the
# CPU accelerator reports a single device.
set -euo pipefail
cfg="${1:?usage: launch/train_deepspeed.sh CONFIG [key.path=value ...]}"; shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --log_level "${DS_LOG_LEVEL:-warning}" \
  --module qsparse_dist.train --config "$cfg" "$@"
