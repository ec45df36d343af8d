#!/usr/bin/env bash
# Submit a training job to a running Ray cluster with `ray job submit`.
#   RAY_ADDRESS=http://HEAD:8265 bash launch/submit.sh --config mnist --run-dir /runs/mnist-1
# Arguments go to `noprop-dist train`; the driver joins the cluster with --address auto.
# The run directory must be on storage the driver can write (a shared volume on docker-compose).
# NOPROP_PYTHON: the interpreter of the cluster nodes that has noprop_dist's dependencies
# (default `python`, right for the docker image).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://127.0.0.1:8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
RAY_BIN="${RAY_BIN:-$(command -v ray || echo .venv/bin/ray)}"
exec "$RAY_BIN" job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "runs", "data", ".git"]}' \
  -- "${NOPROP_PYTHON:-python}" -m noprop_dist.cli train --address auto "$@"
