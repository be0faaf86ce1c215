"""The checkpoints shipped in `checkpoints/` stay loadable (their keys and shapes fit the model), and their READMEs
report the numbers their result files hold."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_layalign import LayAlignConfig, LayAlignForCausalLM


CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED = CHECKPOINTS / "demo-stage1"
STAGE_TWO = CHECKPOINTS / "demo-stage2"


@pytest.mark.parametrize("folder", [SHIPPED, STAGE_TWO], ids=["stage1", "stage2"])
def test_shipped_weights_load_into_the_model_their_config_describes(folder):
    config = LayAlignConfig.from_pretrained(folder)
    assert config.checkpoint_format == "layalign_only"
    with torch.device("meta"):
        model = LayAlignForCausalLM(config)
    weights = load_file(folder / "model.safetensors")
    model.load_state_dict(weights, strict=False, assign=True)  # shapes are checked against the model's
    model.load_layalign_state_dict(weights)  # no LayAlign weight missing, nothing else in the file
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_shipped_results_are_the_ones_its_readme_reports():
    results = json.loads((SHIPPED / "results.json").read_text())
    readme = (SHIPPED / "README.md").read_text()
    for language in ("ja", "zh", "ru"):
        row = results[language]
        assert f"| {language} | {row['loss']:.3f} | {row['shuffled_loss']:.3f} | {row['gap']:+.3f} |" in readme


def test_the_stage_two_readme_reports_its_ladder():
    ladder = json.loads((STAGE_TWO / "ladder.json").read_text())
    readme = (STAGE_TWO / "README.md").read_text()
    for language, rung in ladder["final"].items():
        row = (
            f"| {language} | {rung['english']:.3f} | {rung['llm']:.3f} | {rung['layalign']:.3f} | "
            f"{rung['shuffled']:.3f} | {rung['gap']:+.3f} | {100 * rung['share_closed']:.0f}% |"
        )
        assert row in readme, row
