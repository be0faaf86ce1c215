"""Checkpoints whose gates are stored one per adapted layer (`gates.layers.<i>.gate`, before 2026-12-05) load with
their gates, in both checkpoint forms, from one weight file or from shards; a full checkpoint without gates is
refused (the shipped checkpoints, in that form, are loaded in test_shipped_checkpoint.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_layalign import LayAlignForCausalLM

from .conftest import tiny_model
from .test_modeling_layalign_checkpoints import drop_weight, logits, sample_inputs, trained_model


def store_gates_per_layer(folder, adapted_layers: list[int]) -> None:
    """Rewrites the checkpoint in `folder` as an earlier version wrote it: `gates.weight` becomes one `(1,)` tensor per
    adapted layer, in whichever weight file holds it."""
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    file = folder / (weight_map["gates.weight"] if weight_map else "model.safetensors")
    weights = load_file(file)
    gates = weights.pop("gates.weight")
    per_layer = {f"gates.layers.{layer}.gate": gates[slot : slot + 1].clone() for slot, layer in enumerate(adapted_layers)}
    save_file({**weights, **per_layer}, file, metadata={"format": "pt"})
    if weight_map:
        del weight_map["gates.weight"]
        weight_map.update({key: file.name for key in per_layer})
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def distinct_gates(model: LayAlignForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        model.gates.weight.copy_(0.1 + 0.05 * torch.arange(len(model.config.adapted_llm_layers)))
    return model.gates.weight.detach().clone()


def test_a_layalign_only_checkpoint_with_gates_per_layer_loads_them(tmp_path):
    model = trained_model(tmp_path)
    gates = distinct_gates(model)
    model.save_pretrained(tmp_path / "checkpoint")
    store_gates_per_layer(tmp_path / "checkpoint", model.config.adapted_llm_layers)
    reloaded = LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert torch.equal(reloaded.gates.weight, gates)
    inputs = sample_inputs()
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


@pytest.mark.parametrize("shard_size", [None, "20KB"], ids=["one_file", "shards"])
def test_a_full_checkpoint_with_gates_per_layer_loads_them(tmp_path, shard_size):
    model = tiny_model(adapted_llm_layers=[0, 1]).eval()  # bases built from configs: a full checkpoint
    gates = distinct_gates(model)
    model.save_pretrained(tmp_path / "checkpoint", **({"max_shard_size": shard_size} if shard_size else {}))
    assert (tmp_path / "checkpoint" / "model.safetensors.index.json").exists() == bool(shard_size)
    store_gates_per_layer(tmp_path / "checkpoint", model.config.adapted_llm_layers)
    reloaded, info = LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint", output_loading_info=True)
    assert torch.equal(reloaded.gates.weight, gates)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = sample_inputs()
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_a_full_checkpoint_without_gates_is_refused(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "checkpoint")
    drop_weight(tmp_path / "checkpoint", "gates.weight")
    with pytest.raises(ValueError, match="holds no `gates.weight`"):
        LayAlignForCausalLM.from_pretrained(tmp_path / "checkpoint")
