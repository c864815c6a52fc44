#!/usr/bin/env bash
# Train a grid of model sizes × sparsities (a sweep file, configs/sweep/*.yaml), then fit the
# Q-Sparse scaling law to the finished runs (qsparse-dist fit-scaling-law).
#
#   bash launch/sweep.sh --sweep configs/sweep/cpu_tiny.yaml --out runs/sweep_cpu            # CPU, 1 process
#   bash launch/sweep.sh --sweep configs/sweep/gpu.yaml --out runs/sweep_gpu --gpus 8 --data data/sweep
#
# Options:
#   --sweep FILE      sweep file (base config, sizes, sparsities)                      (required)
#   --out DIR         sweep root: one run dir per grid point, base_config.yaml, fit/   (required)
#   --data DIR        prepared data (qsparse-dist prepare-data); default OUT/data, prepared from --corpus
#   --corpus PATH     text to prepare when the data dir has no meta.json (default: the Python standard
#                     library's pydoc_data/topics.py, present on every machine)
#   --vocab-size N    tokenizer size when preparing (default 512)
#   --gpus N          run each point with `deepspeed --num_gpus N --module qsparse_dist.train` (default 0:
#                     one plain process)
#   --bootstrap N     bootstrap resamples of the fit (default 200)
#   --no-fit          train only
#   --dry-run         print the commands, run nothing
#   -- key=value ...  extra overrides for every run
#
# A run whose metrics.jsonl already reached train.steps is skipped, and an interrupted one resumes
# from its checkpoint (checkpoint.resume=true), so relaunching the same command continues the sweep.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sweep="" out="" data="" corpus="" unit=paragraph vocab=512 gpus=0 bootstrap=200 fit=1 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --sweep) sweep="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --corpus) corpus="$2"; shift 2 ;;
    --vocab-size) vocab="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --bootstrap) bootstrap="$2"; shift 2 ;;
    --no-fit) fit=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "sweep.sh: unknown option $1 (see the header of this script)" >&2; exit 2 ;;
  esac
done
[ -n "$sweep" ] || { echo "sweep.sh: --sweep FILE is required" >&2; exit 2; }
[ -n "$out" ] || { echo "sweep.sh: --out DIR is required" >&2; exit 2; }
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
run() { if [ "$dry_run" = 1 ]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi; }

data="${data:-$out/data}"
if [ ! -f "$data/meta.json" ]; then
  if [ -z "$corpus" ]; then  # prepare-data reads .txt, not .py: copy the module's text under that name
    corpus="$out/corpus/pydoc_topics.txt" unit=line  # one long line per help topic, no blank lines
    run mkdir -p "$out/corpus"
    run cp "$(python -c 'import pathlib, pydoc_data; print(pathlib.Path(pydoc_data.__file__).parent / "topics.py")')" \
        "$corpus"
  fi
  run python -m qsparse_dist.cli prepare-data --input "$corpus" --out "$data" --vocab-size "$vocab" \
      --text-unit "$unit"
fi

# the plan: line 1 = base config file, then "<name> <done|todo> <override>..." per run; every run's
# config is validated before the first one starts
plan="$(python -m qsparse_dist.analysis.sweep "$sweep" "$out" data.path="$data" "$@")"
base="$(head -n1 <<<"$plan")"
if [ "$gpus" -gt 0 ]; then
  train=(deepspeed --num_gpus "$gpus" --module qsparse_dist.train)
else
  train=(python -m qsparse_dist.cli train)
fi
n=0 skipped=0
while read -r line; do
  eval "args=($line)"
  name="${args[0]}"
  if [ "${args[1]}" = done ]; then
    echo "sweep: $name finished already, skipped"
    skipped=$((skipped + 1))
    continue
  fi
  echo "sweep: run $name"
  run "${train[@]}" --config "$base" "${args[@]:2}" </dev/null
  n=$((n + 1))
done < <(tail -n +2 <<<"$plan")
echo "sweep: $n run(s) $([ "$dry_run" = 1 ] && echo "to train" || echo trained), $skipped finished before, in $out"

if [ "$fit" = 1 ]; then
  run python -m qsparse_dist.cli fit-scaling-law --runs "$out" --out "$out/fit" --bootstrap "$bootstrap"
fi
