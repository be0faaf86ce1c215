"""Every listed LLM family offers what the fused branch reads, so a transformers upgrade that renames one fails here."""

import sys

import pytest
from torch import nn
from transformers import AutoModelForCausalLM

from modeling_layalign.attention_layalign import LLM_FAMILIES, llm_family

from .conftest import LLM_CONFIGS


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
