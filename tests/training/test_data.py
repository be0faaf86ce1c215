"""The shipped data loaders, the stage tokenisation and the collator (reads the repository's `data/`)."""

import pytest
from transformers import AutoTokenizer

from modeling_layalign import LayAlignProcessor
from modeling_layalign.training.data import (
    MATH_PROMPT,
    LayAlignDataCollator,
    clean_gsm8k_answer,
    held_out_lines,
    load_math_instructions,
    load_mgsm,
    load_translation_pairs,
    tokenize_for_stage,
)


def test_translation_pairs_are_line_aligned_and_hold_out_the_last_lines():
    held_out = held_out_lines(50)
    training = load_translation_pairs(["ja", "sw"], exclude_lines=held_out)
    evaluation = load_translation_pairs(["ja", "sw"], lines=held_out)
    assert len(training) == 2 * 800 and len(evaluation) == 2 * 50
    assert set(training["line"]).isdisjoint(evaluation["line"])
    first = load_translation_pairs(["ja"])[0]
    assert first["target"].startswith("Natalia sold clips to 48 of her friends in April")
    assert "ナタリア" in first["source"] and first["language"] == "ja"


def test_math_instructions_keep_held_out_questions_out_of_every_language():
    held_out = held_out_lines(50)
    rows = load_math_instructions(["de"], exclude_lines=held_out)
    evaluation_english = set(load_translation_pairs(["de"], lines=held_out)["target"])
    english = rows.filter(lambda row: row["language"] == "en")
    assert len(english) > 1000
    assert evaluation_english.isdisjoint(english["source"])
    german = rows.filter(lambda row: row["language"] == "de")
    assert len(german) == 800 and german[0]["target"].endswith("The answer is: 72")


def test_clean_gsm8k_answer_drops_calculator_notes():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert clean_gsm8k_answer(answer) == "Natalia sold 48/2 = 24 clips in May.\nIn all 48+24 = 72 clips.\nThe answer is: 72"
    assert clean_gsm8k_answer("no final line") == "no final line"


def test_mgsm_loads_every_language_with_comma_free_answers():
    mgsm = load_mgsm(["en", "sw", "zh"], limit=None)
    assert len(mgsm) == 750
    assert all("," not in answer for answer in mgsm["answer"])
    assert mgsm[0]["answer"] == "18" and mgsm.filter(lambda row: row["language"] == "sw")[0]["source"].startswith("Bata")
    assert len(load_mgsm(["bn"], limit=4)) == 4


def test_unknown_languages_are_named():
    with pytest.raises(ValueError, match=r"The translation-pair data has no languages \['xx'\]"):
        load_translation_pairs(["xx"])
    with pytest.raises(ValueError, match="`count` must be in 0..849"):
        held_out_lines(900)


def test_stage_tokenisation_and_collation(tiny_base_folders):
    processor = LayAlignProcessor(
        tokenizer=AutoTokenizer.from_pretrained(tiny_base_folders["llm"]),
        encoder_tokenizer=AutoTokenizer.from_pretrained(tiny_base_folders["encoder"]),
        max_length=512,
    )
    pairs = load_translation_pairs(["de"], lines=range(2))
    stage1 = tokenize_for_stage(pairs, processor, 1)
    assert stage1[0]["labels"] == stage1[0]["input_ids"]
    math = load_math_instructions(["de"], include_english=False).select(range(2))
    stage2 = tokenize_for_stage(math, processor, 2)
    prompt = processor.tokenizer(MATH_PROMPT.format(query=math[0]["source"]), add_special_tokens=False)["input_ids"]
    assert stage2[0]["input_ids"][: len(prompt)] == prompt
    assert stage2[0]["labels"][: len(prompt)] == [-100] * len(prompt) and stage2[0]["labels"][len(prompt)] != -100
    batch = LayAlignDataCollator(processor)([stage2[0], stage1[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1, -1] == 0 and batch["labels"][1, -1] == -100
    with pytest.raises(ValueError, match="`stage` must be 1 or 2"):
        tokenize_for_stage(pairs, processor, 3)
