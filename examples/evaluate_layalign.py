"""Evaluate a LayAlign model on MGSM, MSVAMP, X-CSQA or XNLI and print the paper's per-language table.

    python examples/evaluate_layalign.py --model outputs/demo/stage2 --benchmark mgsm
    python examples/evaluate_layalign.py --model user/layalign-math --benchmark msvamp --baseline --limit 100
    python examples/evaluate_layalign.py --model ... --benchmark xcsqa --data_dir /path/with/x-csqa \\
        --generation num_beams=4

Greedy decoding by default (the paper's setting); `--generation key=value ...` overrides any `GenerationConfig`
field. `--baseline` also runs the LLM alone on the same prompts (the question in L as plain text, no encoder).
Results go to `--output` as JSON: every example (language, question, gold, prediction, raw output) and every
language's accuracy and count.
"""

import argparse
import json
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from modeling_layalign.evaluation.cli_arguments import positive_int
from modeling_layalign.evaluation.paper_benchmarks import BENCHMARKS, MGSM_DEFAULT_LANGUAGES, paper_table, run_benchmark, score
from modeling_layalign.training.data import default_data_dir


# `GenerationConfig` settings that count something: at least 1 (transformers fails late, or deep inside, on others).
COUNT_SETTINGS = ("max_new_tokens", "num_beams", "num_return_sequences")


def parse_generation_overrides(pairs: list[str]) -> dict:
    """`["num_beams=4", "do_sample=true"]` -> `{"num_beams": 4, "do_sample": True}` (values parsed as JSON)."""
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise SystemExit(f"--generation takes key=value pairs, got {pair!r}.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    for key in COUNT_SETTINGS:
        if key in overrides and (not isinstance(overrides[key], int) or isinstance(overrides[key], bool) or overrides[key] < 1):
            raise SystemExit(f"--generation {key} must be a positive integer, got {overrides[key]!r}.")
    return overrides


def check_model(model: str) -> None:
    """Exits naming `--model` when it is neither a LayAlign folder nor a Hub id (transformers would report a
    malformed repository id, or fail deep inside on another model type)."""
    looks_local = Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") != 1
    if looks_local and not Path(model).expanduser().is_dir():
        raise SystemExit(f"--model {model!r} is no folder here (nor a Hub id `owner/name`).")
    model_type = AutoConfig.from_pretrained(model, trust_remote_code=True).model_type
    if model_type != "layalign":
        raise SystemExit(f"--model {model!r} is a {model_type!r} model, not a LayAlign checkpoint (model_type 'layalign').")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A LayAlign folder or Hub id (loaded with trust_remote_code).")
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--languages", nargs="+", help="Default: the paper's columns (MGSM: add `te` to include Telugu).")
    parser.add_argument("--limit", type=positive_int, help="At most this many problems per language.")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--max_new_tokens", type=positive_int, help="Default: enough for the benchmark's answers.")
    parser.add_argument("--data_dir", default=None, help="Folder in the reference layout (default: the shipped data/).")
    parser.add_argument("--output", help="JSON results file (default: <model folder>/eval_<benchmark>.json, or ./).")
    parser.add_argument("--baseline", action="store_true", help="Also evaluate the LLM alone on the same prompts.")
    parser.add_argument("--generation", nargs="*", default=[], metavar="KEY=VALUE", help="GenerationConfig overrides.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    benchmark = BENCHMARKS[args.benchmark]
    languages = args.languages or (MGSM_DEFAULT_LANGUAGES if args.benchmark == "mgsm" else benchmark.languages)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    check_model(args.model)
    examples = benchmark.load(data_dir, languages, args.limit)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    generation = {"max_new_tokens": args.max_new_tokens or benchmark.default_max_new_tokens}
    generation.update(parse_generation_overrides(args.generation))

    systems = {"LayAlign": False, "LLM alone": True} if args.baseline else {"LayAlign": False}
    results = {}
    for system, llm_alone in systems.items():
        print(f"{benchmark.name}: {system} on {len(examples)} problems", flush=True)
        outputs = run_benchmark(model, processor, benchmark, examples, args.batch_size, llm_alone=llm_alone, **generation)
        results[system] = score(benchmark, examples, outputs)

    report = {"model": args.model, "benchmark": benchmark.name, "generation": generation, "systems": results}
    output = Path(args.output) if args.output else _default_output(args.model, args.benchmark)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, ensure_ascii=False, indent=2))
    print(f"\n{benchmark.name} accuracy (%)\n")
    print(paper_table(benchmark, {system: result["per_language"] for system, result in results.items()}))
    print(f"\nresults: {output}")
    return report


def _default_output(model: str, benchmark: str) -> Path:
    folder = Path(model)
    return (folder if folder.is_dir() else Path(".")) / f"eval_{benchmark}.json"


if __name__ == "__main__":
    main()
