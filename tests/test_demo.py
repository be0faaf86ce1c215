"""`examples/demo.py`'s stage-2 ladder on tiny models: one row per system and language, the columns it prints."""

import sys
from pathlib import Path

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import demo  # noqa: E402


def test_ladder_rows_compare_each_stage_two_model_with_the_llm_alone(tiny_layalign_folder):
    models = {"trained now": LayAlignForCausalLM.from_pretrained(tiny_layalign_folder)}
    models["shipped"] = LayAlignForCausalLM.from_pretrained(tiny_layalign_folder)
    processor = LayAlignProcessor.from_pretrained(tiny_layalign_folder)
    rows = demo.ladder_rows(models, processor, ["sw", "te"], questions=2)
    assert [row[:2] for row in rows] == [["trained now", "sw"], ["trained now", "te"], ["shipped", "sw"], ["shipped", "te"]]
    assert rows[0][2:] == rows[2][2:]  # the same weights give the same ladder
    assert all(len(row) == 8 for row in rows)
    a, b, c, d = (float(cell) for cell in rows[1][2:6])
    assert abs(float(rows[1][6]) - (d - c)) <= 0.0011 and rows[1][7].endswith("%")
