# Sourced by launch/quickstart.sh and tests/run.sh: create/activate a virtual environment, install the
# project into it, cd to the repository.  docs/install.md explains every step.
#
# Pinned (default): .venv, every package at exactly the version in constraints/ci.txt (pip -c), the
#   set the test suite passed with, so a fresh machine gets what CI tested.  Reinstalls when
#   pyproject.toml, constraints/ci.txt, QSPARSE_EXTRAS or the torch version change (a hash stamp).
# QSPARSE_LATEST=1: .venv-latest, the newest release of every dependency that pyproject's ranges allow
#   (re-resolved, eager upgrade, on every run), torch excepted; prints what differs from ci.txt.
# Both: torch goes first, pinned (ci.txt's torch, or QSPARSE_TORCH_VERSION), which resolves to the
#   local CPU wheel where one exists, and every later install is constrained to it, so that no
#   dependency range ever pulls a multi-GB CUDA build.  DS_BUILD_OPS=0 installs DeepSpeed without
#   compiling ops.  When constraints/oldest-transformers.txt exists, the oldest supported transformers
#   goes with --no-deps into VENV/oldest-transformers (for a subprocess's PYTHONPATH; tests export it
#   as QSPARSE_OLDEST_TRANSFORMERS).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
CONSTRAINTS=constraints/ci.txt
OLDEST=constraints/oldest-transformers.txt
EXTRAS="${QSPARSE_EXTRAS:-test}"
TORCH_VERSION="${QSPARSE_TORCH_VERSION:-$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' "$CONSTRAINTS")}"
LATEST="${QSPARSE_LATEST:-0}"
if [ "$LATEST" = 1 ]; then VENV=.venv-latest; else VENV=.venv; fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0

_qsparse_pip() { python -m pip install -q "$@"; }
_qsparse_torch() { python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null; }

if [ "$LATEST" = 1 ]; then
  echo "QSPARSE_LATEST=1: installing the newest releases into $VENV (torch stays $TORCH_VERSION)" >&2
  _qsparse_pip --upgrade pip
  _qsparse_torch >/dev/null || _qsparse_pip "torch==$TORCH_VERSION"
  echo "torch==$(_qsparse_torch)" > "$VENV/torch-pin.txt"
  _qsparse_pip --upgrade --upgrade-strategy eager -c "$VENV/torch-pin.txt" -e ".[$EXTRAS]"
  python -m pip freeze --all --exclude-editable > "$VENV/versions.txt"
  python - "$CONSTRAINTS" "$VENV/versions.txt" >&2 <<'PY'
import re
import sys


def pins(path):
    out = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


ci, got = pins(sys.argv[1]), pins(sys.argv[2])
base = lambda v: v.split("+", 1)[0]  # noqa: E731  (2.13.0+cpu is the pinned 2.13.0)
diff = [(n, ci.get(n, "-"), v) for n, v in sorted(got.items()) if base(ci.get(n, "")) != base(v)]
print(f"QSPARSE_LATEST=1: {len(got)} packages (full list: {sys.argv[2]}); {len(diff)} differ from {sys.argv[1]}:")
for name, pinned, now in diff:
    print(f"  {name:32s} {pinned:>16s} -> {now}")
PY
else
  STAMP="$VENV/.qsparse-installed"
  KEY="$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1) extras=$EXTRAS torch=$TORCH_VERSION"
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$KEY" ]; then
    _qsparse_pip -c "$CONSTRAINTS" pip
    _qsparse_torch >/dev/null || _qsparse_pip -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
    _qsparse_pip -c "$CONSTRAINTS" -e ".[$EXTRAS]"
    echo "$KEY" > "$STAMP"
  fi
fi

if [ -f "$OLDEST" ]; then
  OLDEST_DIR="$VENV/oldest-transformers"
  OLDEST_KEY="$(sha256sum "$OLDEST" | cut -d' ' -f1)"
  if [ "$(cat "$OLDEST_DIR/.qsparse-installed" 2>/dev/null)" != "$OLDEST_KEY" ]; then
    rm -rf "$OLDEST_DIR"
    _qsparse_pip --no-deps --target "$OLDEST_DIR" -r "$OLDEST"
    echo "$OLDEST_KEY" > "$OLDEST_DIR/.qsparse-installed"
  fi
  export QSPARSE_OLDEST_TRANSFORMERS="$ROOT/$OLDEST_DIR"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
