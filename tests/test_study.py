"""`examples/study.py` on tiny models: the gap curve, the final scores and the report, for two systems."""

import json
import sys
from argparse import Namespace
from pathlib import Path


REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "examples"))

import study  # noqa: E402


def test_study_records_a_curve_scores_held_out_pairs_and_reports(tiny_base_folders, tmp_path, capsys):
    args = Namespace(
        output_dir=str(tmp_path), max_steps=2, batch_size=2, eval_every=1, curve_pairs=2, eval_pairs=3, generations=2,
        languages=["ja", "ru"],
        train_args=["--demo_models", "False", "--encoder", tiny_base_folders["encoder"], "--llm", tiny_base_folders["llm"],
                    "--warm_start_sentences", "8", "--warm_start_pairs", "4", "--bf16", "False"],
    )  # fmt: skip
    for name in ("layalign", "mindmerger"):
        study.evaluate_system(study.train_system(name, args), args)
    curve = [json.loads(line) for line in (tmp_path / "layalign" / "curve.jsonl").read_text().splitlines()]
    assert [point["step"] for point in curve] == [0, 1, 2]
    assert all({"ja", "ru", "source_cosine", "gate_max_abs"} <= point.keys() for point in curve)
    results = json.loads((tmp_path / "mindmerger" / "results.json").read_text())
    assert results["ja"]["gap"] == results["ja"]["shuffled_loss"] - results["ja"]["loss"]
    assert "gate_max_abs" not in results["statistics"]
    study.report(tmp_path, ["ja", "ru"])
    printed = capsys.readouterr().out
    assert "| layalign | ja |" in printed and "| mindmerger | ru |" in printed
    assert "| 2 | " in printed  # a curve row for the last step of both systems


def test_held_out_pairs_are_lines_no_training_run_reads():
    preset = json.loads((REPOSITORY / "configuration" / "presets" / "demo.json").read_text())
    assert preset["data"]["held_out"] == study.HELD_OUT
    sources, targets = study.held_out_pairs("ja", 64)
    assert len(sources) == len(targets) == 64
    from modeling_layalign.data import held_out_lines, load_translation_pairs

    training = load_translation_pairs(["ja"], exclude_lines=held_out_lines(study.HELD_OUT))
    assert not set(sources) & set(training["source"])
