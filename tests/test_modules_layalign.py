"""The trainable LayAlign modules on their own: the gates' custom backward against plain autograd."""

import torch

from modeling_layalign.modules_layalign import LayAlignGates


def test_the_gates_and_the_source_scale_have_the_gradients_of_a_plain_stack():
    gates = LayAlignGates([0, 2, 5])
    with torch.no_grad():
        for value, gate in zip((0.5, -1.0, 2.0), gates.layers.values()):
            gate.gate.fill_(value)
    weights = torch.tensor([3.0, 5.0, 7.0, 11.0, 13.0, 17.0])
    loss = (gates() * weights[:3]).sum() + (gates.source_scale().view(-1) * weights).sum()
    loss.backward()
    received = [gate.gate.grad.item() for gate in gates.layers.values()]

    plain = [gate.gate.detach().clone().requires_grad_() for gate in gates.layers.values()]
    one = torch.ones(1)
    interleaved = torch.stack([scalar for gate in plain for scalar in (one, gate)]).view(-1)
    ((torch.stack(plain).view(-1) * weights[:3]).sum() + (interleaved * weights).sum()).backward()

    assert gates().tolist() == [0.5, -1.0, 2.0]
    assert gates.source_scale().view(-1).tolist() == [1.0, 0.5, 1.0, -1.0, 1.0, 2.0]
    assert received == [gate.grad.item() for gate in plain] == [3.0 + 5.0, 5.0 + 11.0, 7.0 + 17.0]
