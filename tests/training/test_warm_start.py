"""The input mapping's warm start: token pairs aligned by characters, and a fit that moves the mapping towards them."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoProcessor

from modeling_layalign.training.warm_start import aligned_token_pairs, translated_token_pairs, warm_start_input_mapping

from ..conftest import SAMPLE_TEXTS


@pytest.fixture
def model_and_processor(tiny_layalign_folder):
    return AutoModelForCausalLM.from_pretrained(tiny_layalign_folder), AutoProcessor.from_pretrained(tiny_layalign_folder)


@pytest.mark.parametrize("mapped_encoder_layer", [None, 1])
def test_pairs_match_each_encoder_token_with_the_llm_tokens_over_the_same_characters(model_and_processor, mapped_encoder_layer):
    model, processor = model_and_processor
    model.config.mapped_encoder_layer = mapped_encoder_layer  # the states are those the input mapping reads
    sentence = "Weng earns $12 an hour"
    states, targets = aligned_token_pairs(model, processor, [sentence])
    encoded = processor.encoder_tokenizer(sentence, return_offsets_mapping=True)
    content_tokens = [(begin, end) for begin, end in encoded["offset_mapping"] if end > begin]
    assert states.shape == (len(content_tokens), model.config.encoder_config.hidden_size)
    llm = processor.tokenizer(sentence, return_offsets_mapping=True, add_special_tokens=False)
    embeddings = model.get_input_embeddings().weight
    begin, end = content_tokens[0]
    overlapping = [t for t, (b, e) in zip(llm["input_ids"], llm["offset_mapping"]) if b < end and e > begin]
    torch.testing.assert_close(targets[0], embeddings[overlapping].mean(dim=0))
    with torch.no_grad():
        output = model.encoder(**processor.encoder_tokenizer([sentence], return_tensors="pt"), output_hidden_states=True)
    hidden = output.last_hidden_state if mapped_encoder_layer is None else output.hidden_states[mapped_encoder_layer]
    first_content = next(i for i, (b, e) in enumerate(encoded["offset_mapping"]) if e > b)
    torch.testing.assert_close(states[0], hidden[0, first_content])


def test_a_pair_of_identical_sentences_aligns_each_token_with_itself(model_and_processor):
    model, processor = model_and_processor
    english = ["Weng earns $12 an hour", "Bata wa Janet hutaga mayai 16"]  # no word twice
    expected_states, expected_targets = aligned_token_pairs(model, processor, english)
    states, targets = translated_token_pairs(model, processor, english, english, alignment_layer=1, temperature=1e-4)
    torch.testing.assert_close(states, expected_states)
    torch.testing.assert_close(targets, expected_targets)
    with pytest.raises(ValueError, match="must pair up"):
        translated_token_pairs(model, processor, english, english[:1], alignment_layer=1)


def test_warm_start_fits_the_mapping_towards_the_llm_embeddings(model_and_processor):
    model, processor = model_and_processor
    states, targets = aligned_token_pairs(model, processor, SAMPLE_TEXTS)
    with torch.no_grad():
        before = F.mse_loss(model.input_mapping(states), targets).item()
    frozen = {name: parameter.clone() for name, parameter in model.named_parameters() if "input_mapping" not in name}
    pairs = (SAMPLE_TEXTS[2:4], SAMPLE_TEXTS[:2])
    result = warm_start_input_mapping(model, processor, SAMPLE_TEXTS, pairs, alignment_layer=1, steps=200, batch_size=64)
    assert result["pairs"] == states.shape[0] + translated_token_pairs(model, processor, *pairs, alignment_layer=1)[0].shape[0]
    assert result["mse"] < 0.5 * before
    # The model's own mapping moved (not a copy of it): measured here on the English tokens alone.
    with torch.no_grad():
        assert F.mse_loss(model.input_mapping(states), targets).item() < 0.5 * before
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name


def test_warm_start_needs_an_input_mapping_english_text_and_fast_tokenizers(model_and_processor, tiny_base_folders):
    from types import SimpleNamespace

    from modeling_layalign import LayAlignForCausalLM

    model, processor = model_and_processor
    without_mapping = LayAlignForCausalLM.from_base_models(
        tiny_base_folders["encoder"], tiny_base_folders["llm"], use_input_mapping=False
    )
    with pytest.raises(ValueError, match="no input mapping"):
        warm_start_input_mapping(without_mapping, processor, SAMPLE_TEXTS)
    with pytest.raises(ValueError, match="non-empty English sentences"):
        warm_start_input_mapping(model, processor, [""])
    slow = SimpleNamespace(encoder_tokenizer=SimpleNamespace(is_fast=False), tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match="`encoder_tokenizer` must be fast"):
        warm_start_input_mapping(model, slow, SAMPLE_TEXTS)
