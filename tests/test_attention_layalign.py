"""The fused branch: what it reads from every listed LLM family (so a transformers upgrade that renames an attribute
fails here), and its fast paths against direct computations of the method."""

import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from modeling_layalign.attention_layalign import (
    LLM_FAMILIES,
    encoder_attention_bias,
    fused_attention_inputs,
    fused_branch_attention,
    llm_family,
)

from .conftest import LLM_CONFIGS, set_gates, tiny_model


def test_every_listed_family_has_a_tiny_test_config():
    assert set(LLM_FAMILIES) == set(LLM_CONFIGS)


@pytest.mark.parametrize("model_type", sorted(LLM_FAMILIES))
def test_attention_modules_offer_what_the_fused_branch_reads(model_type):
    llm = AutoModelForCausalLM.from_config(LLM_CONFIGS[model_type]())
    family = llm_family(llm.config)
    layers = llm.get_decoder().layers
    for index, layer in enumerate(layers):
        attention = layer.self_attn
        assert isinstance(attention.k_proj, nn.Linear) and isinstance(attention.v_proj, nn.Linear)
        assert isinstance(attention.head_dim, int) and isinstance(attention.scaling, float)
        assert attention.layer_idx == index
        if family.k_norm is not None:
            assert isinstance(getattr(attention, family.k_norm), nn.Module)
        if family.softcap is not None:
            assert hasattr(attention, family.softcap)
    assert callable(sys.modules[type(layers[0].self_attn).__module__].eager_attention_forward)


def _direct_fused_kv(model, fused: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
    """The projection of the fusion's sources written out as the paper states it: source `2m` through adapted layer
    `m`'s `k_proj` (and key norm), source `2m + 1` through its `v_proj`, one index at a time; the values times the
    layer's gate (where the paper scales the branch's output) and zero on padding.

    Returns `(batch, M, 2, num_kv_heads, encoder_len, head_dim)`."""
    family, layers, gates = llm_family(model.config.text_config), model.llm.get_decoder().layers, model.gates()
    per_layer = []
    for slot, index in enumerate(model.config.adapted_llm_layers):
        attention = layers[index].self_attn
        shape = (*fused.shape[:2], -1, attention.head_dim)
        keys = attention.k_proj(fused[:, :, 2 * slot]).view(shape)
        if family.k_norm is not None:
            keys = getattr(attention, family.k_norm)(keys)
        values = attention.v_proj(fused[:, :, 2 * slot + 1]).view(shape) * gates[slot]
        values = values * encoder_mask[:, :, None, None]
        per_layer.append(torch.stack([keys.transpose(1, 2), values.transpose(1, 2)], dim=1))
    return torch.stack(per_layer, dim=1)


def _layer_projections(model, fused: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
    """What the adapted layers project in a forward pass: each layer's `keys_and_values`, stacked as above."""
    inputs = fused_attention_inputs(
        fused, encoder_mask, None, model.gates, model._scale_value_sources, model._fused_slots, model.llm_family,
        model.llm.dtype,
    )  # fmt: skip
    per_layer = [
        torch.stack(inputs.keys_and_values(attention, slot), dim=1)
        for slot, attention in enumerate(model._adapted_attention_modules())
    ]
    return torch.stack(per_layer, dim=1)


@pytest.mark.parametrize("model_type", sorted(LLM_FAMILIES))
def test_fused_projection_and_its_gradient_equal_the_direct_computation(model_type):
    """Keys on padding may differ (the scale may zero their source); the mask removes them, so they are compared on
    real tokens only. Qwen2's `v_proj` has a bias: its gates scale the projected values, the others' the sources."""
    model = tiny_model(model_type)
    assert model._scale_value_sources == (model_type != "qwen2")
    with torch.no_grad():
        model.gates.weight.copy_(0.3 + 0.2 * torch.arange(len(model.config.adapted_llm_layers)))
    fused = torch.randn(3, 5, 2 * len(model.config.adapted_llm_layers), model.config.text_config.hidden_size)
    encoder_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    real = encoder_mask.bool()[:, None, None, None, :, None]
    direct_input, fast_input = fused.clone().requires_grad_(True), fused.clone().requires_grad_(True)
    direct = _direct_fused_kv(model, direct_input, encoder_mask)
    fast = _layer_projections(model, fast_input, encoder_mask)
    torch.testing.assert_close(fast * real, direct * real, rtol=0, atol=1e-6)
    upstream = torch.randn_like(direct) * real
    (direct * upstream).sum().backward()
    direct_gate_grads = model.gates.weight.grad.clone()
    model.zero_grad()
    (fast * upstream).sum().backward()
    torch.testing.assert_close(fast_input.grad, direct_input.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.gates.weight.grad, direct_gate_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_branch_attention_is_a_masked_softmax_over_the_encoder_tokens(softcap):
    """Grouped keys, padded encoder rows, optional soft-capping: against the formula, one head at a time."""
    torch.manual_seed(0)
    batch, heads, kv_heads, query_len, encoder_len, head_dim = 2, 4, 2, 3, 6, 8
    query = torch.randn(batch, heads, query_len, head_dim)
    key, value = torch.randn(2, batch, kv_heads, encoder_len, head_dim).unbind(0)
    encoder_mask = torch.ones(batch, encoder_len, dtype=torch.bool)
    encoder_mask[1, :2] = False
    module = nn.Module()
    module.scaling = head_dim**-0.5
    output = fused_branch_attention(module, query, key, value, encoder_attention_bias(encoder_mask.to(query.dtype)), softcap)
    assert output.shape == (batch, query_len, heads, head_dim)
    for b in range(batch):
        real = encoder_mask[b]
        for h in range(heads):
            scores = query[b, h] @ key[b, h // 2, real].T * module.scaling
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            expected = torch.softmax(scores, dim=-1) @ value[b, h // 2, real]
            torch.testing.assert_close(output[b, :, h], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_a_source_that_is_all_padding_adds_nothing(model_type):
    """A row whose encoder mask is all zeros: its fused branch contributes nothing, so strong gates leave its logits
    equal to zero gates' (the mapped prefix is padding too, so both read the text alone)."""
    model = tiny_model(model_type)
    inputs = dict(
        encoder_input_ids=torch.randint(4, 90, (2, 6)),
        encoder_attention_mask=torch.tensor([[1] * 6, [0] * 6]),
        input_ids=torch.randint(4, 120, (2, 5)),
    )
    with torch.no_grad():
        set_gates(model, 0.0)
        without = model(**inputs).logits[1, -5:]
        set_gates(model, 2.0)
        gated = model(**inputs).logits
    torch.testing.assert_close(gated[1, -5:], without, rtol=0, atol=1e-5)
    assert not torch.isnan(gated).any()
