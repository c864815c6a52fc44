#!/usr/bin/env bash
# Install (into .venv) and run the test suite.  Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/_env.sh"
export TRITON_INTERPRET=1
python -m pytest -q -ra "$@"
