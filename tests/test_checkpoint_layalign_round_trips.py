"""Every way the product makes a model, through the whole hand-over: save -> `from_pretrained` -> `Trainer` steps ->
save -> `from_pretrained`, in each way of saving it (the default form, full, sharded).

Each round trip asserts what a user relies on between runs: the reloaded model gives the same logits; exactly the
parameters its config says train; training moves only those; every weight of the trained model comes back from its
save; and each save has the documented form (docs/reference.md, "What each configuration saves").
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import Trainer, TrainingArguments, default_data_collator

from modeling_layalign import LayAlignForCausalLM
from modeling_layalign.conversion.convert import convert_reference_checkpoint

from .conftest import ENCODER_VOCAB, LLM_VOCAB, assert_same_logits, with_trained_layalign_weights
from .conversion.test_convert import reference_state_dict
from .test_modeling_layalign_checkpoints import logits, sample_inputs


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import train_layalign  # noqa: E402


LORA_TARGET = r"llm\..*layers\.\d+\.self_attn\.(q_proj|v_proj)"
# How each way of building a model saves by default.
BUILDS = {
    "layalign": "layalign_only",
    "mindmerger": "layalign_only",
    "fusion_only": "layalign_only",
    "converted": "layalign_only",
    "train_llm": "full",
    "resized": "full",
    "lora_merged": "full",
}
SAVES = {"default": {}, "full": {"checkpoint_format": "full"}, "sharded": {"max_shard_size": "4KB"}}


def build(kind: str, bases: dict[str, str], tmp_path: Path) -> LayAlignForCausalLM:
    encoder, llm = bases["encoder"], bases["llm"]
    if kind == "converted":
        source = with_trained_layalign_weights(LayAlignForCausalLM.from_base_models(encoder, llm))
        path = tmp_path / "reference" / "pytorch_model.bin"
        path.parent.mkdir()
        torch.save(reference_state_dict(source, dtype=torch.float32), path)
        return LayAlignForCausalLM.from_pretrained(convert_reference_checkpoint(path, tmp_path / "converted", encoder=encoder, llm=llm))
    config_kwargs = {
        "mindmerger": {"use_layer_fusion": False},
        "fusion_only": {"use_input_mapping": False},
        "train_llm": {"train_llm": True},
    }.get(kind, {})
    model = with_trained_layalign_weights(LayAlignForCausalLM.from_base_models(encoder, llm, **config_kwargs))
    if kind == "resized":
        model.resize_token_embeddings(LLM_VOCAB + 8)
    if kind == "lora_merged":
        lora = LoraConfig(r=4, target_modules=LORA_TARGET, modules_to_save=list(model.layalign_module_names), init_lora_weights=False)
        model = train_layalign.merge_lora(get_peft_model(model, lora)).eval()
    return model


def expected_trainable(model: LayAlignForCausalLM) -> set[str]:
    prefixes = [f"{name}." for name in model.layalign_module_names]
    prefixes += ["encoder."] * model.config.train_encoder + ["llm."] * model.config.train_llm
    return {name for name, _ in model.named_parameters() if name.startswith(tuple(prefixes))}


def trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def train_steps(model, output_dir: Path, steps: int = 2) -> None:
    """A few stock `Trainer` steps on random examples (AdamW, every parameter that requires a gradient)."""
    generator = torch.Generator().manual_seed(0)
    examples = [
        {
            "encoder_input_ids": torch.randint(4, ENCODER_VOCAB, (5,), generator=generator),
            "input_ids": torch.randint(4, LLM_VOCAB, (4,), generator=generator),
            "labels": torch.randint(4, LLM_VOCAB, (4,), generator=generator),
        }
        for _ in range(4)
    ]
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=arguments, train_dataset=examples, data_collator=default_data_collator).train()
    model.eval()


def saved_form(folder: Path) -> tuple[str, set[str]]:
    """The checkpoint form recorded in config.json, and the weight names its safetensors files hold."""
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            keys |= set(handle.keys())
    return json.loads((folder / "config.json").read_text())["checkpoint_format"], keys


def assert_saved_as(folder: Path, model: LayAlignForCausalLM, checkpoint_format: str, sharded: bool) -> None:
    form, keys = saved_form(folder)
    assert form == checkpoint_format
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    if checkpoint_format == "layalign_only":
        assert keys == {key for key in model.state_dict() if model.is_layalign_key(key)}
    else:
        assert any(key.startswith("encoder.") for key in keys) and any(key.startswith("llm.") for key in keys)


def assert_same_model(reloaded, model) -> None:
    """Same logits and every weight equal, except the untouched copies that peft keeps of the modules it trains
    (`original_module`, never saved: the model it loads into has its own)."""
    inputs = sample_inputs()
    assert_same_logits(logits(reloaded, inputs), logits(model, inputs))
    expected, actual = weights(model), weights(reloaded)
    assert actual.keys() == expected.keys()
    compared = [key for key in expected if ".original_module." not in key]
    assert [key for key in compared if not torch.equal(actual[key], expected[key])] == []


@pytest.mark.parametrize("save", sorted(SAVES))
@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_every_build_survives_save_load_train_save_load(kind, save, tiny_base_folders, tmp_path):
    model = build(kind, tiny_base_folders, tmp_path)
    default_form = BUILDS[kind]
    first_form = "full" if save == "full" else default_form

    model.save_pretrained(tmp_path / "first", **SAVES[save])
    assert_saved_as(tmp_path / "first", model, first_form, sharded=save == "sharded")
    loaded = LayAlignForCausalLM.from_pretrained(tmp_path / "first")
    assert_same_model(loaded, model)
    assert trainable(loaded) == expected_trainable(loaded)

    before = weights(loaded)
    train_steps(loaded.train(), tmp_path / "run")
    moved = {key for key, value in weights(loaded).items() if not torch.equal(value, before[key])}
    assert moved and moved <= expected_trainable(loaded)
    assert (not loaded.config.train_llm) or any(key.startswith("llm.") for key in moved)

    loaded.save_pretrained(tmp_path / "second", **SAVES[save])
    # A full save of unmodified bases reloads as a model that saves LayAlign-only again by default.
    assert_saved_as(tmp_path / "second", loaded, first_form if save == "full" else default_form, sharded=save == "sharded")
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "second")
    assert_same_model(reloaded, loaded)
    assert trainable(reloaded) == expected_trainable(reloaded)
    assert reloaded.config.modified_bases == loaded.config.modified_bases


@pytest.mark.parametrize("kind", ["train_llm", "resized", "lora_merged"])
def test_a_modified_base_is_never_saved_without_its_weights(kind, tiny_base_folders, tmp_path):
    model = build(kind, tiny_base_folders, tmp_path)
    assert model.config.modified_bases == ["llm"]
    with pytest.raises(ValueError, match="would lose the weights of the modified \\['llm'\\]"):
        model.save_pretrained(tmp_path / "saved", checkpoint_format="layalign_only")
    assert not (tmp_path / "saved").exists()


def test_a_full_checkpoint_saved_before_modified_bases_keeps_saving_in_full(tiny_base_folders, tmp_path):
    """Such a checkpoint (a LoRA run merged before 2026-12-06) may hold a changed LLM under a config that names its
    source: it loads with both bases counted as modified, so that no later save drops them."""
    model = build("lora_merged", tiny_base_folders, tmp_path)
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["modified_bases"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))

    loaded = LayAlignForCausalLM.from_pretrained(tmp_path / "old")
    assert loaded.config.modified_bases == ["encoder", "llm"]
    assert trainable(loaded) == expected_trainable(loaded)
    loaded.save_pretrained(tmp_path / "again")
    assert_saved_as(tmp_path / "again", loaded, "full", sharded=False)
    assert_same_model(LayAlignForCausalLM.from_pretrained(tmp_path / "again"), model)


def test_lora_kept_as_adapters_round_trips_through_peft(tiny_base_folders, tmp_path):
    encoder, llm = tiny_base_folders["encoder"], tiny_base_folders["llm"]
    lora = LoraConfig(r=4, target_modules=LORA_TARGET, modules_to_save=list(LayAlignForCausalLM.layalign_module_names), init_lora_weights=False)
    model = get_peft_model(with_trained_layalign_weights(LayAlignForCausalLM.from_base_models(encoder, llm)), lora).eval()
    model.save_pretrained(tmp_path / "first")

    loaded = PeftModel.from_pretrained(LayAlignForCausalLM.from_base_models(encoder, llm), tmp_path / "first", is_trainable=True).eval()
    assert_same_model(loaded, model)
    assert trainable(loaded) == trainable(model)
    assert all("lora_" in name or ".modules_to_save." in name for name in trainable(loaded))
    before = weights(loaded)
    train_steps(loaded.train(), tmp_path / "run")
    assert any(not torch.equal(value, before[key]) for key, value in weights(loaded).items() if "lora_B" in key)

    loaded.save_pretrained(tmp_path / "second")
    reloaded = PeftModel.from_pretrained(LayAlignForCausalLM.from_base_models(encoder, llm), tmp_path / "second").eval()
    assert_same_model(reloaded, loaded)
