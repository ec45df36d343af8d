#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; Ray tests use logical GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
# The suite's own Ray instances run without token authentication (the security tests start
# theirs in child processes with a clean environment); `train` alone closes its private Ray.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec .venv/bin/python -m pytest -q "$@"
