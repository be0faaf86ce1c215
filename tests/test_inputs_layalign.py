"""Checks of the model's inputs (`modeling_layalign/inputs_layalign.py`) beyond what the model's tests reach."""

import pytest
import torch

from modeling_layalign.inputs_layalign import check_labels, check_token_range

from .conftest import ENCODER_VOCAB, LLM_VOCAB, tiny_model


def test_labels_off_the_cpu_are_not_read():
    # Reading them would be a host-device sync in every training step. A meta tensor has no values: reading one raises.
    labels = torch.full((2, 3), -100, device="meta")
    with pytest.raises(RuntimeError):
        bool((labels != -100).any())
    check_labels(labels, (2, 3))


def test_token_ids_outside_the_embedding_tables_name_the_argument_and_the_table():
    model = tiny_model("llama")
    model.resize_token_embeddings(LLM_VOCAB - 8)  # a shrunk vocabulary
    source = torch.tensor([[5, 6, 7]])
    beyond = torch.tensor([[5, LLM_VOCAB - 3]])
    message = f"`input_ids` holds token ids from 5 to {LLM_VOCAB - 3}, but the LLM's embedding table has {LLM_VOCAB - 8} rows"
    with pytest.raises(ValueError, match=message):
        model(input_ids=beyond, encoder_input_ids=source)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=beyond, encoder_input_ids=source, max_new_tokens=1)
    with pytest.raises(ValueError, match="`input_ids` holds token ids from -1 to 5"):
        model(input_ids=torch.tensor([[-1, 5]]), encoder_input_ids=source)
    with pytest.raises(ValueError, match=f"`encoder_input_ids` .* the encoder's embedding table has {ENCODER_VOCAB} rows"):
        model.generate(input_ids=torch.tensor([[5]]), encoder_input_ids=torch.tensor([[5, ENCODER_VOCAB]]), max_new_tokens=1)
    assert model(input_ids=torch.tensor([[5, LLM_VOCAB - 9]]), encoder_input_ids=source).logits.shape[-1] == LLM_VOCAB - 8


def test_token_ids_off_the_cpu_are_not_read_by_the_passes():
    check_token_range("input_ids", torch.full((1, 2), 10**6, device="meta"), 10, "the LLM")
    with pytest.raises(ValueError, match="`input_ids` holds token ids from 1000000 to 1000000"):
        check_token_range("input_ids", torch.full((1, 2), 10**6), 10, "the LLM", always=True)
