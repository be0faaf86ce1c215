"""The answer ladder (`ladder.py`): MGSM questions paired with GSM8K's answers, and the four readings' losses."""

import json

import pytest
from datasets import Dataset

from modeling_layalign.data import MATH_PROMPT, default_data_dir
from modeling_layalign.evaluation import layalign_target_loss, llm_target_loss
from modeling_layalign.ladder import LadderRung, answer_ladder, llm_rungs, load_mgsm_with_answers

from .test_evaluation import SOURCES, model_and_processor  # noqa: F401 (a fixture)


def test_mgsm_with_answers_pairs_each_question_with_the_gsm8k_chain_of_thought_it_translates():
    examples = load_mgsm_with_answers(["sw", "te"], limit=3)
    assert examples["language"] == ["sw"] * 3 + ["te"] * 3
    gsm8k = [json.loads(line) for line in (default_data_dir() / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    assert examples["english"][:3] == examples["english"][3:]
    assert examples["target"][1].endswith(f"The answer is: {gsm8k[1]['answer'].split('####')[1].strip()}")
    assert "<<" not in examples["target"][0]
    assert examples["source"][0] != examples["english"][0] and examples["source"][0] != examples["source"][3]


def test_answer_ladder_measures_the_four_readings(model_and_processor):
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
    assert ladder.keys() == {"de", "sw"}
    # precomputed LLM-alone rungs are used as given
    rungs = llm_rungs(model.llm, processor.tokenizer, examples)
    assert rungs["sw"] == pytest.approx((ladder["sw"].english, ladder["sw"].llm))
    rung = LadderRung(english=1.0, llm=3.0, layalign=2.0, shuffled=2.5)
    assert (rung.gap, rung.share_closed, rung.share_closed_shuffled) == (0.5, 0.5, 0.25)
    assert LadderRung(english=1.0, llm=3.0).to_dict()["share_closed"] is None
    with pytest.raises(ValueError, match="shuffles sources"):
        answer_ladder(model, processor, examples.select([0, 2]), rungs)
