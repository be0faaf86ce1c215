"""The paper's benchmarks: loaders of the reference code's file layouts, scoring and the paper's table."""

import json
from pathlib import Path

import pytest
from datasets import Dataset

from modeling_layalign.evaluation.paper_benchmarks import BENCHMARKS, paper_table, score
from modeling_layalign.training.data import default_data_dir


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
