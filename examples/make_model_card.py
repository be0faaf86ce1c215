"""Fill `hub_card.md` from a LayAlign model's config and evaluation results into the model folder's README.md.

    python examples/make_model_card.py --model outputs/demo/stage2 \\
        --results outputs/demo/stage2/eval_mgsm.json --repo_id you/layalign-demo

`push_to_hub` then ships the card with the model.
"""

import argparse
import json
import math
import string
from pathlib import Path

from safetensors import safe_open
from transformers import AutoConfig
from transformers.utils import logging

from layalign_demo import hub_id_of
from modeling_layalign.evaluation.paper_benchmarks import BENCHMARKS, paper_table


REPOSITORY = Path(__file__).resolve().parent.parent


logger = logging.get_logger(__name__)


BENCHMARK_DATASETS = {"MGSM": "juletxara/mgsm", "MSVAMP": "Mathoctopus/MSVAMP", "X-CSQA": "INK-USC/xcsr", "XNLI": "facebook/xnli"}


def yaml_list(values) -> str:
    return "\n".join(f"- {value}" for value in values) if values else "  []"


def results_section(reports: list[dict]) -> tuple[str, list[str], list[str]]:
    """Markdown tables, the evaluated languages and the benchmark datasets of evaluation reports."""
    sections, languages, datasets = [], [], []
    for report in reports:
        benchmark = next(value for value in BENCHMARKS.values() if value.name == report["benchmark"])
        rows = {system: result["per_language"] for system, result in report["systems"].items()}
        counts = {entry["n"] for result in rows.values() for entry in result.values()}
        sections.append(f"### {benchmark.name} ({'/'.join(str(count) for count in sorted(counts))} problems per language)\n")
        sections.append(paper_table(benchmark, rows) + "\n")
        languages += [language for result in rows.values() for language in result]
        datasets.append(BENCHMARK_DATASETS[benchmark.name])
    return "\n".join(sections) or "No evaluation results yet.", list(dict.fromkeys(languages)), datasets


def fill_card(
    model_folder: Path,
    reports: list[dict],
    repo_id: str | None = None,
    license_name: str = "apache-2.0",
    base_models: list[str] | None = None,
) -> str:
    config = AutoConfig.from_pretrained(model_folder, trust_remote_code=True)
    weights = model_folder / "model.safetensors"
    results, languages, datasets = results_section(reports)
    values = {
        "base_models": yaml_list(base_models or _base_model_ids(config)),
        "languages": yaml_list(sorted(set(languages) | {"en"})),
        "datasets": yaml_list(datasets),
        "license": license_name,
        "title": repo_id.split("/")[-1] if repo_id else model_folder.name,
        "encoder": config.encoder_name_or_path,
        "llm": config.llm_name_or_path,
        "trainable_parameters": _trainable_parameters(weights, config),
        "fused_encoder_layers": ", ".join(map(str, config.fused_encoder_layers)),
        "mapped_encoder_layer": _mapped_encoder_layer(config),
        "adapted_llm_layers": ", ".join(map(str, config.adapted_llm_layers)),
        "fusion_structure": config.fusion_structure,
        "use_input_mapping": config.use_input_mapping,
        "use_layer_fusion": config.use_layer_fusion,
        "checkpoint_format": config.checkpoint_format,
        "results": results,
        "repo_id": repo_id or str(model_folder),
    }
    return string.Template((REPOSITORY / "hub_card.md").read_text()).substitute(values)


def _mapped_encoder_layer(config) -> str:
    """The encoder state the input mapping reads (configs saved before 2026-12-07 have no such field: the output)."""
    layer = getattr(config, "mapped_encoder_layer", None)
    return "the final output" if layer is None else f"hidden state {layer} (0: the embedding output)"


def _base_model_ids(config) -> list[str]:
    """The bases' Hub ids: the config's names, with the offline demo's converted folders named by their Hub models."""
    names = [hub_id_of(name) or name for name in (config.encoder_name_or_path, config.llm_name_or_path)]
    for name in names:
        if Path(name).is_dir():
            logger.warning(f"The card's base_model names the local folder {name}; give `--base_models` with Hub ids.")
    return names


def _trainable_parameters(weights: Path, config) -> str:
    """The LayAlign parameter count, read from a LayAlign-only checkpoint's weights."""
    if config.checkpoint_format != "layalign_only" or not weights.exists():
        return "a few million"
    with safe_open(weights, framework="pt") as handle:
        count = sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return f"{count / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="The LayAlign model folder; README.md is written there.")
    parser.add_argument("--results", nargs="*", default=[], help="JSON files from examples/evaluate_layalign.py.")
    parser.add_argument("--repo_id", help="The Hub repository the model goes to (used in the card's code).")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument(
        "--base_models", nargs=2, metavar=("ENCODER", "LLM"),
        help="Hub ids for the card's base_model metadata when the config names local folders.",
    )  # fmt: skip
    args = parser.parse_args(argv)
    folder = Path(args.model)
    reports = [json.loads(Path(path).read_text()) for path in args.results]
    card = folder / "README.md"
    card.write_text(fill_card(folder, reports, args.repo_id, args.license, args.base_models))
    print(f"model card: {card}")
    return card


if __name__ == "__main__":
    main()
