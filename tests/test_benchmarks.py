"""Each benchmark runs on the `tiny` preset and prints its ratio tables (no timing is asserted: times on a shared CPU
mean nothing; the benchmarks exist to be run by hand and by `benchmarks/gpu_check.sh`)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import free_port


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def benchmark_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def printed_rows(printed: str, name: str) -> list[list[str]]:
    """The cells of every printed table row of `name`, in the order the tables were printed."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in printed.splitlines() if line.startswith(f"| {name} |")]


def test_training_benchmark_compares_the_three_steps(benchmark_module, tmp_path, capsys):
    results = benchmark_module("bench_train").main(["--preset", "tiny", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert "stage 1 training step" in printed and "stage 2 training step" in printed
    assert json.loads((tmp_path / "r.json").read_text())["preset"] == "tiny"
    names = ("LayAlign", "MindMerger mode", "LLM alone, to its inputs")
    rows = {name: printed_rows(printed, name) for name in names}
    for index, stage in enumerate(("stage 1", "stage 2")):
        assert set(results[stage]) == set(names)
        seconds = {name: results[stage][name]["seconds"] for name in names}
        assert all(value > 0 for value in seconds.values())
        # Each step against the two baselines measured in the same run, as the table says.
        for name in names:
            ratios = rows[name][index][3:5]
            assert ratios == [f"{seconds[name] / seconds['MindMerger mode']:.2f}x", f"{seconds[name] / seconds[names[2]]:.2f}x"]
        assert rows["MindMerger mode"][index][3] == rows[names[2]][index][4] == "1.00x"


def test_generation_benchmark_reports_decode_and_prefill(benchmark_module, capsys):
    results = benchmark_module("bench_generate").main(["--preset", "tiny", "--repeats", "1"])
    printed = capsys.readouterr().out
    assert printed.count("| LLM alone | ") == 2  # one table per batch size
    for index, batch in enumerate(("batch 1", "batch 4")):
        base = results[batch]["LLM alone"]
        for name, entry in results[batch].items():
            assert entry["prefill_seconds"] > 0 and entry["generate_seconds"] > 0
            # Decoding speed and prefill time, each against the LLM alone measured in the same run.
            decode, prefill = entry["decode_tokens_per_second"], entry["prefill_seconds"]
            cells = printed_rows(printed, name)[index]
            assert cells[2] == f"{decode / base['decode_tokens_per_second']:.2f}x"
            assert cells[3:5] == [f"{prefill * 1000:.1f}", f"{prefill / base['prefill_seconds']:.2f}x"]


def test_checkpoint_benchmark_writes_both_forms(benchmark_module, capsys):
    results = benchmark_module("bench_checkpoint").main(["--preset", "tiny"])
    assert results["full"]["written"] and results["LayAlign-only"]["written"]
    assert 0 < results["LayAlign-only"]["bytes"] < results["full"]["bytes"]
    assert "| LayAlign-only |" in capsys.readouterr().out


def test_operator_count_benchmark_counts_the_three_systems(benchmark_module, capsys):
    results = benchmark_module("bench_ops").main(["--preset", "tiny", "--top", "5"])
    printed = capsys.readouterr().out
    for title in (
        "ATen operators dispatched",
        "issue 16's targets",
        "operators LayAlign adds over MindMerger mode, training step",
        "operators one decoding step adds over the LLM alone",
    ):
        assert title in printed
    assert printed.count("| LLM alone | ") == 3  # all dispatched, without views, scalar reads
    totals = results["totals"]
    assert set(totals) == {"LayAlign", "MindMerger mode", "LLM alone"}
    for phases in totals.values():
        assert {"step", "forward", "backward", "prefill", "decoding step"} <= set(phases)
        assert all(number > 0 for number in phases.values())
    # Counted, not timed: the fused branch and the input mapping add operators to the LLM's own.
    assert totals["LayAlign"]["step"] >= totals["MindMerger mode"]["step"] >= totals["LLM alone"]["step"]
    assert {target["phase"] for target in results["targets"]} == {"training step", "prefill", "decoding step"}


def test_engine_benchmark_runs_each_engine_on_the_same_step(tmp_path):
    # In its own process: it starts a process group (world size 1, gloo here) and DeepSpeed keeps global state.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "MASTER_PORT": free_port()}
    result = subprocess.run(
        [sys.executable, "bench_engines.py", "--preset", "tiny", "--repeats", "1", "--json", str(tmp_path / "r.json")],
        cwd=BENCHMARKS, capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage-1 training step under each engine" in result.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    losses = [results[engine]["first_loss"] for engine in ("unwrapped", "FSDP 2", "ZeRO-2")]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-6)  # same seed, same batch, same step


def test_wall_clock_benchmark_prints_each_ratio_of_every_run(benchmark_module, capsys):
    results = benchmark_module("bench_wall_clock").main(["--preset", "tiny", "--repeats", "1", "--runs", "2", "--threads", "1"])
    printed = capsys.readouterr().out
    assert len(results["runs"]) == 2 and results["threads"] == 1
    for name, ratio in results["runs"][0].items():
        assert ratio > 0
        arithmetic = results["arithmetic"][name]
        assert printed_rows(printed, name)[0][1:4] == [f"{ratio:.2f}x", f"{results['runs'][1][name]:.2f}x", f"{arithmetic:.2f}x"]
        # LayAlign computes more than its baseline in every row: fewer tokens per second, more time.
        assert arithmetic < 1 if name.startswith("decoding") else arithmetic > 1
    assert list(results["runs"][0])[-1] == "training step, batch 4, LayAlign / MindMerger mode"
    assert benchmark_module("bench_wall_clock").meets(0.96, 0.95, "at least") and not benchmark_module("bench_wall_clock").meets(1.2, 1.15, "at most")


def test_breakdown_parts_account_for_all_of_layalign_extra_arithmetic(benchmark_module, capsys):
    results = benchmark_module("bench_breakdown").main(["--preset", "tiny", "--repeats", "1", "--threads", "1"])
    printed = capsys.readouterr().out
    assert list(results) == ["prefill, batch 1", "prefill, batch 4", "training step"]
    other = benchmark_module("bench_breakdown").OTHER
    for key, result in results.items():
        baseline, whole = list(result)[:2]
        parts = [name for name in list(result)[2:] if name != other]
        assert "fused attention" in parts and "fusion (layer mix, projection)" in parts
        # Every multiply-add LayAlign adds is in one of the parts, and each part adds some (the gate is elementwise).
        assert result[other]["multiply_adds"] == 0
        assert result[whole]["multiply_adds"] > result[baseline]["multiply_adds"]
        assert all(result[part]["multiply_adds"] > 0 for part in parts if part != "gate and padding scale")
        assert all(entry["seconds"] > 0 for name, entry in result.items() if name != other)
        assert printed_rows(printed, f"+ {other}")


def test_vllm_benchmark_documents_its_options():
    # The benchmark itself starts a vLLM engine on the demo models (minutes): only its command line is checked here.
    result = subprocess.run(
        [sys.executable, "bench_vllm.py", "--help"], cwd=BENCHMARKS, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--batches" in result.stdout and "--new_tokens" in result.stdout and "vLLM" in result.stdout
