"""Scoring helpers: number extraction, per-token losses and batched generation, on tiny models."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_layalign import LayAlignForCausalLM, LayAlignProcessor
from modeling_layalign.data import default_data_dir
from modeling_layalign.evaluation import (
    BENCHMARKS,
    alignment_scores,
    number_recall,
    extract_last_number,
    is_correct_number,
    layalign_generate,
    layalign_target_loss,
    llm_generate,
    llm_target_loss,
    paper_table,
    score,
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


def test_alignment_scores_compare_the_real_source_with_a_shuffled_one(model_and_processor):
    model, processor = model_and_processor
    scores = alignment_scores(model, processor, SOURCES, TARGETS, num_generations=2, max_new_tokens=4)
    assert scores["loss"] == pytest.approx(layalign_target_loss(model, processor, SOURCES, TARGETS))
    shuffled = layalign_target_loss(model, processor, SOURCES[1:] + SOURCES[:1], TARGETS)
    assert scores["shuffled_loss"] == pytest.approx(shuffled)
    assert scores["gap"] == pytest.approx(shuffled - scores["loss"])
    assert 0 <= scores["chrf"] <= 100 and scores["distinct_reconstructions"] in (0.5, 1.0)
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
    batched = llm_target_loss(llm, tokenizer, [prompt, "Q: Weng"], [target, " Weng earns"], batch_size=2)
    separate = [llm_target_loss(llm, tokenizer, [p], [t]) for p, t in ((prompt, target), ("Q: Weng", " Weng earns"))]
    assert min(separate) <= batched <= max(separate)


def test_batched_generation_equals_one_at_a_time(model_and_processor):
    model, processor = model_and_processor
    prompts = ["Q: Natalia", "Q:", "Q: Weng earns"]
    batched = layalign_generate(model, processor, SOURCES, prompts, batch_size=3, max_new_tokens=4)
    alone = [layalign_generate(model, processor, [s], [p], max_new_tokens=4)[0] for s, p in zip(SOURCES, prompts)]
    assert batched == alone
    without_prompt = layalign_generate(model, processor, SOURCES, max_new_tokens=4)
    assert len(without_prompt) == 3 and all(isinstance(text, str) for text in without_prompt)


def test_llm_generate_pads_left_and_restores_the_tokenizer(model_and_processor):
    model, processor = model_and_processor
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    batched = llm_generate(model.llm, tokenizer, ["Q: Natalia sold", "Q:"], max_new_tokens=4)
    alone = [llm_generate(model.llm, tokenizer, [prompt], max_new_tokens=4)[0] for prompt in ["Q: Natalia sold", "Q:"]]
    assert batched == alone
    assert tokenizer.padding_side == "right"


# -- benchmarks ---------------------------------------------------------------------------------------------------------


def write_xcsqa(root: Path) -> None:
    for language, stem in (("sw", "Ni wapi unaweza kupata kitabu?"), ("en", "Where can you find a book?")):
        folder = root / "x-csqa" / language
        folder.mkdir(parents=True)
        rows = [
            {
                "id": f"{language}-{index}",
                "question": {"stem": stem, "choices": [{"label": l, "text": t} for l, t in zip("ABC", ("library", "sea", "sky"))]},
                "answerKey": "A",
            }
            for index in range(3)
        ]
        (folder / "dev.jsonl").write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows))


def write_xnli(root: Path, wrapped: bool) -> None:
    rows = [
        {"language": language, "sentence1": f"premise {index}", "sentence2": f"hypothesis {index}", "label": label}
        for language in ("sw", "de")
        for index, label in enumerate(("entailment", "neutral"))
    ]
    (root / "xnli").mkdir(parents=True)
    (root / "xnli" / "test.json").write_text(json.dumps({"data": rows} if wrapped else rows))


def test_xcsqa_loader_letters_the_choices(tmp_path):
    write_xcsqa(tmp_path)
    rows = BENCHMARKS["xcsqa"].load(tmp_path, ["sw", "en"], 2)
    assert len(rows) == 4 and rows[0]["language"] == "sw" and rows[0]["answer"] == "A"
    assert rows[2]["source"] == "Where can you find a book?\nOptions:A. library\tB. sea\tC. sky"
    prompt = BENCHMARKS["xcsqa"].prompt_template.format(query=rows[2]["source"])
    assert prompt.endswith("C. sky\nAnswer:")


@pytest.mark.parametrize("wrapped", [False, True])
def test_xnli_loader_reads_both_file_shapes(tmp_path, wrapped):
    write_xnli(tmp_path, wrapped)
    rows = BENCHMARKS["xnli"].load(tmp_path, ["de"], None)
    assert rows["answer"] == ["entailment", "neutral"]
    assert rows[0]["source"] == "Premise: premise 0\nHypothesis: hypothesis 0"


def test_shipped_math_benchmarks_load():
    mgsm = BENCHMARKS["mgsm"].load(default_data_dir(), ["sw", "te"], 3)
    assert len(mgsm) == 6 and mgsm[0]["answer"] == "18"
    msvamp = BENCHMARKS["msvamp"].load(default_data_dir(), ["sw", "zh"], 3)
    assert len(msvamp) == 6 and msvamp[0]["answer"] == "8.0" and msvamp[0]["source"].startswith("Julia alicheza")
    with pytest.raises(ValueError, match=r"MSVAMP has no languages \['te'\]"):
        BENCHMARKS["msvamp"].load(default_data_dir(), ["te"], 1)


@pytest.mark.parametrize(
    "prediction,gold,benchmark,expected",
    [
        (" B. sea", "B", "xcsqa", True),
        ("(C)", "C", "xcsqa", True),
        ("Answer: A", "A", "xcsqa", False),
        ("Entailment.", "entailment", "xnli", True),
        ("neutral, because", "contradiction", "xnli", False),
        ("", "neutral", "xnli", False),
    ],
)
def test_choice_and_label_scoring(prediction, gold, benchmark, expected):
    assert BENCHMARKS[benchmark].is_correct(prediction, gold) is expected


def test_score_and_paper_table_compute_the_averages():
    examples = Dataset.from_dict(
        {"language": ["bn", "bn", "sw", "de", "en"], "source": ["q"] * 5, "answer": ["1", "2", "3", "4", "5"]}
    )
    result = score(BENCHMARKS["mgsm"], examples, ["1", "0", "The answer is 3", "4", "no idea"])
    assert result["per_language"] == {
        "bn": {"accuracy": 50.0, "n": 2},
        "sw": {"accuracy": 100.0, "n": 1},
        "de": {"accuracy": 100.0, "n": 1},
        "en": {"accuracy": 0.0, "n": 1},
    }
    assert result["examples"][2]["prediction"] == 3.0 and result["examples"][4]["prediction"] is None
    table = paper_table(BENCHMARKS["mgsm"], {"LayAlign": result["per_language"]}).splitlines()
    assert [cell.strip() for cell in table[0].strip("|").split("|")] == ["system", "Avg", "Lrl", "Hrl", "bn", "sw", "de", "en"]
    # Avg over the 4 languages, Lrl = mean(bn, sw), Hrl = mean(de, en).
    assert [cell.strip() for cell in table[2].strip("|").split("|")] == ["LayAlign", "62.5", "75.0", "50.0", "50.0", "100.0", "100.0", "0.0"]


def test_mgsm_with_answers_pairs_each_question_with_the_gsm8k_chain_of_thought_it_translates():
    from modeling_layalign.evaluation import load_mgsm_with_answers

    examples = load_mgsm_with_answers(["sw", "te"], limit=3)
    assert examples["language"] == ["sw"] * 3 + ["te"] * 3
    gsm8k = [json.loads(line) for line in (default_data_dir() / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    assert examples["english"][:3] == examples["english"][3:]
    assert examples["target"][1].endswith(f"The answer is: {gsm8k[1]['answer'].split('####')[1].strip()}")
    assert "<<" not in examples["target"][0]
    assert examples["source"][0] != examples["english"][0] and examples["source"][0] != examples["source"][3]


def test_answer_ladder_measures_the_four_readings(model_and_processor):
    from modeling_layalign.data import MATH_PROMPT
    from modeling_layalign.evaluation import LadderRung, answer_ladder, llm_rungs

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
