"""The paper's benchmarks (MGSM, MSVAMP, X-CSQA, XNLI): loading, generation, scoring and the paper's table layout.

The loaders read the file layouts of the reference code (see `data/README.md`): MGSM and MSVAMP ship in `data/`;
X-CSQA (`x-csqa/<L>/dev.jsonl`) and XNLI (`xnli/test.json`) are read from a folder the user provides.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_dataset

from ..modeling_layalign import LayAlignForCausalLM
from ..processing_layalign import LayAlignProcessor
from ..training.data import MATH_PROMPT, check_languages, load_mgsm
from .scoring import (
    extract_last_number,
    is_correct_choice,
    is_correct_label,
    is_correct_number,
    layalign_generate,
    llm_generate,
    load_metric,
)


MSVAMP_FILES = {
    "bn": "Bengali", "de": "German", "en": "English", "es": "Spanish", "fr": "French",
    "ja": "Japanese", "ru": "Russian", "sw": "Swahili", "th": "Thai", "zh": "Chinese",
}  # fmt: skip
CHOICE_LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its languages (in the paper's column order), how to load it and how to score an answer.

    Attributes:
        languages: the table's language columns, in the paper's order.
        low_resource: the languages averaged as "Lrl" (the rest of `languages` make "Hrl").
        load: `(data_dir, languages, limit) -> Dataset` with columns `language`, `source` (the query in L that both
            the encoder and the prompt read) and `answer`.
        prompt_template: the LLM prompt around the query, with a `{query}` field.
        is_correct: `(prediction, gold) -> bool`.
        metric: the local `evaluate` metric (see [`load_metric`]) that scores the same way, for each language's accuracy.
        default_max_new_tokens: enough for the expected answer (a chain of thought, or one letter or word).
    """

    name: str
    languages: tuple[str, ...]
    low_resource: tuple[str, ...]
    load: Callable
    prompt_template: str
    is_correct: Callable[[str, str], bool]
    default_max_new_tokens: int
    metric: str


