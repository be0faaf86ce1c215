"""`examples/study.py` on tiny models: the gap curve, the final scores and the report, for two systems."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor
from modeling_layalign.evaluation.scoring import layalign_target_loss


REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "examples"))

import study  # noqa: E402

from .test_checkpoint_layalign_round_trips import LORA_TARGET, train_layalign  # noqa: E402


def test_study_records_a_curve_scores_held_out_pairs_and_reports(tiny_base_folders, tmp_path, capsys):
    args = Namespace(
        output_dir=str(tmp_path), max_steps=2, batch_size=2, eval_every=1, curve_pairs=2, eval_pairs=3, generations=2,
        languages=["ja", "ru"],
        train_args=["--demo_models", "False", "--encoder", tiny_base_folders["encoder"], "--llm", tiny_base_folders["llm"],
                    "--warm_start_sentences", "8", "--warm_start_pairs", "4", "--bf16", "False",
                    "--mapped_encoder_layer", "1"],  # the preset maps e5's layer 8; the tiny encoder has 2
    )  # fmt: skip
    for name in ("layalign", "mindmerger"):
        study.evaluate_system(study.train_system(name, args), args)
    curve = [json.loads(line) for line in (tmp_path / "layalign" / "curve.jsonl").read_text().splitlines()]
    assert [point["step"] for point in curve] == [0, 1, 2]
    assert all({"ja", "ru", "source_cosine", "gate_max_abs"} <= point.keys() for point in curve)
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("layalign", "mindmerger")}
    assert "gate_max_abs" not in results["mindmerger"]["statistics"]
    # Each system's saved model, scored on the held-out pairs with their real and with rotated sources.
    for name in results:
        model = LayAlignForCausalLM.from_pretrained(tmp_path / name)
        processor = LayAlignProcessor.from_pretrained(tmp_path / name)
        for language in ("ja", "ru"):
            sources, targets = study.held_out_pairs(language, 3)
            row = results[name][language]
            assert row["loss"] == pytest.approx(layalign_target_loss(model, processor, sources, targets), rel=1e-6)
            shuffled = layalign_target_loss(model, processor, sources[1:] + sources[:1], targets)
            assert row["shuffled_loss"] == pytest.approx(shuffled, rel=1e-6)
    study.report(tmp_path, ["ja", "ru"])
    printed = capsys.readouterr().out
    ja = results["layalign"]["ja"]
    assert f"| layalign | ja | {ja['loss']:.3f} | {ja['shuffled_loss']:.3f} | {ja['gap']:+.3f} | {ja['chrf']:.1f} |" in printed
    assert "| mindmerger | ru |" in printed
    assert "| 2 | " in printed  # a curve row for the last step of both systems


def test_held_out_pairs_are_lines_no_training_run_reads():
    preset = json.loads((REPOSITORY / "configuration" / "presets" / "demo.json").read_text())
    assert preset["data"]["held_out"] == study.HELD_OUT
    sources, targets = study.held_out_pairs("ja", 64)
    assert len(sources) == len(targets) == 64
    from modeling_layalign.training.data import held_out_lines, load_translation_pairs

    training = load_translation_pairs(["ja"], exclude_lines=held_out_lines(study.HELD_OUT))
    assert not set(sources) & set(training["source"])


def test_stage_two_trains_both_systems_from_one_stage_one_and_reports_the_ladder(
    tiny_base_folders, tiny_layalign_folder, tmp_path, capsys
):
    from safetensors.torch import load_file

    args = Namespace(
        output_dir=str(tmp_path), stage_one=tiny_layalign_folder, bases=(tiny_base_folders["encoder"], tiny_base_folders["llm"]),
        max_steps=2, batch_size=2, eval_every=1, max_length=64, max_source_length=32, ladder_languages=["sw", "te"],
        ladder_questions=3, ladder_first_question=2, curve_languages=["te"], curve_questions=2, curve_every=1, ladder_step=None,
        train_args=["--bf16", "False", "--max_train_examples", "4"],
    )  # fmt: skip
    for name in study.STAGE_TWO_SYSTEMS:
        study.train_stage_two(name, args)
    stage_one = load_file(Path(tiny_layalign_folder) / "model.safetensors")
    start = load_file(tmp_path / "mindmerger" / "start" / "model.safetensors")
    assert start.keys() == {key for key in stage_one if key.startswith(study.STAGE_TWO_INPUT_MAPPING)}
    assert all(torch.equal(start[key], stage_one[key]) for key in start)
    assert list(study.stage_two_checkpoints(tmp_path / "layalign")) == [0, 1, 2]
    assert study.stage_two_checkpoints(tmp_path / "layalign", up_to=1) == {
        0: tmp_path / "layalign" / "start", 1: tmp_path / "layalign" / "checkpoint-1"
    }
    for name in study.STAGE_TWO_SYSTEMS:
        results = study.ladder_system(name, args)
        assert [point["step"] for point in results["curve"]] == [0, 1, 2]
        row = results["final"]["sw"]
        assert row["share_closed"] == pytest.approx((row["llm"] - row["layalign"]) / (row["llm"] - row["english"]))
        assert row["content_share"] == pytest.approx((row["shuffled"] - row["layalign"]) / (row["english_shuffled"] - row["english"]))
        assert results["first_question"] == 2
    study.ladder_report(tmp_path, ["sw", "te"], ["te"])
    printed = capsys.readouterr().out
    assert "| LLM alone | te |" in printed and "| mindmerger | sw |" in printed and "| 2 | " in printed
    content = json.loads((tmp_path / "layalign" / "ladder.json").read_text())["curve"][-1]["te"]["content_share"]
    assert f"| {content:.0%} |" in printed.split("against steps")[1]  # the curve's mean over its one language
    # a ladder measured before the content share existed is still reported, with dashes where it has no value
    old = json.loads((tmp_path / "mindmerger" / "ladder.json").read_text())
    for row in [*old["llm_alone"].values(), *old["final"].values(), *(point["te"] for point in old["curve"])]:
        row.pop("english_shuffled")
        row.pop("content_share", None)
    (tmp_path / "mindmerger" / "ladder.json").write_text(json.dumps(old))
    study.ladder_report(tmp_path, ["sw", "te"], ["te"])
    printed = capsys.readouterr().out
    mindmerger_sw = next(line for line in printed.splitlines() if line.startswith("| mindmerger | sw |"))
    cells = [cell.strip() for cell in mindmerger_sw.split("|")[1:-1]]
    assert (cells[6], cells[10]) == ("-", "-") and cells[4] != "-"  # (e) and the content share unknown; (c) kept


def test_stage_two_starts_with_the_lora_its_stage_one_kept(tiny_base_folders, tiny_layalign_folder, tmp_path):
    """A stage 1 run with `--merge_lora False`: stage 2 starts from the same model, its LoRA included."""
    model = LayAlignForCausalLM.from_pretrained(tiny_layalign_folder)
    lora = LoraConfig(  # random B (peft starts it at zero, where the LoRA would change nothing)
        r=2, target_modules=LORA_TARGET, modules_to_save=list(model.layalign_module_names), init_lora_weights=False
    )
    processor = LayAlignProcessor.from_pretrained(tiny_layalign_folder)
    train_layalign.save_lora_run(get_peft_model(model, lora), processor, tmp_path / "one", merge=False)
    bases = (tiny_base_folders["encoder"], tiny_base_folders["llm"])
    start = study.stage_two_start("layalign", tmp_path / "two", tmp_path / "one", bases=bases)
    batch = processor(["Amahoro"])
    with torch.no_grad():
        logits = [LayAlignForCausalLM.from_pretrained(folder)(**batch).logits for folder in (tmp_path / "one", start)]
        without_lora = LayAlignForCausalLM.from_pretrained(start, load_lora=False)(**batch).logits
    assert torch.equal(logits[0], logits[1]) and not torch.equal(logits[1], without_lora)


def test_the_ladder_reads_the_checkpoints_of_a_lora_run(tiny_base_folders, tiny_layalign_folder, tmp_path):
    """A LoRA run's `checkpoint-N` folders are peft adapters over the run's start: the last one gives the final model."""
    bases = (tiny_base_folders["encoder"], tiny_base_folders["llm"])
    args = Namespace(
        output_dir=str(tmp_path), stage_one=tiny_layalign_folder, bases=bases, max_steps=2, batch_size=2, eval_every=1,
        max_length=64, max_source_length=32,
        train_args=["--bf16", "False", "--max_train_examples", "4", "--lora_r", "2", "--learning_rate", "1e-2"],
    )  # fmt: skip
    folder = study.train_stage_two("layalign", args)
    assert (folder / "checkpoint-2" / "adapter_config.json").is_file()
    batch = LayAlignProcessor.from_pretrained(folder)(["Amahoro"], targets=["Peace"])
    with torch.no_grad():
        last, final, start = (study.load_for_ladder(folder / name, bases)[0](**batch).logits for name in ("checkpoint-2", ".", "start"))
    torch.testing.assert_close(last, final, rtol=0, atol=1e-5)
    assert not torch.allclose(last, start, atol=1e-3)  # trained: not the start again


def test_reports_and_ladders_of_nothing_say_what_to_run_first(tmp_path):
    with pytest.raises(SystemExit, match="No finished stage-1 system in .*: run the study without `--report` first"):
        study.report(tmp_path, ["ja"])
    with pytest.raises(SystemExit, match="No laddered stage-2 system in .*: train them"):
        study.ladder_report(tmp_path, ["sw"], ["sw"])
    (tmp_path / "layalign" / "start").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"`--ladder_step -1`: .* has no checkpoint to measure \(its steps: \[0\]\)"):
        study.ladder_system("layalign", Namespace(output_dir=str(tmp_path), ladder_step=-1))
