"""LayAlign over a quantized LLM, with two quantization methods that run on a CPU (bitsandbytes' LLM.int8 and quanto's
int8 weights): it trains the LayAlign modules only, saves LayAlign-only, and comes back quantized as it was trained,
with the same logits; peft sees the quantization; a base's fingerprint never reads quantized values.

(bitsandbytes' 4-bit NF4, QLoRA's, needs a GPU in practice: its CPU path repacks the weights after an eval-mode forward
and returns no gradients on AVX512-BF16 CPUs, and needs widths of at least its block size; it is checked in
`benchmarks/gpu_check.sh`.)
"""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, QuantoConfig

from modeling_layalign import LayAlignForCausalLM

from .conftest import with_trained_layalign_weights
from .test_checkpoint_layalign_round_trips import LORA_TARGET, assert_same_model, expected_trainable, train_steps, trainable
from .test_modeling_layalign_checkpoints import save_base


QUANTIZATIONS = {
    "bitsandbytes-int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "quanto-int8": lambda: QuantoConfig(weights="int8"),
}


def quantized_model(bases: dict[str, str], method: str) -> LayAlignForCausalLM:
    model = LayAlignForCausalLM.from_base_models(
        bases["encoder"], bases["llm"], llm_kwargs={"quantization_config": QUANTIZATIONS[method]()}
    )
    return with_trained_layalign_weights(model)


def key_projection(model: LayAlignForCausalLM) -> torch.nn.Module:
    return model.llm.get_decoder().layers[0].self_attn.k_proj


@pytest.mark.parametrize("method", sorted(QUANTIZATIONS))
def test_a_quantized_llm_trains_saves_and_reloads_quantized(method, tiny_base_folders, tmp_path):
    model = quantized_model(tiny_base_folders, method)
    quantized_layer = type(key_projection(model))
    assert quantized_layer is not torch.nn.Linear
    assert type(key_projection(model).weight.detach()) is not torch.Tensor or not key_projection(model).weight.dtype.is_floating_point
    assert trainable(model) == expected_trainable(model)  # the LayAlign modules only

    train_steps(model.train(), tmp_path / "run")
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["checkpoint_format"] == "layalign_only" and config["text_config"]["quantization_config"]
    # The fingerprint samples only weights that quantization leaves in floating point.
    assert set(config["base_fingerprints"]["llm"]) == {"model.embed_tokens.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight"}

    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(key_projection(reloaded)) is quantized_layer  # quantized again, as recorded
    assert_same_model(reloaded, model)
    assert trainable(reloaded) == expected_trainable(reloaded)

    # Over another LLM of the same shape the fingerprint still refuses the checkpoint.
    other = save_base(tmp_path, "llm", "llama", seed=1)
    with pytest.raises(ValueError, match="has other weights than the one this checkpoint was trained with"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "saved", llm_name_or_path=other)


def test_loading_arguments_reach_the_base_they_name(tiny_base_folders, tmp_path):
    model = quantized_model(tiny_base_folders, "quanto-int8")
    model.save_pretrained(tmp_path / "saved")
    # `llm_kwargs` replaces what the checkpoint recorded for the LLM, `encoder_kwargs` reaches the encoder only; a
    # top-level `quantization_config` is the LLM's.
    unquantized = LayAlignForCausalLM.from_pretrained(tmp_path / "saved", llm_kwargs={"quantization_config": None})
    assert type(key_projection(unquantized)) is torch.nn.Linear
    half = LayAlignForCausalLM.from_pretrained(tmp_path / "saved", encoder_kwargs={"dtype": torch.bfloat16})
    assert half.encoder.dtype == torch.bfloat16 and half.llm.get_input_embeddings().weight.dtype == torch.float32
    eight_bit = LayAlignForCausalLM.from_pretrained(tmp_path / "saved", quantization_config=QUANTIZATIONS["bitsandbytes-int8"]())
    assert type(key_projection(eight_bit)).__name__ == "Linear8bitLt"
    assert all(type(module) is not type(key_projection(eight_bit)) for module in eight_bit.encoder.modules())


def test_peft_wraps_the_quantized_layers_with_its_quantized_lora(tiny_base_folders):
    model = quantized_model(tiny_base_folders, "bitsandbytes-int8")
    assert model.is_loaded_in_8bit and model.quantization_method == "bitsandbytes"
    lora = LoraConfig(r=4, target_modules=LORA_TARGET, modules_to_save=list(model.layalign_module_names))
    wrapped = get_peft_model(model, lora).get_base_model()
    layer = wrapped.llm.get_decoder().layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer).__name__ == "Linear8bitLt"
