"""Scoring LayAlign against its LLM alone: per-token loss, batched generation, and the paper's benchmarks.

The benchmarks read the file layouts of the reference code (see `data/README.md`): MGSM and MSVAMP ship in `data/`;
X-CSQA (`x-csqa/<L>/dev.jsonl`) and XNLI (`xnli/test.json`) are read from a folder the user provides.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets, load_dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.logging import tqdm

from .data import MATH_PROMPT, check_languages, load_mgsm
from .modeling_layalign import LayAlignForCausalLM
from .processing_layalign import IGNORE_INDEX, LayAlignProcessor, pad_sequences


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_last_number(text: str) -> float | None:
    """The last number in `text` (commas between digits removed), or `None` when there is none."""
    numbers = NUMBER.findall(re.sub(r"(?<=\d),(?=\d)", "", text))
    return float(numbers[-1]) if numbers else None


def is_correct_number(prediction: str, gold: str) -> bool:
    """Math scoring as in the paper: the last number of the output against the gold number."""
    predicted, expected = extract_last_number(prediction), extract_last_number(gold)
    return predicted is not None and expected is not None and abs(predicted - expected) < 1e-3


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def layalign_target_loss(
    model: LayAlignForCausalLM, processor: LayAlignProcessor, sources: list[str], targets: list[str], batch_size: int = 8
) -> float:
    """Mean loss per target token of `targets` given `sources`, with no prompt (stage 1's task)."""
    total, count = 0.0, 0
    for pairs in _batches(list(zip(sources, targets)), batch_size):
        batch = processor([source for source, _ in pairs], targets=[target for _, target in pairs], prompts=[""] * len(pairs))
        tokens = int((batch["labels"] != IGNORE_INDEX).sum())
        total += model(**batch).loss.item() * tokens
        count += tokens
    return total / count


@torch.no_grad()
def llm_target_loss(
    llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str], batch_size: int = 8
) -> float:
    """Mean loss per token of `targets` (each ended by EOS, as LayAlign's) for the LLM alone reading `prompts`."""
    total, count = 0.0, 0
    for pairs in _batches(list(zip(prompts, targets)), batch_size):
        rows, labels = [], []
        for prompt, target in pairs:
            prompt_ids = tokenizer(prompt)["input_ids"]
            target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(prompt_ids + target_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + target_ids)
        input_ids, attention_mask = pad_sequences(rows, tokenizer.pad_token_id)
        label_ids, _ = pad_sequences(labels, IGNORE_INDEX)
        tokens = int((label_ids[:, 1:] != IGNORE_INDEX).sum())
        total += llm(input_ids=input_ids, attention_mask=attention_mask, labels=label_ids).loss.item() * tokens
        count += tokens
    return total / count


@torch.no_grad()
def layalign_generate(
    model: LayAlignForCausalLM,
    processor: LayAlignProcessor,
    sources: list[str],
    prompts: list[str] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    **generation_kwargs,
) -> list[str]:
    """Greedy (unless told otherwise) continuations after `[BOS, mapped source, boundary, prompt]`."""
    outputs = []
    generation_kwargs.setdefault("do_sample", False)
    pairs = list(zip(sources, prompts if prompts is not None else [""] * len(sources)))
    for chunk in tqdm(list(_batches(pairs, batch_size)), desc="LayAlign", disable=not progress):
        batch = processor([source for source, _ in chunk], prompts=[prompt for _, prompt in chunk])
        if batch["input_ids"].shape[1] == 0:
            batch.pop("input_ids"), batch.pop("attention_mask")
        generated = model.generate(**batch, **generation_kwargs)
        new_tokens = generated[:, batch["input_ids"].shape[1] :] if "input_ids" in batch else generated
        outputs += processor.batch_decode(new_tokens, skip_special_tokens=True)
    return [output.strip() for output in outputs]


@torch.no_grad()
def llm_generate(
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    batch_size: int = 8,
    progress: bool = False,
    **generation_kwargs,
) -> list[str]:
    """Greedy (unless told otherwise) continuations of `prompts` by the LLM alone, left-padded in batches."""
    generation_kwargs.setdefault("do_sample", False)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        outputs = []
        for chunk in tqdm(list(_batches(prompts, batch_size)), desc="LLM alone", disable=not progress):
            batch = tokenizer(chunk, return_tensors="pt", padding=True)
            generated = llm.generate(**batch, pad_token_id=tokenizer.pad_token_id, **generation_kwargs)
            outputs += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return [output.strip() for output in outputs]


