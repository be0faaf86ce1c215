"""`checkpoint_layalign.py`: a LayAlign-only checkpoint whose files are broken or whose bases cannot be found is named
before any base loads."""

import json

import pytest

from modeling_layalign import LayAlignForCausalLM

from .test_modeling_layalign_checkpoints import trained_model


def test_a_truncated_weights_file_is_named_before_the_bases_load(tmp_path, monkeypatch):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "checkpoint")
    weights = tmp_path / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])

    def no_base_loading(*args, **kwargs):
        raise AssertionError("the bases were loaded before the LayAlign file was checked")

    monkeypatch.setattr(LayAlignForCausalLM, "from_base_models", no_base_loading)
    with pytest.raises(OSError, match=r"model.safetensors' is not a complete safetensors file .* truncated"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint")


@pytest.mark.parametrize("source,message", [(None, "names no LLM .`llm_name_or_path` is None"), ("nobody/no-such-llm", "cannot be loaded")])
def test_a_base_that_cannot_be_found_names_the_field(tmp_path, source, message):
    model = trained_model(tmp_path)
    model.save_pretrained(tmp_path / "checkpoint")
    config_file = tmp_path / "checkpoint" / "config.json"
    config = json.loads(config_file.read_text())
    config["llm_name_or_path"] = source
    config_file.write_text(json.dumps(config))
    with pytest.raises(OSError, match=rf"{message}.*pass `llm_name_or_path=`"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint")
