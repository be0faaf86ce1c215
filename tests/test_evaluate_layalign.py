"""`examples/evaluate_layalign.py` end to end on a tiny random LayAlign model."""

import json
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import evaluate_layalign  # noqa: E402


@pytest.mark.parametrize("benchmark", ["mgsm", "msvamp"])
def test_cli_writes_results_and_prints_the_paper_table(tiny_layalign_folder, tmp_path, capsys, benchmark):
    output = tmp_path / "results.json"
    report = evaluate_layalign.main(
        ["--model", tiny_layalign_folder, "--benchmark", benchmark, "--languages", "sw", "zh", "en", "--limit", "4",
         "--batch_size", "3", "--max_new_tokens", "4", "--baseline", "--output", str(output)]
    )  # fmt: skip
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["systems"]) == {"LayAlign", "LLM alone"}
    for result in saved["systems"].values():
        assert {language: entry["n"] for language, entry in result["per_language"].items()} == {"sw": 4, "zh": 4, "en": 4}
        assert len(result["examples"]) == 12
        assert set(result["examples"][0]) == {"language", "question", "gold", "prediction", "correct", "output"}
    printed = capsys.readouterr().out
    table_header = next(line for line in printed.splitlines() if line.startswith("|") and "Avg" in line)
    assert [cell.strip() for cell in table_header.strip("|").split("|")] == ["system", "Avg", "Lrl", "Hrl", "sw", "zh", "en"]


def test_generation_overrides_reach_generate(tiny_layalign_folder, tmp_path):
    greedy = evaluate_layalign.main(
        ["--model", tiny_layalign_folder, "--benchmark", "mgsm", "--languages", "de", "--limit", "2",
         "--max_new_tokens", "3", "--output", str(tmp_path / "a.json")]
    )  # fmt: skip
    beams = evaluate_layalign.main(
        ["--model", tiny_layalign_folder, "--benchmark", "mgsm", "--languages", "de", "--limit", "2",
         "--max_new_tokens", "3", "--output", str(tmp_path / "b.json"), "--generation", "num_beams=2", "length_penalty=0.5"]
    )  # fmt: skip
    assert beams["generation"] == {"max_new_tokens": 3, "num_beams": 2, "length_penalty": 0.5}
    assert len(beams["systems"]["LayAlign"]["examples"]) == len(greedy["systems"]["LayAlign"]["examples"]) == 2


def test_bad_generation_override_is_named():
    with pytest.raises(SystemExit, match="key=value"):
        evaluate_layalign.parse_generation_overrides(["num_beams"])
