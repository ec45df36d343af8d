#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; Ray tests use logical GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
exec .venv/bin/python -m pytest -q "$@"
