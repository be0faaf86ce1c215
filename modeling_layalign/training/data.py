"""Training and evaluation data for LayAlign, loaded with `datasets`, and the collator that batches it.

The shipped layout (`data/` in the repository; see its README) follows the reference code's files:

- stage 1 pairs: `mgsm8kinstruct_questions/<L>-en/train.<L>` and `train.en`, line-aligned;
- stage 2 math: `mgsm8kinstruct_questions/math_train_x_en.jsonl` (`lang_code`, `query`, `response`, `line`) and the
  English `gsm8k/train_first2000.jsonl` (`question`, `answer`);
- MGSM: `mgsm/mgsm_<L>.tsv` (`question<TAB>answer`, no header).

A held-out block of line numbers (the same questions in every language) is kept out of both training stages so
that evaluation reads questions no stage has seen in any language.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_dataset
from transformers import BatchFeature

from ..processing_layalign import LayAlignProcessor


LANGUAGE_NAMES = {
    "bn": "Bengali",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "ja": "Japanese",
    "ru": "Russian",
    "sw": "Swahili",
    "te": "Telugu",
    "th": "Thai",
    "zh": "Chinese",
}
PAIR_LANGUAGES = ("de", "es", "fr", "ja", "ru", "sw", "zh")
MATH_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{query}\n\n### Response: Let's think step by step."
)
TRANSLATION_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n### Instruction:\nTranslate the following sentences from "
    "{language} to English.\n### Input:\n{sentence}\n### Response:"
)
PAIRS_PER_LANGUAGE = 850


def default_data_dir() -> Path:
    """`$LAYALIGN_DATA`, else the `data/` folder shipped next to this package."""
    return Path(os.environ.get("LAYALIGN_DATA", Path(__file__).resolve().parents[2] / "data"))


def held_out_lines(count: int) -> range:
    """Line numbers of the last `count` question pairs, kept out of training."""
    if not 0 <= count < PAIRS_PER_LANGUAGE:
        raise ValueError(f"`count` must be in 0..{PAIRS_PER_LANGUAGE - 1}, got {count}.")
    return range(PAIRS_PER_LANGUAGE - count, PAIRS_PER_LANGUAGE)


def check_languages(languages, available, dataset: str) -> list[str]:
    """`languages` as a list, or a `ValueError` naming those that `dataset` does not have."""
    unknown = sorted(set(languages) - set(available))
    if unknown:
        raise ValueError(f"{dataset} has no languages {unknown}; it has {sorted(available)}.")
    return list(languages)


def load_translation_pairs(
    languages=PAIR_LANGUAGES, *, lines: range | None = None, exclude_lines: range | None = None, data_dir=None
) -> Dataset:
    """Stage-1 pairs: columns `source` (question in L), `target` (its English original), `language`, `line`.

    Args:
        lines: keep only these line numbers (e.g. `held_out_lines(50)` for evaluation).
        exclude_lines: drop these line numbers (the held-out block, for training).
    """
    root = Path(data_dir or default_data_dir()) / "mgsm8kinstruct_questions"
    parts = []
    for language in check_languages(languages, PAIR_LANGUAGES, "The translation-pair data"):
        folder = root / f"{language}-en"
        sources = load_dataset("text", data_files=str(folder / f"train.{language}"), split="train")["text"]
        targets = load_dataset("text", data_files=str(folder / "train.en"), split="train")["text"]
        if len(sources) != len(targets):
            raise ValueError(f"{folder} is not line-aligned: {len(sources)} vs {len(targets)} lines.")
        parts.append(
            Dataset.from_dict(
                {
                    "source": sources,
                    "target": targets,
                    "language": [language] * len(sources),
                    "line": list(range(len(sources))),
                }
            )
        )
    return _select_lines(concatenate_datasets(parts), lines, exclude_lines)


def load_english_sentences(*, exclude_lines: range | None = None, data_dir=None) -> list[str]:
    """English questions for the input mapping's warm start: the English sides of the stage-1 pairs, then GSM8K's.

    `exclude_lines` (the held-out block) drops those pairs' English sides and the GSM8K questions equal to them, so
    that no held-out question is read. Distinct sentences, in a fixed order.
    """
    root = Path(data_dir or default_data_dir())
    english = load_dataset("text", data_files=str(root / "mgsm8kinstruct_questions" / "de-en" / "train.en"), split="train")
    held_out = set(english.select(exclude_lines or range(0))["text"])
    kept = [line for index, line in enumerate(english["text"]) if index not in (exclude_lines or ())]
    gsm8k = load_dataset("json", data_files=str(root / "gsm8k" / "train_first2000.jsonl"), split="train")["question"]
    kept += [question for question in gsm8k if question not in held_out]
    return list(dict.fromkeys(sentence.strip() for sentence in kept if sentence.strip()))


def clean_gsm8k_answer(answer: str) -> str:
    """GSM8K's chain of thought without calculator notes, ending "The answer is: N" as MetaMath's answers do."""
    answer = re.sub(r"<<[^>]*>>", "", answer)
    reasoning, separator, final = answer.rpartition("####")
    return f"{reasoning.strip()}\nThe answer is: {final.strip()}" if separator else answer.strip()


def load_math_instructions(
    languages=PAIR_LANGUAGES, *, include_english: bool = True, exclude_lines: range | None = None, data_dir=None
) -> Dataset:
    """Stage-2 math data: columns `source` (query in L), `target` (English chain of thought), `language`, `line`.

    `exclude_lines` drops the same questions from every language, English included.
    """
    root = Path(data_dir or default_data_dir())
    languages = check_languages(languages, PAIR_LANGUAGES, "The math-instruction data")
    rows = load_dataset("json", data_files=str(root / "mgsm8kinstruct_questions" / "math_train_x_en.jsonl"), split="train")
    rows = rows.filter(lambda row: row["lang_code"] in languages)
    excluded_questions = set(rows.filter(lambda row: row["line"] in (exclude_lines or ()))["gsm8k_train_index"])
    multilingual = rows.map(
        lambda row: {"source": row["query"], "target": clean_gsm8k_answer(row["response"]), "language": row["lang_code"]},
        remove_columns=[name for name in rows.column_names if name != "line"],
    )
    multilingual = _select_lines(multilingual, None, exclude_lines)
    if not include_english:
        return multilingual
    english = load_dataset("json", data_files=str(root / "gsm8k" / "train_first2000.jsonl"), split="train")
    english = english.map(
        lambda row, index: {
            "source": row["question"],
            "target": clean_gsm8k_answer(row["answer"]),
            "language": "en",
            "line": index,
        },
        with_indices=True,
        remove_columns=english.column_names,
    )
    english = english.filter(lambda row: row["line"] not in excluded_questions)
    return concatenate_datasets([multilingual, english])


def load_mgsm(languages=tuple(LANGUAGE_NAMES), *, limit: int | None = None, data_dir=None) -> Dataset:
    """MGSM test problems: columns `source` (question in L), `answer` (gold number as text), `language`."""
    root = Path(data_dir or default_data_dir()) / "mgsm"
    parts = []
    for language in check_languages(languages, LANGUAGE_NAMES, "MGSM"):
        table = load_dataset(
            "csv",
            data_files=str(root / f"mgsm_{language}.tsv"),
            delimiter="\t",
            column_names=["source", "answer"],
            quoting=3,
            split="train",
        )
        if limit is not None:
            table = table.select(range(min(limit, len(table))))
        table = table.map(lambda row: {"answer": str(row["answer"]).replace(",", ""), "language": language})
        parts.append(table)
    return concatenate_datasets(parts)


class _DuplicateKeys(ValueError):
    pass


def _object_without_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """A `json.loads` hook: the object, unless a key appears twice (JSON keeps only the last, silently)."""
    keys = [key for key, _ in pairs]
    if duplicated := sorted({key for key in keys if keys.count(key) > 1}):
        raise _DuplicateKeys(", ".join(f"`{key}`" for key in duplicated))
    return dict(pairs)


def check_training_file(path: str | os.PathLike) -> None:
    """Raises a `ValueError` naming the file and the line when `path` is not JSON Lines of objects with string
    `source` and `target` fields (and optionally a string `prompt`): an empty file, bytes that are not UTF-8, a line
    that is not JSON, lacks a field, repeats a key or holds a lone surrogate escape (`"\\ud800"`, which no UTF-8 text
    holds)."""
    path = Path(path)
    expected = "one JSON object per line with string fields `source` and `target` (and optionally `prompt`)"
    examples = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}, line {number}: not UTF-8 text ({error}); save the file as UTF-8.") from error
            if not line:
                continue
            try:
                row = json.loads(line, object_pairs_hook=_object_without_duplicate_keys)
            except _DuplicateKeys as error:
                raise ValueError(f"{path}, line {number}: the key {error} appears twice; keep one.") from None
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error}); it must hold {expected}.") from error
            row = row if isinstance(row, dict) else {}
            missing = ", ".join(f"`{key}`" for key in ("source", "target") if not isinstance(row.get(key), str))
            if missing:
                raise ValueError(f"{path}, line {number}: no string field {missing}; it must hold {expected}.")
            if "prompt" in row and not isinstance(row["prompt"], str):
                raise ValueError(
                    f"{path}, line {number}: `prompt` must be a string, got {type(row['prompt']).__name__}; it must "
                    f"hold {expected}."
                )
            for key in ("source", "target", "prompt"):
                try:
                    row.get(key, "").encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(
                        f"{path}, line {number}: `{key}` holds a lone surrogate escape (such as \\ud800), which is no "
                        "text; fix or drop the line."
                    ) from None
            examples += 1
    if examples == 0:
        raise ValueError(f"{path} holds no training example; it must hold {expected}.")


def load_training_file(path: str | os.PathLike) -> Dataset:
    """A JSON Lines training file (`source`, `target`, optionally `prompt`), checked by [`check_training_file`] first."""
    check_training_file(path)
    return load_dataset("json", data_files=os.fspath(path), split="train")


def _select_lines(dataset: Dataset, lines: range | None, exclude_lines: range | None) -> Dataset:
    if lines is not None:
        dataset = dataset.filter(lambda row: row["line"] in lines)
    if exclude_lines is not None:
        dataset = dataset.filter(lambda row: row["line"] not in exclude_lines)
    return dataset


def tokenize_for_stage(dataset: Dataset, processor: LayAlignProcessor, stage: int) -> Dataset:
    """Token ids for `stage` 1 (source -> English target, no prompt) or 2 (source + prompt -> answer).

    Stage 2 prompts with `processor.prompt_template` (the paper's math prompt when the processor has none).
    """
    if stage not in (1, 2):
        raise ValueError(f"`stage` must be 1 or 2, got {stage!r}.")
    template = processor.prompt_template or MATH_PROMPT

    def encode(row):
        # An empty prompt (stage 1) keeps the processor from applying its template.
        prompt = row.get("prompt") or (template.format(query=row["source"]) if stage == 2 else "")
        return processor.encode_example(row["source"], row["target"], prompt)

    return dataset.map(encode, remove_columns=dataset.column_names)


@dataclass
class LayAlignDataCollator:
    """Pads examples from [`LayAlignProcessor.encode_example`] into a right-padded training batch."""

    processor: LayAlignProcessor

    def __call__(self, examples: list[dict[str, list[int]]]) -> BatchFeature:
        return self.processor.pad(examples, padding_side="right")
