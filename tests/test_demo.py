"""`examples/demo.py`'s stage-2 ladder on tiny models: one row per system and language, the columns it prints."""

import sys
from pathlib import Path

import pytest
import torch

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor
from modeling_layalign.evaluation.ladder import load_mgsm_with_answers
from modeling_layalign.evaluation.scoring import layalign_target_loss, llm_target_loss
from modeling_layalign.training.data import MATH_PROMPT



sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import demo  # noqa: E402


def test_ladder_rows_compare_each_stage_two_model_with_the_llm_alone(tiny_layalign_folder):
    models = {"trained now": LayAlignForCausalLM.from_pretrained(tiny_layalign_folder)}
    models["shipped"] = LayAlignForCausalLM.from_pretrained(tiny_layalign_folder)
    with torch.no_grad():  # another stage-2 model over the same LLM
        models["shipped"].input_mapping.down.weight.mul_(4.0)
    processor = LayAlignProcessor.from_pretrained(tiny_layalign_folder)
    rows = demo.ladder_rows(models, processor, ["sw", "te"], questions=2)
    assert [row[:2] for row in rows] == [["trained now", "sw"], ["trained now", "te"], ["shipped", "sw"], ["shipped", "te"]]
    assert all(len(row) == 9 for row in rows)
    examples = load_mgsm_with_answers(["sw", "te"], limit=2)
    for name, language, *cells in rows:
        model, questions = models[name], examples.filter(lambda row: row["language"] == language)
        prompts = {column: [MATH_PROMPT.format(query=q) for q in questions[column]] for column in ("english", "source")}
        sources, targets = questions["source"], questions["target"]
        english = llm_target_loss(model.llm, processor.tokenizer, prompts["english"], targets)  # (a)
        in_language = llm_target_loss(model.llm, processor.tokenizer, prompts["source"], targets)  # (b)
        real = layalign_target_loss(model, processor, sources, targets, prompts=prompts["source"])  # (c)
        shuffled = layalign_target_loss(model, processor, sources[1:] + sources[:1], targets, prompts=prompts["source"])
        other_english = llm_target_loss(model.llm, processor.tokenizer, prompts["english"][::-1], targets)  # (e)
        expected = [english, in_language, real, shuffled, shuffled - real]
        assert [float(cell) for cell in cells[:5]] == pytest.approx(expected, abs=0.0011)
        assert cells[5] == f"{(in_language - real) / (in_language - english):.0%}"
        assert cells[6] == f"{(shuffled - real) / (other_english - english):.0%}"
    assert rows[0][4:6] != rows[2][4:6]  # each model's own rungs (c), (d); the LLM's (a), (b) are shared


@pytest.mark.parametrize("native", [True, False])
def test_the_demo_trains_in_float32_on_a_cpu_without_native_bfloat16(native, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    runs = []
    monkeypatch.setattr(demo.train_layalign, "main", runs.append)
    demo.train(1, tmp_path, 2, 8)
    training_args = demo.train_layalign.parse_arguments(runs[0])[2]
    assert training_args.bf16 is native  # the preset's bf16 autocast where the CPU has it in hardware
