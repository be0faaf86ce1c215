"""`modeling_layalign.conversion.convert`: checkpoints in the reference code's layout become LayAlign-only checkpoints.

The reference checkpoints are written here the way the reference code writes them (see the module docstring of
`convert.py`): the whole `LayAlign` module pickled, bases included, in half precision, or MindMerger's bare mapping
in torch's legacy format.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor
from modeling_layalign.conversion.convert import convert_reference_checkpoint, main

from ..conftest import with_trained_layalign_weights
from ..test_modeling_layalign_checkpoints import logits, sample_inputs, save_base


def source_model(tmp_path: Path, encoder: str | None = None, llm: str | None = None, **config_kwargs):
    """A LayAlign model over two saved tiny bases (mT5, Llama), every LayAlign weight non-trivial, gates included.

    Returns `(model, encoder_folder, llm_folder)`.
    """
    encoder = encoder or save_base(tmp_path, "encoder", "mt5")
    llm = llm or save_base(tmp_path, "llm", "llama")
    model = LayAlignForCausalLM.from_base_models(encoder, llm, **config_kwargs)
    return with_trained_layalign_weights(model), encoder, llm


def reference_state_dict(model: LayAlignForCausalLM, dtype: torch.dtype = torch.float16, prefix: str = "") -> dict:
    """`model`'s weights named as the reference `LayAlign` module names them, bases included, in `dtype`.

    `encoder_mt` is mT5's encoder stack; `model_llm` is the LLM inside peft's `AdaptionPromptModel`
    (`model_llm.model.`), whose adapted attentions wrap the original one (`self_attn.model.`) next to their
    `adaption_gate`; `llm_embedding_layer` is the LLM's input embedding once more.
    """
    adapted = set(model.config.adapted_llm_layers) if model.config.use_layer_fusion else set()
    state = {f"encoder_mt.{key}": value for key, value in model.encoder.get_encoder().state_dict().items()}
    for key, value in model.llm.state_dict().items():
        if (match := re.match(r"model\.layers\.(\d+)\.self_attn\.(.+)", key)) and int(match.group(1)) in adapted:
            key = f"model.layers.{match.group(1)}.self_attn.model.{match.group(2)}"
        state[f"model_llm.model.{key}"] = value
    state["llm_embedding_layer.weight"] = model.llm.get_input_embeddings().weight
    for slot, layer in enumerate(model.config.adapted_llm_layers if model.config.use_layer_fusion else []):
        state[f"model_llm.model.model.layers.{layer}.self_attn.adaption_gate"] = model.gates.weight[slot : slot + 1]
    state.update(mapping_state_dict(model, prefix="mapping."))
    if model.fusion is not None:
        parts = {"fc1": model.fusion.layer_mix, "fc2": model.fusion.projection, "fc3": model.fusion.refine}
        for reference_name, module in parts.items():
            if module is not None:
                state[f"encoder_aligner.projector.{reference_name}.weight"] = module.weight
                state[f"encoder_aligner.projector.{reference_name}.bias"] = module.bias
    return {prefix + key: value.detach().to(dtype).clone() for key, value in state.items()}


def mapping_state_dict(model: LayAlignForCausalLM, prefix: str = "") -> dict:
    """The reference `Mapping` module's weights (`MLP` and the `(1, 1, d_llm)` end boundary)."""
    return {
        f"{prefix}mlp.linear1.weight": model.input_mapping.up.weight,
        f"{prefix}mlp.linear1.bias": model.input_mapping.up.bias,
        f"{prefix}mlp.linear2.weight": model.input_mapping.down.weight,
        f"{prefix}mlp.linear2.bias": model.input_mapping.down.bias,
        f"{prefix}end_boundary": model.boundary.embedding.view(1, 1, -1),
    }


def round_layalign_weights(model: LayAlignForCausalLM, dtype: torch.dtype) -> None:
    """Rounds the LayAlign weights to `dtype` and back, as a checkpoint saved in `dtype` holds them."""
    with torch.no_grad():
        for name in model.layalign_module_names:
            if (module := getattr(model, name)) is not None:
                for parameter in module.parameters():
                    parameter.copy_(parameter.to(dtype).float())


def assert_same_outputs(converted: LayAlignForCausalLM, model: LayAlignForCausalLM) -> None:
    inputs = sample_inputs()
    assert (logits(converted, inputs) - logits(model, inputs)).abs().max().item() <= 1e-5


