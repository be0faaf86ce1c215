#!/usr/bin/env bash
# Sets up a virtual environment on a fresh machine (CPU torch first) and runs the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LAYALIGN_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q "$@"
