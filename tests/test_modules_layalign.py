"""The trainable LayAlign modules on their own: the gates' vector, its source scale, and gates stored per layer."""

import pytest
import torch

from modeling_layalign.modules_layalign import LayAlignGates


def test_the_source_scale_puts_one_before_each_gate_and_passes_their_gradients():
    gates = LayAlignGates([0, 2, 5])
    with torch.no_grad():
        gates.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    assert gates(per_source=True).view(-1).tolist() == [1.0, 0.5, 1.0, -1.0, 1.0, 2.0]
    (gates(per_source=True).view(-1) * torch.tensor([3.0, 5.0, 7.0, 11.0, 13.0, 17.0])).sum().backward()
    assert gates.weight.grad.tolist() == [5.0, 11.0, 17.0]


def test_gates_stored_one_per_layer_load_in_the_order_of_the_adapted_layers():
    """Checkpoints written before the gates became one vector hold `layers.<i>.gate`, one `(1,)` tensor each."""
    gates = LayAlignGates([5, 0, 2])
    per_layer = {"layers.2.gate": torch.tensor([0.2]), "layers.5.gate": torch.tensor([0.5]), "layers.0.gate": torch.tensor([0.0])}
    result = gates.load_state_dict(per_layer)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(gates.weight, torch.tensor([0.5, 0.0, 0.2]))
    assert list(gates.state_dict()) == ["weight"]


def test_a_per_layer_gate_of_another_shape_is_named_by_its_key():
    gates = LayAlignGates([0, 1])
    with pytest.raises(ValueError, match=r"the checkpoint's `layers.1.gate` \(2,\) do not"):
        gates.load_state_dict({"layers.0.gate": torch.tensor([0.1]), "layers.1.gate": torch.tensor([0.2, 0.3])})
