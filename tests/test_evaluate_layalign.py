"""`examples/evaluate_layalign.py` end to end on a tiny random LayAlign model."""

import json
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import evaluate_layalign  # noqa: E402


@pytest.mark.parametrize("benchmark", ["mgsm", "msvamp"])
def test_cli_writes_results_and_prints_the_paper_table(tiny_layalign_folder, tmp_path, capsys, benchmark, monkeypatch):
    # Outputs with a known score: LayAlign answers the first 1, 2, 3 questions of sw, zh, en right (of 4 each),
    # the LLM alone none; everything after generation is the CLI's own.
    right = {"sw": 1, "zh": 2, "en": 3}

    def known_outputs(model, processor, benchmark, examples, batch_size, llm_alone=False, **generation):
        seen, outputs = {}, []
        for example in examples:
            index = seen[example["language"]] = seen.get(example["language"], -1) + 1
            correct = not llm_alone and index < right[example["language"]]
            outputs.append(f"So the answer is {example['answer'] if correct else '-123456'}.")
        return outputs

    monkeypatch.setattr(evaluate_layalign, "run_benchmark", known_outputs)
    output = tmp_path / "results.json"
    report = evaluate_layalign.main(
        ["--model", tiny_layalign_folder, "--benchmark", benchmark, "--languages", "sw", "zh", "en", "--limit", "4",
         "--batch_size", "3", "--max_new_tokens", "4", "--baseline", "--output", str(output)]
    )  # fmt: skip
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["systems"]) == {"LayAlign", "LLM alone"}
    for system, result in saved["systems"].items():
        expected = {language: (100 * count / 4 if system == "LayAlign" else 0.0) for language, count in right.items()}
        assert {language: entry["accuracy"] for language, entry in result["per_language"].items()} == expected
        assert {language: entry["n"] for language, entry in result["per_language"].items()} == {"sw": 4, "zh": 4, "en": 4}
        assert sum(example["correct"] for example in result["examples"]) == sum(expected.values()) * 4 / 100
        assert set(result["examples"][0]) == {"language", "question", "gold", "prediction", "correct", "output"}
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["system", "Avg", "Lrl", "Hrl", "sw", "zh", "en"]
    layalign_row = next([cell.strip() for cell in line.strip("|").split("|")] for line in table if "LayAlign" in line)
    # Average 50.0; sw is the low-resource language of the three (25.0), zh and en the high-resource ones (62.5).
    assert layalign_row == ["LayAlign", "50.0", "25.0", "62.5", "25.0", "50.0", "75.0"]


def test_generation_overrides_reach_generate(tiny_layalign_folder, tmp_path, monkeypatch):
    from modeling_layalign import LayAlignForCausalLM

    calls = []
    generate = LayAlignForCausalLM.generate

    def recording_generate(self, *args, **kwargs):
        calls.append(kwargs)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LayAlignForCausalLM, "generate", recording_generate)
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
    # What `generate` itself received, call by call: the overrides in the second run only.
    overridden = [call for call in calls if call.get("num_beams") == 2 and call.get("length_penalty") == 0.5]
    assert overridden and all(call["max_new_tokens"] == 3 for call in calls)
    assert len(overridden) < len(calls) and not any("num_beams" in call for call in calls[: len(calls) - len(overridden)])


def test_bad_generation_override_is_named():
    with pytest.raises(SystemExit, match="key=value"):
        evaluate_layalign.parse_generation_overrides(["num_beams"])
    for pair in ("num_beams=-1", "num_return_sequences=0", "max_new_tokens=two"):
        with pytest.raises(SystemExit, match=f"--generation {pair.split('=')[0]} must be a positive integer"):
            evaluate_layalign.parse_generation_overrides([pair])


def test_a_model_that_is_no_layalign_checkpoint_is_named(tiny_base_folders, tmp_path):
    arguments = ["--benchmark", "mgsm", "--languages", "sw", "--limit", "1"]
    with pytest.raises(SystemExit, match="--model '.*missing' is no folder here"):
        evaluate_layalign.main(["--model", str(tmp_path / "missing"), *arguments])
    with pytest.raises(SystemExit, match="is a 'llama' model, not a LayAlign checkpoint"):
        evaluate_layalign.main(["--model", tiny_base_folders["llm"], *arguments])
