#!/usr/bin/env bash
# Set up, then run the main job on the embedded default (offline MNIST subset) through the
# Ray coordinator on a private local Ray. Extra arguments go to `noprop-dist train`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
exec .venv/bin/noprop-dist train --config demo "$@"
