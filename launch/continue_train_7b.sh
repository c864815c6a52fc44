#!/usr/bin/env bash
# Continue-train a pretrained 7B Hugging Face model (Mistral-7B-v0.1 by default) with Q-Sparse on
# several nodes.  Run on the first host of the hostfile; WORK must be on a filesystem every host sees.
#
#   launch/continue_train_7b.sh --hf-model HF_DIR --corpus PATH [--corpus PATH ...] --hostfile HOSTFILE \
#       [--work DIR] [--config FILE] [--ifname IF] [--dry-run] [-- key.path=value ...]
#
# Steps (each skipped when its output already exists, so a relaunch resumes):
#   1. qsparse-dist import-hf   HF_DIR → WORK/import   (reference layout, bf16, original tokenizer)
#   2. qsparse-dist prepare-data CORPUS → WORK/data    (tokenized with WORK/import/tokenizer)
#   3. launch/multinode/launch.sh (deepspeed launcher) → qsparse_dist.train with
#      --config FILE checkpoint.init_from=WORK/import data.path=WORK/data [overrides]
# The training run starts from the imported weights (checkpoint.init_from) unless its run dir holds a
# checkpoint, in which case it resumes from that.  docs/finetune.md explains the recipe.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
hf_model="" hostfile="" work="${QSD_WORK:-$ROOT/work/continue_train_7b}" config="$ROOT/configs/continue_train_7b_qsparse.yaml"
ifname="eth0" dry_run=0 corpus=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hf-model) hf_model="$2"; shift 2 ;;
    --corpus) corpus+=("$2"); shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --ifname) ifname="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "continue_train_7b.sh: unknown option $1 (see the header of this script)" >&2; exit 2 ;;
  esac
done
[ -n "$hf_model" ] || { echo "continue_train_7b.sh: --hf-model HF_DIR is required" >&2; exit 2; }
[ -n "$hostfile" ] || { echo "continue_train_7b.sh: --hostfile HOSTFILE is required" >&2; exit 2; }
[ "${#corpus[@]}" -gt 0 ] || [ -f "$work/data/meta.json" ] || {
  echo "continue_train_7b.sh: --corpus PATH is required (no prepared data in $work/data yet)" >&2; exit 2; }

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
run() { if [ "$dry_run" = 1 ]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi; }

if [ ! -f "$work/import/config.yaml" ]; then
  run python -m qsparse_dist.cli import-hf --model "$hf_model" --out "$work/import" --dtype bf16
fi
if [ ! -f "$work/data/meta.json" ]; then
  run python -m qsparse_dist.cli prepare-data --input "${corpus[@]}" --out "$work/data" \
      --tokenizer "$work/import/tokenizer"
fi
launch_args=(--hostfile "$hostfile" --ifname "$ifname")
[ "$dry_run" = 1 ] && launch_args+=(--dry-run)
exec "$ROOT/launch/multinode/launch.sh" "${launch_args[@]}" -- \
  --config "$config" checkpoint.init_from="$work/import" data.path="$work/data" "$@"
