"""Generation that goes on from a cache (a chat's next turn), caches that cannot belong to the call, and drafting."""

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache

from .conftest import LLM_PAD, set_gates, tiny_model
from .test_modeling_layalign import make_batch


GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=LLM_PAD, output_scores=True, return_dict_in_generate=True)


def continued(model, inputs, first, sequences, max_new_tokens, with_mask=True):
    """`generate` continuing `first` (an earlier output on `inputs`) from `sequences`, on a copy of its cache."""
    mask = None
    if with_mask:
        new = sequences.shape[1] - inputs["input_ids"].shape[1]
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(sequences), new, dtype=torch.long)], dim=1)
    return model.generate(
        input_ids=sequences,
        attention_mask=mask,
        cache=copy.deepcopy(first.past_key_values),
        encoder_input_ids=inputs["encoder_input_ids"],
        encoder_attention_mask=inputs["encoder_attention_mask"],
        max_new_tokens=max_new_tokens,
        **GREEDY,
    )


@pytest.mark.parametrize("llm,fusion", [("llama", True), ("gemma2", True), ("qwen3", False)])
@pytest.mark.parametrize("text_lengths,encoder_lengths", [((4, 2), (6, 3)), ((12, 9), (6, 3)), ((2, 1), (9, 5))])
def test_continuing_a_generation_from_its_cache_equals_one_continuous_generation(
    llm, fusion, text_lengths, encoder_lengths, generator
):
    # (Prompts shorter and longer than `[BOS, source, boundary]`, which the cache holds in front of the text.)
    model = tiny_model(llm, use_layer_fusion=fusion)
    if fusion:
        set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, encoder_lengths, text_lengths, text_side="left")
    whole = model.generate(**inputs, max_new_tokens=10, **GREEDY)
    first = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    for new_tokens, with_mask in ((1, True), (3, False), (6, True)):
        more = continued(model, inputs, first, first.sequences, new_tokens, with_mask)
        assert more.sequences.tolist() == whole.sequences[:, : more.sequences.shape[1]].tolist()
        for step, scores in enumerate(more.scores):
            torch.testing.assert_close(scores, whole.scores[4 + step], rtol=0, atol=1e-5)


def test_a_next_turn_read_after_the_cache_equals_reading_the_whole_conversation(generator):
    model = tiny_model("llama")
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_side="left")
    first = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    turn = torch.tensor([[7, 8, 9, 10, 11]] * 2)
    conversation = dict(inputs, input_ids=torch.cat([first.sequences, turn], dim=1))
    conversation["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, 8, dtype=torch.long)], dim=1)
    fresh = model.generate(**conversation, max_new_tokens=5, **GREEDY)
    more = continued(model, inputs, first, conversation["input_ids"], 5)
    assert more.sequences.tolist() == fresh.sequences.tolist()
    for ours, theirs in zip(more.scores, fresh.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_cache_that_cannot_belong_to_the_call_is_refused(generator):
    model = tiny_model("llama")
    set_gates(model, 0.7)
    inputs, _, _ = make_batch(model, generator, text_side="left")
    first = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    settings = dict(max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=LLM_PAD)

    def go_on(cache, **changes):
        call = {**inputs, "input_ids": first.sequences, "cache": cache, **changes}
        call.pop("attention_mask")
        return model.generate(**call, **settings)

    other = model.llm.generate(input_ids=torch.tensor([[5, 6, 7, 8, 9]] * 2), max_new_tokens=1, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="holds 5 positions but no fused keys and values of this model's 2 adapted"):
        go_on(other.past_key_values)
    with pytest.raises(ValueError, match="a source of 6 encoder tokens, but `encoder_input_ids` holds 3"):
        go_on(first.past_key_values, encoder_input_ids=inputs["encoder_input_ids"][:, :3],
              encoder_attention_mask=inputs["encoder_attention_mask"][:, :3])  # fmt: skip
    with pytest.raises(ValueError, match="holds 2 sequences but `input_ids` holds 1"):
        go_on(first.past_key_values, **{name: value[:1] for name, value in inputs.items() if name != "input_ids"},
              input_ids=first.sequences[:1])  # fmt: skip
    with pytest.raises(ValueError, match=r"holds 15 positions; continuing needs .* \(8 positions for a source of 6"):
        go_on(first.past_key_values, input_ids=first.sequences[:, :5])  # the cache read 7 text tokens already
    with pytest.raises(ValueError, match="must be a transformers `Cache`"):
        go_on(((torch.zeros(2, 2, 3, 8),) * 2,))
    # MindMerger mode keeps a plain LLM cache: the prefix and the text count alone tell a foreign one
    mindmerger = tiny_model("llama", use_layer_fusion=False)
    foreign = mindmerger.llm.generate(input_ids=torch.tensor([[5, 6, 7, 8, 9]] * 2), max_new_tokens=1, return_dict_in_generate=True)
    with pytest.raises(ValueError, match=r"holds 5 positions; continuing needs .* \(8 positions"):
        mindmerger.generate(input_ids=first.sequences, cache=foreign.past_key_values, encoder_input_ids=inputs["encoder_input_ids"],
                            encoder_attention_mask=inputs["encoder_attention_mask"], **settings)  # fmt: skip
    long = DynamicCache(config=mindmerger.config.text_config)
    mindmerger.llm(input_ids=torch.randint(4, 50, (2, 20)), cache=long)
    with pytest.raises(ValueError, match="holds 20 positions; continuing needs"):
        mindmerger.generate(input_ids=first.sequences[:, :4], cache=long, encoder_input_ids=inputs["encoder_input_ids"],
                            encoder_attention_mask=inputs["encoder_attention_mask"], **settings)  # fmt: skip
    # an empty cache is one to fill
    filled = model.generate(**inputs, cache=DynamicCache(config=model.config.text_config), **settings)
    assert filled.tolist() == first.sequences[:, : filled.shape[1]].tolist()


@pytest.mark.parametrize("llm,fusion", [("llama", True), ("gemma2", True), ("gemma2", False)])
def test_prompt_lookup_decoding_generates_what_greedy_decoding_generates_in_fewer_passes(llm, fusion):
    model = tiny_model(llm, use_layer_fusion=fusion)
    if fusion:
        set_gates(model, 0.7)
    # A prompt that repeats itself, and tiny models whose greedy tokens repeat, so that drafts get accepted.
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    source = torch.tensor([[5, 9, 11, 13, 17, 19]])
    passes = []
    hook = model.llm.register_forward_pre_hook(lambda *args: passes.append(1))
    greedy = model.generate(input_ids=prompt, encoder_input_ids=source, max_new_tokens=12, **GREEDY)
    greedy_passes, passes[:] = len(passes), []
    drafted = model.generate(input_ids=prompt, encoder_input_ids=source, max_new_tokens=12, prompt_lookup_num_tokens=3, **GREEDY)
    hook.remove()
    assert drafted.sequences.tolist() == greedy.sequences.tolist()
    for ours, theirs in zip(drafted.scores, greedy.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert greedy_passes == 12 and len(passes) < greedy_passes


def test_drafting_models_that_cannot_read_the_source_are_refused_up_front():
    model = tiny_model("llama")
    source = torch.tensor([[5, 9, 11]])
    for drafting in (dict(assistant_model=model.llm), dict(assistant_model=model), dict(assistant_early_exit=1)):
        name = next(iter(drafting))
        with pytest.raises(ValueError, match=f"`{name}` cannot draft for LayAlign: .* `prompt_lookup_num_tokens`"):
            model.generate(input_ids=torch.tensor([[5, 6]]), encoder_input_ids=source, max_new_tokens=2, **drafting)
