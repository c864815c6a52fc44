#!/usr/bin/env bash
# Corpus recipe: the Python sources of the installed packages (site-packages) — real code nobody in
# this project wrote, present on every machine with Python (hundreds of MB where torch is installed).
# One file = one document; exact duplicates (vendored copies, empty __init__.py) dropped; binary or
# non-UTF-8 files skipped with a warning; validation split by whole documents.
#
#   bash data/site_packages_py.sh [OUT=data/prepared/site_packages_py] [VOCAB=32000] [extra prepare-data args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-data/prepared/site_packages_py}"; VOCAB="${2:-32000}"; shift $(( $# > 2 ? 2 : $# )) || true
SITE="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
exec qsparse-dist prepare-data --input "$SITE" --glob '**/*.py' --text-unit document \
  --vocab-size "$VOCAB" --valid-fraction 0.005 --out "$OUT" "$@"
