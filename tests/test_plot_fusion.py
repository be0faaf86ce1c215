"""`examples/plot_fusion.py`: PNG plots of the fusion weights and gates of a tiny model."""

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import plot_fusion  # noqa: E402

from .conftest import tiny_model  # noqa: E402


def test_plots_are_written_as_png(tiny_layalign_folder, tmp_path):
    paths = plot_fusion.main(["--model", tiny_layalign_folder, "--output_dir", str(tmp_path)])
    assert sorted(paths) == [tmp_path / "fusion_weights.png", tmp_path / "gates.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_fusion_weights_follow_the_key_value_interleaving():
    model = tiny_model(adapted_llm_layers=[0, 1], fused_encoder_layers=[0, 1, 2])
    keys, values = plot_fusion.fusion_weights(model)
    weights = model.fusion.layer_mix.weight.detach()
    assert keys.shape == values.shape == (2, 3)
    assert (keys[1] == weights[2].numpy()).all() and (values[0] == weights[1].numpy()).all()


def test_a_model_without_fusion_says_so():
    with pytest.raises(SystemExit, match="no layer fusion"):
        plot_fusion.fusion_weights(tiny_model(use_layer_fusion=False))
