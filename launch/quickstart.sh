#!/usr/bin/env bash
# Quickstart on the CPU, no network: install (.venv), prepare a corpus from the standard library's
# pydoc_data topics, train a tiny Q-Sparse GPT with 2 processes (tensor parallel 2 + ZeRO-2) through
# the DeepSpeed launcher, write tensorboard events and checkpoints.
#
#   bash launch/quickstart.sh [key.path=value ...]      (overrides go to the training config)
#
# Outputs under ${QUICKSTART_DIR:-runs/quickstart}: corpus/, data/, run/{metrics.jsonl,tensorboard,checkpoints}
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"      # creates/activates .venv, installs, cd to the repo
OUT="${QUICKSTART_DIR:-runs/quickstart}"
NPROC="${QUICKSTART_NPROC:-2}"
mkdir -p "$OUT/corpus"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

echo "== 1/3 corpus: pydoc_data topics (one document per topic)"
python - "$OUT/corpus/pydoc_topics.jsonl" <<'PY'
import json, sys
import pydoc_data.topics as t
with open(sys.argv[1], "w") as f:
    for name in sorted(t.topics):
        f.write(json.dumps({"text": t.topics[name]}) + "\n")
PY

echo "== 2/3 prepare-data: sentencepiece BPE (2048 pieces, byte fallback), packed train/valid splits"
if [ ! -f "$OUT/data/meta.json" ]; then
  qsparse-dist prepare-data --input "$OUT/corpus/pydoc_topics.jsonl" --out "$OUT/data" \
    --vocab-size 2048 --valid-fraction 0.1
fi

echo "== 3/3 train: $NPROC processes, deepspeed launcher (resumes if $OUT/run has a checkpoint)"
deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --log_level warning --module qsparse_dist.train \
  --config configs/quickstart_cpu.yaml data.path="$OUT/data" train.run_dir="$OUT/run" "$@"

python - "$OUT/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first, last = rows[0], rows[-1]
val = [r["val_loss"] for r in rows if "val_loss" in r]
print(f"loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})"
      + (f"; validation {val[0]:.3f} -> {val[-1]:.3f}" if val else ""))
PY
echo "metrics: $OUT/run/metrics.jsonl   tensorboard: tensorboard --logdir $OUT/run/tensorboard"
echo "checkpoint: $OUT/run/checkpoints/$(cat "$OUT/run/checkpoints/latest")"

echo "== export: the checkpoint as a Hugging Face model (remote code runs the Q-Sparse top-K), then decode"
rm -rf "$OUT/export-hf"
qsparse-dist export --checkpoint "$OUT/run" --format hf --out "$OUT/export-hf"
qsparse-dist generate --model "$OUT/export-hf" --prompt "The with statement" --max-new-tokens 48 \
  --temperature 0 --show-sparsity
echo "exported model: $OUT/export-hf (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"

echo "== serve: qsparse-dist serve (OpenAI-compatible) on a free 127.0.0.1 port, one completion, stop"
PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
qsparse-dist serve --model "$OUT/export-hf" --host 127.0.0.1 --port "$PORT" --device cpu 2> "$OUT/serve.log" &
SERVE_PID=$!
trap 'kill "$SERVE_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 "$SERVE_PID" 2>/dev/null || { cat "$OUT/serve.log" >&2; exit 1; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "The with statement", "max_tokens": 32, "temperature": 0}'
echo
kill -TERM "$SERVE_PID" && wait "$SERVE_PID"   # drains in-flight requests, exits 0
trap - EXIT
echo "served and stopped cleanly (log: $OUT/serve.log); docs/serving.md has the API"
