"""The stage-1 checkpoint shipped in `checkpoints/demo-stage1` stays loadable: its keys and shapes fit the model."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from modeling_layalign import LayAlignConfig, LayAlignForCausalLM


SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "demo-stage1"


def test_shipped_weights_load_into_the_model_their_config_describes():
    config = LayAlignConfig.from_pretrained(SHIPPED)
    assert config.checkpoint_format == "layalign_only"
    with torch.device("meta"):
        model = LayAlignForCausalLM(config)
    weights = load_file(SHIPPED / "model.safetensors")
    model.load_state_dict(weights, strict=False, assign=True)  # shapes are checked against the model's
    model.load_layalign_state_dict(weights)  # no LayAlign weight missing, nothing else in the file
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_shipped_results_are_the_ones_its_readme_reports():
    results = json.loads((SHIPPED / "results.json").read_text())
    readme = (SHIPPED / "README.md").read_text()
    for language in ("ja", "zh", "ru"):
        row = results[language]
        assert f"| {language} | {row['loss']:.3f} | {row['shuffled_loss']:.3f} | {row['gap']:+.3f} |" in readme
