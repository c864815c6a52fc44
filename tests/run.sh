#!/usr/bin/env bash
# Install, lint, test.  Extra arguments go to pytest.  docs/install.md has the details.
#   bash tests/run.sh                    .venv, pinned to constraints/ci.txt (what CI runs)
#   QSPARSE_LATEST=1 bash tests/run.sh   .venv-latest, the newest releases of every dependency
# Lint first (ruff check ., then the layer contract of pyproject.toml with lint-imports; fail fast); TRITON_INTERPRET=1 (Triton kernels in the CPU interpreter)
# unless the caller set it, e.g. TRITON_INTERPRET=0 on a GPU machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/_env.sh"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
python -m ruff check .
lint-imports --no-cache >/dev/null || lint-imports --no-cache
python -m pytest -q -ra "$@"