def test_a_single_pickled_file_converts_to_the_same_model(tmp_path):
    # The MLP structure, one adapted layer of two and a `module.` prefix (a DDP wrapper), so that each is read.
    model, encoder, llm = source_model(tmp_path, fusion_structure="mlp", adapted_llm_layers=[1])
    path = tmp_path / "reference" / "pytorch_model.bin"
    path.parent.mkdir()
    torch.save(reference_state_dict(model, prefix="module."), path)

    output = convert_reference_checkpoint(path, tmp_path / "converted", encoder=encoder, llm=llm)
    converted = LayAlignForCausalLM.from_pretrained(output)

    config = converted.config
    assert config.checkpoint_format == "layalign_only"
    assert (config.encoder_name_or_path, config.llm_name_or_path) == (encoder, llm)
    assert config.use_layer_fusion and config.fusion_structure == "mlp"
    assert config.adapted_llm_layers == [1] and config.fused_encoder_layers == [0, 1]
    assert json.loads((output / "config.json").read_text())["checkpoint_format"] == "layalign_only"
    layalign_parameters = [parameter for name in converted.layalign_module_names for parameter in getattr(converted, name).parameters()]
    assert {parameter.dtype for parameter in layalign_parameters} == {torch.float32}
    round_layalign_weights(model, torch.float16)
    assert_same_outputs(converted, model)


def test_a_sharded_folder_converts_through_the_command_line(tmp_path, tiny_base_folders):
    model, encoder, llm = source_model(tmp_path, tiny_base_folders["encoder"], tiny_base_folders["llm"])
    state = reference_state_dict(model)
    folder = tmp_path / "reference"
    folder.mkdir()
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[0::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, names in shards.items():
        torch.save({key: state[key] for key in names}, folder / name)
    weight_map = {key: name for name, names in shards.items() for key in names}
    total_size = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map})
    )

    main([str(folder), str(tmp_path / "converted"), "--encoder", encoder, "--llm", llm])
    converted = LayAlignForCausalLM.from_pretrained(tmp_path / "converted")

    assert converted.config.adapted_llm_layers == [0, 1] and converted.config.fusion_structure == "linear"
    round_layalign_weights(model, torch.float16)
    assert_same_outputs(converted, model)
    processor = LayAlignProcessor.from_pretrained(tmp_path / "converted")  # the bases' tokenizers came along
    assert processor.encoder_tokenizer("Hallo")["input_ids"]


def test_a_mindmerger_mapping_converts_to_mindmerger_mode(tmp_path):
    model, encoder, llm = source_model(tmp_path, use_layer_fusion=False)
    path = tmp_path / "pytorch_model.bin"
    # As MindMerger's `save_model` writes it: the mapping alone, wrapped, in the legacy format (no mmap possible).
    mapping = {key: value.detach().to(torch.bfloat16) for key, value in mapping_state_dict(model).items()}
    torch.save({"model_state_dict": mapping}, path, _use_new_zipfile_serialization=False)

    output = convert_reference_checkpoint(path, tmp_path / "converted", encoder=encoder, llm=llm)
    converted = LayAlignForCausalLM.from_pretrained(output)

    assert not converted.config.use_layer_fusion
    assert converted.fusion is None and converted.gates is None
    round_layalign_weights(model, torch.bfloat16)
    assert_same_outputs(converted, model)


