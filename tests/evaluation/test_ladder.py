"""The answer ladder (`ladder.py`): MGSM questions paired with GSM8K's answers, and the four readings' losses."""

import json

import pytest
from datasets import Dataset

from modeling_layalign.evaluation.ladder import LadderRung, answer_ladder, llm_rungs, load_mgsm_with_answers
from modeling_layalign.evaluation.scoring import layalign_target_loss, llm_target_loss
from modeling_layalign.training.data import MATH_PROMPT, default_data_dir

from .test_scoring import SOURCES, model_and_processor  # noqa: F401 (a fixture)


def test_mgsm_with_answers_pairs_each_question_with_the_gsm8k_chain_of_thought_it_translates():
    examples = load_mgsm_with_answers(["sw", "te"], limit=3)
    assert examples["language"] == ["sw"] * 3 + ["te"] * 3
    gsm8k = [json.loads(line) for line in (default_data_dir() / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    assert examples["english"][:3] == examples["english"][3:]
    assert examples["target"][1].endswith(f"The answer is: {gsm8k[1]['answer'].split('####')[1].strip()}")
    assert "<<" not in examples["target"][0]
    assert examples["source"][0] != examples["english"][0] and examples["source"][0] != examples["source"][3]


def test_mgsm_with_answers_reads_a_later_block_of_questions_with_their_own_answers():
    first_five = load_mgsm_with_answers(["ja"], limit=5)
    later = load_mgsm_with_answers(["ja"], limit=2, first=3)
    assert later["line"] == [3, 4]
    for column in ("source", "english", "target"):
        assert later[column] == first_five[column][3:]
    assert len(load_mgsm_with_answers(["ja"], first=240)) == 10  # MGSM has 250 questions per language
    with pytest.raises(ValueError, match="`first` is the first MGSM line to read, 0 or more; got -1"):
        load_mgsm_with_answers(["ja"], first=-1)
    with pytest.raises(ValueError, match="MGSM has no question from line 250 on"):
        load_mgsm_with_answers(["ja"], first=250)


def test_answer_ladder_measures_the_five_readings(model_and_processor):
    model, processor = model_and_processor
    examples = Dataset.from_dict(
        {
            "language": ["de", "de", "sw", "sw"],
            "source": [SOURCES[0], "Weng verdient 12 Dollar", SOURCES[1], "Weng anapata dola 12"],
            "english": ["Natalia sold 48 clips.", "Weng earns $12", "Janet's ducks lay 16 eggs.", "Weng earns $12"],
            "target": ["She sold 48.\nThe answer is: 48", "12 dollars.\nThe answer is: 12"] * 2,
        }
    )
    ladder = answer_ladder(model, processor, examples)
    de = examples.select(range(2))
    prompts = [MATH_PROMPT.format(query=query) for query in de["source"]]
    english = llm_target_loss(model.llm, processor.tokenizer, [MATH_PROMPT.format(query=q) for q in de["english"]], de["target"])
    assert ladder["de"].english == pytest.approx(english)
    assert ladder["de"].llm == pytest.approx(llm_target_loss(model.llm, processor.tokenizer, prompts, de["target"]))
    assert ladder["de"].layalign == pytest.approx(
        layalign_target_loss(model, processor, de["source"], de["target"], prompts=prompts)
    )
    swapped = layalign_target_loss(model, processor, de["source"][::-1], de["target"], prompts=prompts)
    assert ladder["de"].shuffled == pytest.approx(swapped)
    assert ladder["de"].gap == pytest.approx(swapped - ladder["de"].layalign)
    other_english = llm_target_loss(model.llm, processor.tokenizer, [MATH_PROMPT.format(query=q) for q in de["english"][::-1]], de["target"])
    assert ladder["de"].english_shuffled == pytest.approx(other_english)
    assert ladder["de"].content_share == pytest.approx((swapped - ladder["de"].layalign) / (other_english - english))
    assert ladder.keys() == {"de", "sw"}
    # precomputed LLM-alone rungs are used as given
    rungs = llm_rungs(model.llm, processor.tokenizer, examples)
    assert rungs["sw"] == pytest.approx((ladder["sw"].english, ladder["sw"].llm, ladder["sw"].english_shuffled))
    rung = LadderRung(english=1.0, llm=3.0, layalign=2.0, shuffled=2.5, english_shuffled=3.0)
    assert (rung.gap, rung.share_closed, rung.share_closed_shuffled, rung.content_share) == (0.5, 0.5, 0.25, 0.25)
    assert LadderRung(english=1.0, llm=3.0).to_dict()["share_closed"] is None
    assert LadderRung(english=1.0, llm=3.0, layalign=2.0, shuffled=2.5).content_share is None
    with pytest.raises(ValueError, match="shuffles questions"):
        answer_ladder(model, processor, examples.select([0, 2]), rungs)