def _select(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def load_mgsm_benchmark(data_dir, languages, limit=None) -> Dataset:
    return load_mgsm(languages, limit=limit, data_dir=data_dir)


def load_msvamp(data_dir, languages, limit=None) -> Dataset:
    """`msvamp/test_<English name>.jsonl`: `m_query` is the question in L, `response` the gold number."""
    parts = []
    for language in check_languages(languages, MSVAMP_FILES, "MSVAMP"):
        path = Path(data_dir) / "msvamp" / f"test_{MSVAMP_FILES[language]}.jsonl"
        rows = _select(load_dataset("json", data_files=str(path), split="train"), limit)
        parts.append(
            rows.map(
                lambda row: {"language": language, "source": row["m_query"], "answer": str(row["response"])},
                remove_columns=rows.column_names,
            )
        )
    return concatenate_datasets(parts)


def load_xcsqa(data_dir, languages, limit=None) -> Dataset:
    """`x-csqa/<L>/dev.jsonl`: `question.stem`, `question.choices[i].text` (lettered by position), `answerKey`."""
    parts = []
    for language in check_languages(languages, BENCHMARKS["xcsqa"].languages, "X-CSQA"):
        path = Path(data_dir) / "x-csqa" / language / "dev.jsonl"
        rows = _select(load_dataset("json", data_files=str(path), split="train"), limit)

        def to_query(row, language=language):
            options = "\t".join(
                f"{CHOICE_LETTERS[index]}. {choice['text']}" for index, choice in enumerate(row["question"]["choices"])
            )
            return {"language": language, "source": f"{row['question']['stem']}\nOptions:{options}", "answer": row["answerKey"]}

        parts.append(rows.map(to_query, remove_columns=rows.column_names))
    return concatenate_datasets(parts)


def load_xnli(data_dir, languages, limit=None) -> Dataset:
    """`xnli/test.json`: one JSON list (or `{"data": [...]}`) of `sentence1`, `sentence2`, `label`, `language`."""
    languages = check_languages(languages, BENCHMARKS["xnli"].languages, "XNLI")
    path = Path(data_dir) / "xnli" / "test.json"
    content = json.loads(path.read_text(encoding="utf-8"))
    rows = content["data"] if isinstance(content, dict) else content
    columns = {"language": [], "source": [], "answer": []}
    for language in languages:
        selected = [row for row in rows if row["language"] == language][:limit]
        for row in selected:
            columns["language"].append(language)
            columns["source"].append(f"Premise: {row['sentence1']}\nHypothesis: {row['sentence2']}")
            columns["answer"].append(str(row["label"]))
    return Dataset.from_dict(columns)


BENCHMARKS: dict[str, Benchmark] = {
    "mgsm": Benchmark(
        "MGSM", ("bn", "th", "sw", "ja", "zh", "de", "fr", "ru", "es", "en", "te"), ("bn", "th", "sw"),
        load_mgsm_benchmark, MATH_PROMPT, is_correct_number, 512, "last_number_accuracy",
    ),
    "msvamp": Benchmark(
        "MSVAMP", ("bn", "th", "sw", "ja", "zh", "de", "fr", "ru", "es", "en"), ("bn", "th", "sw"),
        load_msvamp, MATH_PROMPT, is_correct_number, 512, "last_number_accuracy",
    ),
    "xcsqa": Benchmark(
        "X-CSQA", ("sw", "ur", "hi", "ar", "vi", "ja", "pl", "zh", "nl", "ru", "it", "de", "pt", "fr", "es", "en"),
        ("sw", "ur", "hi"), load_xcsqa, "{query}\nAnswer:", is_correct_choice, 8, "choice_accuracy",
    ),
    "xnli": Benchmark(
        "XNLI", ("sw", "ur", "hi", "th", "ar", "tr", "el", "vi", "zh", "ru", "bg", "de", "fr", "es", "en"),
        ("sw", "ur", "hi"), load_xnli, "{query}\nLabel:", is_correct_label, 8, "label_accuracy",
    ),
}  # fmt: skip
MGSM_DEFAULT_LANGUAGES = BENCHMARKS["mgsm"].languages[:-1]  # the paper's table leaves Telugu out unless asked


def run_benchmark(
    model: LayAlignForCausalLM,
    processor: LayAlignProcessor,
    benchmark: Benchmark,
    examples: Dataset,
    batch_size: int = 8,
    llm_alone: bool = False,
    **generation_kwargs,
) -> list[str]:
    """Raw outputs for `examples`, with a progress bar: LayAlign reads the query through its encoder and in the
    prompt; `llm_alone` gives the LLM the same prompt as plain text and nothing else."""
    prompts = [benchmark.prompt_template.format(query=query) for query in examples["source"]]
    if llm_alone:
        return llm_generate(model.llm, processor.tokenizer, prompts, batch_size, progress=True, **generation_kwargs)
    return layalign_generate(model, processor, examples["source"], prompts, batch_size, progress=True, **generation_kwargs)


def score(benchmark: Benchmark, examples: Dataset, outputs: list[str]) -> dict:
    """Per-example records and per-language accuracy (%) with counts, the accuracy from the benchmark's `evaluate`
    metric."""
    records = [
        {
            "language": example["language"],
            "question": example["source"],
            "gold": example["answer"],
            "prediction": extract_last_number(output) if benchmark.is_correct is is_correct_number else output.strip(),
            "correct": benchmark.is_correct(output, example["answer"]),
            "output": output,
        }
        for example, output in zip(examples, outputs)
    ]
    metric = load_metric(benchmark.metric)
    per_language = {}
    for language in dict.fromkeys(example["language"] for example in records):
        rows = [record for record in records if record["language"] == language]
        accuracy = metric.compute(predictions=[row["output"] for row in rows], references=[row["gold"] for row in rows])
        per_language[language] = {"accuracy": 100 * accuracy["accuracy"], "n": len(rows)}
    return {"benchmark": benchmark.name, "per_language": per_language, "examples": records}


def paper_table(benchmark: Benchmark, rows: dict[str, dict[str, dict]]) -> str:
    """A markdown table in the paper's layout: system, Avg, Lrl, Hrl, then each evaluated language in order.

    Args:
        rows: system name -> per-language results (`{"accuracy": ..., "n": ...}`), e.g. LayAlign and LLM alone.
    """
    evaluated = [
        language for language in benchmark.languages if any(language in per_language for per_language in rows.values())
    ]
    header = ["system", "Avg", "Lrl", "Hrl", *evaluated]
    lines = [header]
    for system, per_language in rows.items():
        accuracy = {language: per_language[language]["accuracy"] for language in evaluated if language in per_language}
        low = [value for language, value in accuracy.items() if language in benchmark.low_resource]
        high = [value for language, value in accuracy.items() if language not in benchmark.low_resource]
        averages = [_mean(list(accuracy.values())), _mean(low), _mean(high)]
        cells = [_cell(value) for value in averages] + [_cell(accuracy.get(language)) for language in evaluated]
        lines.append([system, *cells])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    rendered = ["| " + " | ".join(cell.rjust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    rendered.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(rendered)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
