"""`LayAlignConfig`: defaults, validation, serialisation, and the auto classes."""

import json

import pytest
from transformers import AutoConfig, LlamaConfig, MT5Config, Qwen3Config, XLMRobertaConfig

from modeling_layalign import LayAlignConfig

from .conftest import ENCODER_CONFIGS, LLM_CONFIGS, tiny_config


def test_defaults_follow_the_paper():
    config = tiny_config()
    # Every encoder hidden state except the final output (index 0 is the embedding output).
    assert config.fused_encoder_layers == [0, 1]
    assert config.mapped_encoder_layer is None  # the encoder's final output feeds the input mapping
    assert config.adapted_llm_layers == [0, 1]
    assert config.fusion_structure == "linear"
    assert config.use_input_mapping and config.use_layer_fusion
    assert not config.train_encoder and not config.train_llm
    assert config.encoder_dropout_in_training


def test_default_sub_configs_are_mt5_and_llama():
    config = LayAlignConfig()
    assert isinstance(config.encoder_config, MT5Config)
    assert isinstance(config.text_config, LlamaConfig)
    assert len(config.fused_encoder_layers) == config.encoder_config.num_layers


def test_text_config_is_what_generation_looks_up():
    config = tiny_config("qwen3", "xlm-roberta")
    assert config.get_text_config() is config.text_config
    assert config.get_text_config(decoder=True) is config.text_config


def test_round_trip_through_json_keeps_sub_config_classes_and_fields(tmp_path):
    config = tiny_config(
        "qwen3",
        "xlm-roberta",
        fused_encoder_layers=[2, 0],
        mapped_encoder_layer=1,
        adapted_llm_layers=[1],
        fusion_structure="mlp",
        use_input_mapping=False,
        encoder_name_or_path="intfloat/multilingual-e5-small",
        llm_name_or_path="Qwen/Qwen3-0.6B",
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "layalign"
    assert saved["auto_map"]["AutoConfig"] == "configuration_layalign.LayAlignConfig"
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, LayAlignConfig)
    assert isinstance(reloaded.encoder_config, XLMRobertaConfig)
    assert isinstance(reloaded.text_config, Qwen3Config)
    assert reloaded.fused_encoder_layers == [0, 2]
    assert reloaded.mapped_encoder_layer == 1
    assert reloaded.adapted_llm_layers == [1]
    assert reloaded.fusion_structure == "mlp"
    assert reloaded.use_input_mapping is False
    assert reloaded.llm_name_or_path == "Qwen/Qwen3-0.6B"
    assert reloaded.text_config.hidden_size == 32


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("fused_encoder_layers", [0, 3], r"`fused_encoder_layers` holds 3, outside the valid range 0\.\.2"),
        ("fused_encoder_layers", [], r"`fused_encoder_layers` must name at least one layer"),
        ("fused_encoder_layers", [0, 0], r"`fused_encoder_layers` names a layer twice"),
        ("fused_encoder_layers", "0,1", r"`fused_encoder_layers` must be a list of layer indices"),
        ("mapped_encoder_layer", 3, r"`mapped_encoder_layer` must be None or a layer index in 0\.\.2, got 3"),
        ("mapped_encoder_layer", "1", r"`mapped_encoder_layer` must be None or a layer index in 0\.\.2, got '1'"),
        ("adapted_llm_layers", [-1], r"`adapted_llm_layers` holds -1, outside the valid range 0\.\.1"),
        ("adapted_llm_layers", [2], r"`adapted_llm_layers` holds 2"),
        ("adapted_llm_layers", [0.5], r"`adapted_llm_layers` must hold ints"),
        ("fusion_structure", "attention", r"`fusion_structure` must be one of \('linear', 'mlp'\)"),
        ("checkpoint_format", "pickle", r"`checkpoint_format` must be one of"),
        ("use_layer_fusion", "yes", r"`use_layer_fusion` must be a bool"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_a_config_must_use_the_encoder_somehow():
    with pytest.raises(ValueError, match="`use_input_mapping` and `use_layer_fusion`"):
        tiny_config(use_input_mapping=False, use_layer_fusion=False)


@pytest.mark.parametrize("encoder", sorted(ENCODER_CONFIGS))
@pytest.mark.parametrize("llm", sorted(LLM_CONFIGS))
def test_every_supported_pair_makes_a_valid_config(encoder, llm):
    config = tiny_config(llm, encoder)
    assert config.fused_encoder_layers == list(range(config.encoder_config.num_hidden_layers))
    assert config.adapted_llm_layers == list(range(config.text_config.num_hidden_layers))


def test_an_unknown_field_is_warned_about_with_the_nearest_field(caplog):
    with caplog.at_level("WARNING", logger="modeling_layalign.configuration_layalign"):
        config = tiny_config(adapted_llm_layer=[0])
    assert config.adapted_llm_layers == [0, 1]  # the typo did not select a layer
    assert "no field `adapted_llm_layer`" in caplog.text and "did you mean `adapted_llm_layers`" in caplog.text


def test_a_saved_config_reloads_without_warnings(tmp_path, caplog):
    tiny_config(fusion_structure="mlp").save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="modeling_layalign.configuration_layalign"):
        AutoConfig.from_pretrained(tmp_path)
    assert "no field" not in caplog.text
