#!/usr/bin/env bash
# Quality sweep: does Q-Sparse train as well as dense here?  The same GPT (configs/gpt_125m_*.yaml
# shapes: hidden 768, 12 layers, 12 heads, FFN 2048 ReLU²GLU; ~85M non-embedding parameters), the same
# data in the same order, the same seed and tokens for every kind; only the linear kind differs.
# BitNet kinds use configs/gpt_125m_bitnet_qsparse.yaml's two-stage LR/WD schedule (as the paper does),
# the others cosine.  Then `qsparse-dist report` writes the table and plots.
#
#   bash launch/quality_sweep.sh DATA_DIR OUT_DIR [STEPS=300] [KIND ...]
#   KIND: dense qsparse40 qsparse60 block16_32 block2_4 bitnet bitnet_qsparse60 (default: all but block2_4)
#   block2_4 = N:M 2:4 (Block Q-Sparse, block_size 4; sparsity.sparse_tensor_cores=auto: dense GEMM, docs/ops.md)
# One step = 32 sequences × 1024 tokens = 32,768 tokens; STEPS=300 ≈ 9.8M tokens per run.
set -euo pipefail
DATA="$1"; OUT="$2"; STEPS="${3:-300}"; shift $(( $# >= 3 ? 3 : $# ))
KINDS=("$@"); [ ${#KINDS[@]} -gt 0 ] || KINDS=(dense qsparse40 qsparse60 block16_32 bitnet bitnet_qsparse60)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
common=("data.path=$DATA" "train.steps=$STEPS" "model.seq_length=1024" "data.micro_batch_size=32"
        "data.global_batch_size=32" "schedule.warmup_steps=$((STEPS / 10))" "train.eval_interval=$((STEPS / 4))"
        "train.eval_iters=20" "train.log_interval=10" "checkpoint.interval=$STEPS" "checkpoint.keep_last=1"
        "logging.tensorboard=false" "logging.progress_bar=false")
all4() { echo "sparsity.qkv=$1 sparsity.out=$1 sparsity.up=$1 sparsity.down=$1"; }
for kind in "${KINDS[@]}"; do
  case "$kind" in
    dense)            cfg=configs/gpt_125m_dense.yaml;          ov="" ;;
    qsparse40)        cfg=configs/gpt_125m_qsparse.yaml;        ov="$(all4 0.4)" ;;
    qsparse60)        cfg=configs/gpt_125m_qsparse.yaml;        ov="$(all4 0.6)" ;;
    block16_32)       cfg=configs/gpt_125m_qsparse.yaml;        ov="sparsity.linear=block_qsparse sparsity.block_size=32 $(all4 0.5)" ;;
    block2_4)         cfg=configs/gpt_125m_qsparse.yaml;        ov="sparsity.linear=block_qsparse sparsity.block_size=4 $(all4 0.5)" ;;
    bitnet)           cfg=configs/gpt_125m_bitnet_qsparse.yaml; ov="sparsity.linear=bitnet $(all4 0.0)" ;;
    bitnet_qsparse60) cfg=configs/gpt_125m_bitnet_qsparse.yaml; ov="$(all4 0.6)" ;;
    *) echo "quality_sweep.sh: unknown kind $kind" >&2; exit 2 ;;
  esac
  echo "== $kind ($cfg $ov)"
  # shellcheck disable=SC2086
  qsparse-dist train --config "$cfg" "${common[@]}" $ov "train.run_dir=$OUT/$kind"
done
qsparse-dist report "$OUT" --out "$OUT/report"
