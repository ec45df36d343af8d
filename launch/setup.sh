#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv in the repo root and install noprop_dist
# with the pinned versions of constraints.txt. Re-running is cheap: pip runs again only when
# setup.cfg or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.noprop_dist-installed
want=$(cat setup.cfg constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import noprop_dist" 2>/dev/null; then
  echo "[setup] installing noprop_dist and its pinned dependencies (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
