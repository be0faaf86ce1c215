"""Scoring helpers: number extraction, per-token losses and batched generation, on tiny models."""

import pytest
import sacrebleu
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor
from modeling_layalign.evaluation.scoring import (
    alignment_scores,
    number_recall,
    extract_last_number,
    is_correct_number,
    layalign_generate,
    layalign_target_loss,
    llm_generate,
    llm_target_loss,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("She earns 1,234 dollars, so the answer is 18.", 18.0),
        ("The total is 1,234,567", 1234567.0),
        ("It drops to -3 degrees", -3.0),
        ("Half of 5 is 2.5.", 2.5),
        ("no number at all", None),
        ("a list: 1, 2, 3", 3.0),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_is_correct_number_compares_the_last_numbers():
    assert is_correct_number("so she makes $18 every day. The answer is: 18", "18")
    assert is_correct_number("The answer is 1,000", "1000")
    assert not is_correct_number("The answer is 17", "18")
    assert not is_correct_number("I do not know", "18")


@pytest.fixture(scope="module")
def model_and_processor(tiny_base_folders):
    model = LayAlignForCausalLM.from_base_models(tiny_base_folders["encoder"], tiny_base_folders["llm"]).eval()
    processor = LayAlignProcessor(
        tokenizer=AutoTokenizer.from_pretrained(tiny_base_folders["llm"]),
        encoder_tokenizer=AutoTokenizer.from_pretrained(tiny_base_folders["encoder"]),
    )
    return model, processor


SOURCES = ["Natalia hat 48 Clips an ihre Freunde verkauft.", "Bata wa Janet", "Weng earns $12 an hour"]
TARGETS = ["Natalia sold 48 clips.", "Janet", "Weng earns money for babysitting"]


def test_layalign_target_loss_is_a_token_weighted_mean_over_batches(model_and_processor):
    model, processor = model_and_processor
    one_batch = layalign_target_loss(model, processor, SOURCES, TARGETS, batch_size=3)
    split = layalign_target_loss(model, processor, SOURCES, TARGETS, batch_size=1)
    assert split == pytest.approx(one_batch, rel=1e-5)


def test_number_recall_counts_the_sources_numbers_found_in_the_outputs():
    sources = ["Natalia hat 48 Clips und 1,200 Freunde.", "Bata wa Janet", "Weng verdient 12 Dollar in 50 Minuten."]
    outputs = ["Natalia sold 48 clips to 1200 friends.", "Janet has 3 ducks", "Weng earns 12 dollars."]
    assert number_recall(sources, outputs) == pytest.approx(3 / 4)
    assert number_recall(["no numbers"], ["7"]) is None


def greedy_reconstructions(model, processor, sources: list[str], max_new_tokens: int) -> list[str]:
    """What greedy decoding reads after `[BOS, mapped source, boundary]`, one source at a time, each token checked to
    be the argmax of one teacher-forced forward pass over the whole continuation."""
    texts = []
    for source in sources:
        encoded = processor.encoder_tokenizer(processor.encoder_text_prefix + source, return_tensors="pt")
        encoder = {"encoder_input_ids": encoded["input_ids"], "encoder_attention_mask": encoded["attention_mask"]}
        with torch.no_grad():
            tokens = model.generate(**encoder, max_new_tokens=max_new_tokens, do_sample=False)
            logits = model(input_ids=tokens, **encoder).logits
        first = model.num_prefix_positions(encoded["input_ids"].shape[1]) - 1
        assert torch.equal(logits[:, first : first + tokens.shape[1]].argmax(-1), tokens)
        texts.append(processor.tokenizer.decode(tokens[0], skip_special_tokens=True).strip())
    return texts


def test_alignment_scores_compare_the_real_source_with_a_shuffled_one(model_and_processor):
    model, processor = model_and_processor
    scores = alignment_scores(model, processor, SOURCES, TARGETS, num_generations=2, max_new_tokens=4)
    assert scores["loss"] == pytest.approx(layalign_target_loss(model, processor, SOURCES, TARGETS))
    shuffled = layalign_target_loss(model, processor, SOURCES[1:] + SOURCES[:1], TARGETS)
    assert scores["shuffled_loss"] == pytest.approx(shuffled)
    assert scores["gap"] == pytest.approx(shuffled - scores["loss"])
    reconstructions = greedy_reconstructions(model, processor, SOURCES[:2], max_new_tokens=4)
    expected = sacrebleu.corpus_chrf([text.split("\n")[0] for text in reconstructions], [TARGETS[:2]]).score
    assert scores["chrf"] == pytest.approx(expected)
    assert scores["distinct_reconstructions"] == len(set(reconstructions)) / 2
    with pytest.raises(ValueError, match="at least two pairs"):
        alignment_scores(model, processor, SOURCES[:1], TARGETS[:1], num_generations=1)


def test_llm_target_loss_matches_the_models_own_loss(tiny_base_folders):
    llm = AutoModelForCausalLM.from_pretrained(tiny_base_folders["llm"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_folders["llm"])
    prompt, target = "Translate: Bata wa Janet", " Janet sold clips"
    ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        expected = llm(
            input_ids=torch.tensor([ids + target_ids]), labels=torch.tensor([[-100] * len(ids) + target_ids])
        ).loss.item()
    assert llm_target_loss(llm, tokenizer, [prompt], [target]) == pytest.approx(expected, rel=1e-6)
    pairs = ((prompt, target), ("Q: Weng", " Weng earns ten dollars an hour"))
    separate = [llm_target_loss(llm, tokenizer, [p], [t]) for p, t in pairs]
    # The mean per target token over both: each example weighs as many target tokens as it has (EOS included),
    # whether they share a batch or not.
    tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for _, t in pairs]
    assert tokens[0] != tokens[1]
    expected = sum(loss * count for loss, count in zip(separate, tokens)) / sum(tokens)
    for batch_size in (1, 2):
        assert llm_target_loss(llm, tokenizer, *map(list, zip(*pairs)), batch_size=batch_size) == pytest.approx(expected, rel=1e-5)


def test_batched_generation_equals_one_at_a_time(model_and_processor):
    model, processor = model_and_processor
    prompts = ["Q: Natalia", "Q:", "Q: Weng earns"]
    batched = layalign_generate(model, processor, SOURCES, prompts, batch_size=3, max_new_tokens=4)
    alone = [layalign_generate(model, processor, [s], [p], max_new_tokens=4)[0] for s, p in zip(SOURCES, prompts)]
    assert batched == alone
    without_prompt = layalign_generate(model, processor, SOURCES, max_new_tokens=4)
    assert without_prompt == greedy_reconstructions(model, processor, SOURCES, max_new_tokens=4)


def test_llm_generate_pads_left_and_restores_the_tokenizer(model_and_processor):
    model, processor = model_and_processor
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    batched = llm_generate(model.llm, tokenizer, ["Q: Natalia sold", "Q:"], max_new_tokens=4)
    alone = [llm_generate(model.llm, tokenizer, [prompt], max_new_tokens=4)[0] for prompt in ["Q: Natalia sold", "Q:"]]
    assert batched == alone
    assert tokenizer.padding_side == "right"
