#!/usr/bin/env bash
# The test command: installs everything the suite needs into .venv (see install.sh), then runs it offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
HF_HUB_OFFLINE=1 "${LAYALIGN_VENV:-.venv}/bin/python" -m pytest -q "$@"
