"""`modeling_layalign.evaluation.cli_arguments`: counts that must be positive are refused at parsing, naming the flag, by every
command line that takes one (they used to run on nothing and exit 0, print negative GiB, or fail deep inside)."""

import argparse
import importlib
from pathlib import Path

import pytest

from modeling_layalign.evaluation.cli_arguments import positive_int


REPOSITORY = Path(__file__).resolve().parents[2]


def test_positive_int_takes_counts_of_one_or_more():
    assert positive_int("1") == 1 and positive_int("12") == 12
    for text in ("0", "-2", "two", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a positive integer"):
            positive_int(text)


@pytest.mark.parametrize(
    "script,arguments,flag",
    [
        ("examples/evaluate_layalign", ["--model", "m", "--benchmark", "mgsm", "--batch_size", "-2"], "--batch_size"),
        ("examples/evaluate_layalign", ["--model", "m", "--benchmark", "mgsm", "--limit", "0"], "--limit"),
        ("examples/evaluate_layalign", ["--model", "m", "--benchmark", "mgsm", "--max_new_tokens", "0"], "--max_new_tokens"),
        ("benchmarks/memory_plan", ["--gpus", "-8"], "--gpus"),
        ("benchmarks/memory_plan", ["--gpus", "0"], "--gpus"),
        ("benchmarks/memory_plan", ["--batch", "-1"], "--batch"),
        ("benchmarks/bench_train", ["--repeats", "0"], "--repeats"),
        ("benchmarks/bench_generate", ["--batches", "4", "0"], "--batches"),
    ],
)
def test_each_command_line_refuses_a_count_below_one(script, arguments, flag, monkeypatch, capsys):
    folder, name = script.split("/")
    monkeypatch.syspath_prepend(str(REPOSITORY / folder))
    module = importlib.import_module(name)
    parse = module.parse_arguments if hasattr(module, "parse_arguments") else module.main
    with pytest.raises(SystemExit) as exit_info:
        parse(arguments)
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be a positive integer" in capsys.readouterr().err
