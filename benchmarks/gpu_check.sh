#!/usr/bin/env bash
# The GPU check: on one machine with an NVIDIA GPU and no network (the steps' time limits add up to 16 minutes, 23 with vLLM), run the GPU tests
# (`pytest -m gpu`: bf16 against fp32, compiled static-cache decoding, SDPA against eager, flash attention when
# installed, a bf16 training run, a 4-bit NF4 LLM trained under and reloaded) and the benchmarks with the `paper` preset (mT5-xl encoder + Llama-2-7B at random
# init, bf16), eager and with compiled decoding, and one training step under FSDP 2 and DeepSpeed ZeRO-2 on the one
# GPU (`bench_engines.py`), writing logs and JSON results.
#
#   bash benchmarks/gpu_check.sh [WHEEL_DIR] [RESULTS_DIR]
#
# WHEEL_DIR (default .whl) holds wheels of the versions we pin that the machine lacks (such a machine may have torch
# and an older transformers preinstalled); they are installed into a temporary folder put first on PYTHONPATH, the
# package itself is read from this checkout. Fetch them where there is a network, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.24.0
# and, for the ZeRO-2 step (skipped without it), deepspeed's pure-Python wheel with the dependencies the machine lacks:
#   pip wheel --no-deps -w .whl deepspeed==0.19.8
#   pip download --no-deps --only-binary=:all: -d .whl hjson py-cpuinfo ninja einops msgpack
# and, for the 4-bit NF4 test (`--quantize nf4`, skipped without it), bitsandbytes' wheel:
#   pip download --no-deps --only-binary=:all: -d .whl bitsandbytes==0.50.2
# With LAYALIGN_VLLM_PYTHON naming the Python of an environment that has a CUDA build of vLLM 0.32 and this
# checkout's plugin (a CUDA vLLM wheel with its torch is far over what travels to a machine without network, so it
# must be there already), the serving tests run on the GPU too (`tests/serving`: greedy tokens against `generate` on
# the tiny checkpoints; the demo-model checks skip without the demo packages). Not run on a GPU yet.
# RESULTS_DIR defaults to $OUT, else gpu_results. PRESET=tiny runs the same steps in seconds (a dry run).
# Exits non-zero if any step failed; every step still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.whl}"
RESULTS="${2:-${OUT:-gpu_results}}"
PRESET="${PRESET:-paper}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE="$(mktemp -d)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'EOF' 2>&1 | tee "$RESULTS/environment.txt"
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$RESULTS/environment.txt"

failed=()
run() {  # run NAME SECONDS COMMAND...: one step with its own time limit, its output in RESULTS/NAME.log
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status, $((SECONDS - start)) s" | tee -a "$RESULTS/steps.txt"
    [ "$status" -eq 0 ] || failed+=("$name")
}

run gpu_tests 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
run bench_train 120 "$PYTHON" benchmarks/bench_train.py --preset "$PRESET" --profile --json "$RESULTS/train.json"
run bench_generate 260 "$PYTHON" benchmarks/bench_generate.py --preset "$PRESET" --repeats 3 --profile --json "$RESULTS/generate.json"
run bench_checkpoint 60 "$PYTHON" benchmarks/bench_checkpoint.py --preset "$PRESET" --json "$RESULTS/checkpoint.json"
run bench_engines 150 "$PYTHON" benchmarks/bench_engines.py --preset "$PRESET" --repeats 3 --json "$RESULTS/engines.json"
if [ -n "${LAYALIGN_VLLM_PYTHON:-}" ]; then
    run vllm_serving 420 "$PYTHON" -m pytest -q -p no:cacheprovider tests/serving
else
    echo "== vllm_serving: skipped (set LAYALIGN_VLLM_PYTHON to a Python with a CUDA build of vLLM)" | tee -a "$RESULTS/steps.txt"
fi
# Last, as compiling the decoding step of three models takes minutes: static caches, compiled steps (CUDA graphs).
run bench_generate_static 240 "$PYTHON" benchmarks/bench_generate.py --preset "$PRESET" --repeats 3 --static_cache --json "$RESULTS/generate_static.json"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
