"""`examples/make_model_card.py`: the card filled from a tiny model's config and an evaluation report."""

import json
import shutil
import sys
from pathlib import Path

import yaml


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import evaluate_layalign  # noqa: E402
import make_model_card  # noqa: E402


def test_card_carries_metadata_and_results(tiny_layalign_folder, tiny_base_folders, tmp_path):
    report = tmp_path / "eval_mgsm.json"
    evaluate_layalign.main(
        ["--model", tiny_layalign_folder, "--benchmark", "mgsm", "--languages", "sw", "en", "--limit", "2",
         "--max_new_tokens", "3", "--baseline", "--output", str(report)]
    )  # fmt: skip
    card_path = make_model_card.main(["--model", tiny_layalign_folder, "--results", str(report), "--repo_id", "me/tiny"])
    card = card_path.read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "transformers"
    assert front_matter["pipeline_tag"] == "text-generation"
    assert front_matter["base_model"] == [tiny_base_folders["encoder"], tiny_base_folders["llm"]]
    assert set(front_matter["language"]) == {"sw", "en"}
    assert front_matter["datasets"] == ["juletxara/mgsm"] and front_matter["metrics"] == ["accuracy"]
    assert front_matter["license"] == "apache-2.0"
    assert "| LLM alone |" in card and "### MGSM (2 problems per language)" in card
    assert 'from_pretrained("me/tiny", trust_remote_code=True)' in card
    assert "| input mapping reads | the final output |" in card
    assert "$" not in card.split("```")[0].replace("$12", "")  # every template field was filled


def test_base_models_can_name_hub_ids(tiny_layalign_folder):
    card = make_model_card.main(
        ["--model", tiny_layalign_folder, "--base_models", "intfloat/multilingual-e5-small", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    ).read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["base_model"] == ["intfloat/multilingual-e5-small", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert "No evaluation results yet." in card


def test_demo_folders_are_named_by_their_hub_models(tiny_layalign_folder, tmp_path):
    from layalign_demo.offline_models import ENCODER_PACKAGE, LLM_PACKAGE, MARKER_FILE

    model = shutil.copytree(tiny_layalign_folder, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    for package, field in ((ENCODER_PACKAGE, "encoder_name_or_path"), (LLM_PACKAGE, "llm_name_or_path")):
        (tmp_path / package.folder).mkdir()
        (tmp_path / package.folder / MARKER_FILE).write_text(json.dumps({"hub_id": package.hub_id}))
        config[field] = str(tmp_path / package.folder)
    (model / "config.json").write_text(json.dumps(config))
    front_matter = yaml.safe_load(make_model_card.fill_card(model, []).split("---")[1])
    assert front_matter["base_model"] == ["intfloat/multilingual-e5-small", "HuggingFaceTB/SmolLM2-135M-Instruct"]
