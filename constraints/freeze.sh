#!/usr/bin/env bash
# Rewrite constraints/ci.txt from a virtual environment in which the whole suite just passed:
#   bash tests/run.sh && bash constraints/freeze.sh                 (the pinned .venv)
#   QSPARSE_LATEST=1 bash tests/run.sh && bash constraints/freeze.sh .venv-latest   (adopt the newest)
# Every installed distribution (pip and setuptools included) except the project itself, exactly as
# `pip freeze --all` reports it, but torch without its local label (2.13.0, not 2.13.0+cpu): `-c`
# with torch==2.13.0 picks the local CPU wheel where one exists and lets a CUDA build of the same
# release satisfy it elsewhere.  docs/install.md explains the files.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${1:-.venv}"
{
  echo "# Exact versions the test suite passed with (Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'), CPU)."
  echo "# launch/_env.sh installs with pip -c constraints/ci.txt; regenerate with constraints/freeze.sh."
  "$VENV/bin/python" -m pip freeze --all --exclude-editable \
    | grep -viE '^(qsparse-dist|qsparse_dist)([=@ ]|$)' \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints/ci.txt.tmp
mv constraints/ci.txt.tmp constraints/ci.txt
echo "constraints/ci.txt: $(grep -c '==' constraints/ci.txt) pins from $VENV"