class _RunsCodeWhenUnpickled:
    """Unpickles into `os.makedirs(marker)`: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_pickle_holding_other_objects_is_refused_unrun(tmp_path):
    model, encoder, llm = source_model(tmp_path)
    marker = tmp_path / "code-ran"
    state = reference_state_dict(model)
    state["training_args"] = _RunsCodeWhenUnpickled(marker)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)

    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} holds a pickled object that is not a tensor"):
        convert_reference_checkpoint(path, tmp_path / "converted", encoder=encoder, llm=llm)
    assert not marker.exists()
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize("kind,name,option", [("encoder", "mt5", "--encoder"), ("llm", "llama", "--llm")])
def test_bases_other_than_the_checkpoints_are_refused(tmp_path, kind, name, option):
    model, encoder, llm = source_model(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference_state_dict(model), path)
    # The same architecture with other weights: MetaMath-7B named where the checkpoint holds Llama-2-7B.
    other = save_base(tmp_path / "other", kind, name, seed=11)
    bases = {"encoder": encoder, "llm": llm, kind: other}

    with pytest.raises(ValueError, match=rf"named by {option} is not the one this checkpoint was trained with"):
        convert_reference_checkpoint(path, tmp_path / "converted", **bases)
    assert not (tmp_path / "converted").exists()


def test_unknown_missing_and_misshaped_keys_are_named(tmp_path):
    model, encoder, llm = source_model(tmp_path)
    state = reference_state_dict(model)
    state["encoder_aligner.projector.scale"] = torch.ones(1)
    state["model_llm.model.model.layers.0.self_attn.lora_A.weight"] = torch.ones(2, 32)  # trained, not LayAlign's
    state["mapping.mlp.linear2.bias"] = torch.zeros(7)
    del state["mapping.end_boundary"]
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)

    with pytest.raises(ValueError) as raised:
        convert_reference_checkpoint(path, tmp_path / "converted", encoder=encoder, llm=llm)
    message = str(raised.value)
    assert re.search(r"unknown keys.*'encoder_aligner\.projector\.scale'", message)
    assert "'model_llm.model.model.layers.0.self_attn.lora_A.weight'" in message
    assert re.search(r"missing keys.*'mapping\.end_boundary'", message)
    assert re.search(r"mis-shaped keys.*`mapping\.mlp\.linear2\.bias` has shape \(7,\), expected \(32,\)", message)
    assert not (tmp_path / "converted").exists()


def test_an_output_that_is_the_source_file_is_refused_untouched(tmp_path):
    model, encoder, llm = source_model(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference_state_dict(model), path)
    content = path.read_bytes()
    for output in (path, tmp_path):
        with pytest.raises(SystemExit, match="OUTPUT_DIR .* (is a file|holds the checkpoint being converted)"):
            main([str(path), str(output), "--encoder", encoder, "--llm", llm])
    assert path.read_bytes() == content
    assert not [item for item in tmp_path.iterdir() if item.name.startswith(".")]


def test_converting_over_an_old_checkpoint_leaves_none_of_its_processor(tmp_path, tiny_base_folders):
    from transformers import AutoTokenizer

    model, encoder, llm = source_model(tmp_path, tiny_base_folders["encoder"], tiny_base_folders["llm"])
    output = tmp_path / "converted"
    model.save_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    tokenizer.chat_template = "{{ 'old template' }}"
    LayAlignProcessor(
        tokenizer=tokenizer, encoder_tokenizer=AutoTokenizer.from_pretrained(encoder), prompt_template="old {query}"
    ).save_pretrained(output)
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference_state_dict(model), path)

    convert_reference_checkpoint(path, output, encoder=encoder, llm=llm)

    assert not (output / "chat_template.jinja").exists()
    assert AutoTokenizer.from_pretrained(output).chat_template is None
    assert LayAlignProcessor.from_pretrained(output).prompt_template is None


def test_a_safetensors_source_converts(tmp_path, caplog):
    from safetensors.torch import save_file

    model, encoder, llm = source_model(tmp_path)
    path = tmp_path / "model.safetensors"
    save_file(reference_state_dict(model, dtype=torch.float32), path)
    with caplog.at_level("INFO"):
        output = convert_reference_checkpoint(path, tmp_path / "converted", encoder=encoder, llm=llm)
    assert "legacy" not in caplog.text
    assert_same_outputs(LayAlignForCausalLM.from_pretrained(output), model)


def _index(folder: Path, text: str) -> Path:
    folder.mkdir()
    (folder / "pytorch_model.bin.index.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    "kind,message",
    [
        ("empty", r"pytorch_model.bin is empty"),
        ("truncated", r"pytorch_model.bin cannot be read as a PyTorch checkpoint .* truncated"),
        ("text", r"pytorch_model.bin cannot be read as a PyTorch checkpoint"),
        ("bad_index", r"pytorch_model.bin.index.json is not a valid shard index"),
        ("escaping_index", r"names shards outside its folder \(.*\.\./x\.bin\)"),
    ],
)
def test_unreadable_sources_are_named(tmp_path, kind, message):
    model, encoder, llm = source_model(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(reference_state_dict(model), path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "text":
        path.write_text("these are my notes, not a checkpoint\n")
    elif kind == "bad_index":
        path = _index(tmp_path / "sharded", "{not json")
    else:
        torch.save(reference_state_dict(model), tmp_path / "x.bin")
        path = _index(tmp_path / "sharded", json.dumps({"weight_map": {"a": "../x.bin"}}))
    with pytest.raises(SystemExit, match=message):
        main([str(path), str(tmp_path / "converted"), "--encoder", encoder, "--llm", llm])
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize("flag,value", [("--llm", "./missing"), ("--encoder", "/missing"), ("--llm", "nobody/no-such-llm")])
def test_a_base_that_cannot_be_found_names_its_flag(tmp_path, flag, value):
    model, encoder, llm = source_model(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference_state_dict(model), path)
    arguments = {"--encoder": encoder, "--llm": llm, flag: value}
    with pytest.raises(SystemExit, match=rf"{flag} '{re.escape(value)}' (is not a folder|cannot be loaded)"):
        main([str(path), str(tmp_path / "converted"), *(item for pair in arguments.items() for item in pair)])


def test_a_dtype_that_is_not_floating_point_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["source", str(tmp_path / "converted"), "--dtype", "int8"])
    assert "--dtype: 'int8' is not a floating-point torch dtype" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`dtype` must be a floating-point dtype"):
        convert_reference_checkpoint("source", tmp_path / "converted", dtype=torch.int8)