def number_recall(sources: list[str], outputs: list[str]) -> float | None:
    """Share of the numbers written in digits in `sources` that the matching `outputs` reproduce.

    Numbers are the cheapest piece of a source's content to check in a reconstruction: they survive translation
    unchanged. `None` when no source has a number.
    """
    found, total = 0, 0
    for source, output in zip(sources, outputs, strict=True):
        produced = set(NUMBER.findall(re.sub(r"(?<=\d),(?=\d)", "", output)))
        expected = NUMBER.findall(re.sub(r"(?<=\d),(?=\d)", "", source))
        total += len(expected)
        found += sum(number in produced for number in expected)
    return found / total if total else None


def alignment_scores(
    model: LayAlignForCausalLM,
    processor: LayAlignProcessor,
    sources: list[str],
    targets: list[str],
    num_generations: int,
    max_new_tokens: int = 64,
) -> dict[str, float | None]:
    """How much of each source's content reaches the LLM, on held-out stage-1 pairs (source in L, English target).

    Returns `loss` (per English target token, real source), `shuffled_loss` (the same targets read with the next
    example's source: what a model reaches without using the source's content), `gap` (`shuffled_loss - loss`,
    positive when the content is used), `chrf` of greedy reconstructions of the first `num_generations` targets, and
    `number_recall` of those reconstructions. Needs `sacrebleu` (the `eval` extra).
    """
    import sacrebleu

    if len(sources) < 2:
        raise ValueError(f"`sources` must hold at least two pairs to shuffle, got {len(sources)}.")
    loss = layalign_target_loss(model, processor, sources, targets)
    shuffled_loss = layalign_target_loss(model, processor, sources[1:] + sources[:1], targets)
    reconstructions = layalign_generate(model, processor, sources[:num_generations], max_new_tokens=max_new_tokens)
    references = targets[:num_generations]
    return {
        "loss": loss,
        "shuffled_loss": shuffled_loss,
        "gap": shuffled_loss - loss,
        "chrf": sacrebleu.corpus_chrf([line.split("\n")[0] for line in reconstructions], [references]).score,
        "number_recall": number_recall(sources[:num_generations], reconstructions),
        "distinct_reconstructions": len(set(reconstructions)) / max(1, len(reconstructions)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Benchmarks in the paper's layout
# ---------------------------------------------------------------------------------------------------------------------

MSVAMP_FILES = {
    "bn": "Bengali", "de": "German", "en": "English", "es": "Spanish", "fr": "French",
    "ja": "Japanese", "ru": "Russian", "sw": "Swahili", "th": "Thai", "zh": "Chinese",
}  # fmt: skip
CHOICE_LETTERS = "ABCDEFGH"


def is_correct_choice(prediction: str, gold: str) -> bool:
    """X-CSQA scoring: the answer letter the output starts with (after stripping) against the gold letter."""
    match = re.match(r"\s*\(?([A-H])\b", prediction)
    return match is not None and match.group(1) == gold.strip()


def is_correct_label(prediction: str, gold: str) -> bool:
    """XNLI scoring: the output's first word (case and punctuation ignored) against the gold label."""
    words = re.findall(r"[A-Za-z]+|\d+", prediction)
    return bool(words) and words[0].lower() == str(gold).strip().lower()


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
        default_max_new_tokens: enough for the expected answer (a chain of thought, or one letter or word).
    """

    name: str
    languages: tuple[str, ...]
    low_resource: tuple[str, ...]
    load: Callable
    prompt_template: str
    is_correct: Callable[[str, str], bool]
    default_max_new_tokens: int


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
        load_mgsm_benchmark, MATH_PROMPT, is_correct_number, 512,
    ),
    "msvamp": Benchmark(
        "MSVAMP", ("bn", "th", "sw", "ja", "zh", "de", "fr", "ru", "es", "en"), ("bn", "th", "sw"),
        load_msvamp, MATH_PROMPT, is_correct_number, 512,
    ),
    "xcsqa": Benchmark(
        "X-CSQA", ("sw", "ur", "hi", "ar", "vi", "ja", "pl", "zh", "nl", "ru", "it", "de", "pt", "fr", "es", "en"),
        ("sw", "ur", "hi"), load_xcsqa, "{query}\nAnswer:", is_correct_choice, 8,
    ),
    "xnli": Benchmark(
        "XNLI", ("sw", "ur", "hi", "th", "ar", "tr", "el", "vi", "zh", "ru", "bg", "de", "fr", "es", "en"),
        ("sw", "ur", "hi"), load_xnli, "{query}\nLabel:", is_correct_label, 8,
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
    """Per-example records and per-language accuracy (%) with counts."""
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
    per_language = {}
    for language in dict.fromkeys(example["language"] for example in records):
        hits = [record["correct"] for record in records if record["language"] == language]
        per_language[language] = {"accuracy": 100 * sum(hits) / len(hits), "n": len(hits)}
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
