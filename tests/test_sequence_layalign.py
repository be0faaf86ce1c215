"""The LLM's input sequence on its own: `[prefix, text]`, padding moved to the front, positions over real tokens."""

import pytest
import torch

from modeling_layalign.sequence_layalign import (
    assemble_sequence,
    decoding_sequence,
    gather_rows,
    is_prepared_llm_mask,
    positions_from_mask,
    prefix_mask,
)


def embeddings(batch: int, length: int, offset: float) -> torch.Tensor:
    """`(batch, length, 1)` values that say where each came from: `offset + 10 * row + column`."""
    rows = torch.arange(batch, dtype=torch.float32)[:, None] * 10
    return (offset + rows + torch.arange(length, dtype=torch.float32))[..., None]


def test_prefix_mask_follows_bos_and_mapping():
    encoder_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert prefix_mask(encoder_mask, has_bos=True, has_mapping=True).tolist() == [[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]]
    assert prefix_mask(encoder_mask, has_bos=True, has_mapping=False).tolist() == [[1], [1]]
    assert prefix_mask(encoder_mask, has_bos=False, has_mapping=False).shape == (2, 0)


def test_first_pass_moves_padding_to_the_front_and_numbers_real_tokens_only():
    prefix = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]])  # BOS, two encoder tokens (one padded in row 0), boundary
    text_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # a left-padded prompt in row 0
    labels = torch.tensor([[-100, 5, 6], [4, 5, 6]])
    sequence = assemble_sequence(
        prefix, embeddings(2, 3, 100), text_mask, prefix_embeds=embeddings(2, 4, 0), labels=labels
    )
    assert sequence.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]
    # Row 0: the padded encoder token (column 2) and the padded prompt token (column 4) go first, in order.
    assert sequence.inputs_embeds[0, :, 0].tolist() == [2, 100, 0, 1, 3, 101, 102]
    assert sequence.position_ids[0, 2:].tolist() == [0, 1, 2, 3, 4]
    assert sequence.position_ids[1].tolist() == list(range(7))
    assert sequence.labels.tolist() == [[-100, -100, -100, -100, -100, 5, 6], [-100] * 4 + [4, 5, 6]]
    # Logits come back in the unsorted order.
    logits = sequence.inputs_embeds.expand(-1, -1, 3)
    torch.testing.assert_close(sequence.unsort(logits)[..., :1], torch.cat([embeddings(2, 4, 0), embeddings(2, 3, 100)], 1))


def test_later_passes_keep_the_text_and_continue_the_positions():
    prefix = torch.tensor([[1, 1, 0, 1]])
    sequence = assemble_sequence(prefix, embeddings(1, 1, 7), torch.tensor([[0, 1, 1, 1]]), past_len=7)
    assert sequence.order is None and sequence.inputs_embeds[0, 0, 0].item() == 7
    assert sequence.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]]
    assert sequence.position_ids.tolist() == [[5]]  # 3 real prefix positions + 2 earlier text tokens


def test_a_decoding_step_with_a_prepared_mask_gets_the_same_positions():
    prefix = torch.tensor([[1, 1, 0, 1]])
    text_mask = torch.tensor([[0, 1, 1, 1]])
    two_d = assemble_sequence(prefix, embeddings(1, 1, 7), text_mask, past_len=7, position_ids=torch.tensor([[2]]))
    prepared_mask = torch.zeros(1, 1, 1, 12)  # what the LLM's mask functions build over a static cache
    prepared = decoding_sequence(prefix, embeddings(1, 1, 7), prepared_mask, torch.tensor([[2]]))
    assert prepared.position_ids.tolist() == two_d.position_ids.tolist() == [[5]]
    assert prepared.attention_mask is prepared_mask and prepared.order is None
    with pytest.raises(ValueError, match="`position_ids`"):
        decoding_sequence(prefix, embeddings(1, 1, 7), prepared_mask, None)
    assert is_prepared_llm_mask(prepared_mask) and is_prepared_llm_mask({"full_attention": prepared_mask})
    assert not is_prepared_llm_mask(text_mask) and not is_prepared_llm_mask(None)


def test_given_position_ids_are_shifted_by_the_real_prefix():
    prefix = torch.tensor([[1, 0, 1], [1, 1, 1]])
    derived = assemble_sequence(prefix, embeddings(2, 2, 50), prefix_embeds=embeddings(2, 3, 0))
    given = assemble_sequence(
        prefix, embeddings(2, 2, 50), prefix_embeds=embeddings(2, 3, 0), position_ids=torch.tensor([[0, 1], [0, 1]])
    )
    assert torch.equal(derived.position_ids, given.position_ids)


def test_the_first_pass_needs_the_prefix_embeddings():
    with pytest.raises(ValueError, match="prefix_embeds"):
        assemble_sequence(torch.ones(1, 2, dtype=torch.long), embeddings(1, 2, 0))


def test_helpers():
    assert positions_from_mask(torch.tensor([[0, 0, 1, 1, 0, 1]])).tolist() == [[0, 0, 0, 1, 1, 2]]
    values = torch.arange(6).view(2, 3)
    assert gather_rows(values, torch.tensor([[2, 0, 1], [0, 0, 2]])).tolist() == [[2, 0, 1], [3, 3, 5]]
