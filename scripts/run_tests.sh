#!/usr/bin/env bash
# The test command: installs everything the suite needs into .venv (see install.sh) and the vLLM serving environment
# into .venv-vllm (see install_vllm.sh; tests/serving runs vLLM there), then runs the suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
bash scripts/install_vllm.sh
HF_HUB_OFFLINE=1 "${LAYALIGN_VENV:-.venv}/bin/python" -m pytest -q "$@"
