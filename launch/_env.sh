# Sourced by launch/quickstart.sh and tests/run.sh: create/activate .venv and install the project.
# torch is installed first, pinned, from the local CPU wheel where one exists, so that no dependency
# range ever pulls a multi-GB CUDA build.  DS_BUILD_OPS=0 installs DeepSpeed without compiling ops.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
STAMP=.venv/.qsparse-installed
EXTRAS="${QSPARSE_EXTRAS:-test}"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || ! grep -qx "$EXTRAS" "$STAMP"; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${QSPARSE_TORCH_VERSION:-2.13.0}"
  python -m pip install -q -e ".[${EXTRAS}]"
  echo "$EXTRAS" > "$STAMP"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
