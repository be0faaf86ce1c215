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

from .data import MATH_PROMPT, check_languages, clean_gsm8k_answer, default_data_dir, load_mgsm
from .modeling_layalign import LayAlignForCausalLM
from .processing_layalign import IGNORE_INDEX, LayAlignProcessor, pad_sequences


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"


def load_metric(name: str):
    """One of the repository's local `evaluate` metrics (`metrics/<name>/<name>.py`: `last_number_accuracy`,
    `choice_accuracy`, `label_accuracy`, `chrf`), read offline by `evaluate.load` (the `eval` extra)."""
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"No local metric {name!r} in {METRICS_DIR}; there are {sorted(p.name for p in METRICS_DIR.iterdir())}.")
    return evaluate.load(str(path))


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
    model: LayAlignForCausalLM,
    processor: LayAlignProcessor,
    sources: list[str],
    targets: list[str],
    batch_size: int = 8,
    prompts: list[str] | None = None,
) -> float:
    """Mean loss per target token of `targets` given `sources` and `prompts` (none by default: stage 1's task)."""
    total, count = 0.0, 0
    prompts = [""] * len(sources) if prompts is None else prompts
    for rows in _batches(list(zip(sources, targets, prompts, strict=True)), batch_size):
        sources_, targets_, prompts_ = (list(column) for column in zip(*rows))
        batch = processor(sources_, targets=targets_, prompts=prompts_)
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
# The answer ladder: does LayAlign let the LLM read a question in L as if it were English?
# ---------------------------------------------------------------------------------------------------------------------

LADDER_LANGUAGES = ("sw", "bn", "th", "te", "ja", "zh", "ru", "de", "fr", "es")


def load_mgsm_with_answers(languages, *, limit: int | None = None, data_dir=None) -> Dataset:
    """MGSM's questions with the English chain of thought of the GSM8K test problem each one translates.

    MGSM line i is GSM8K test line i in every language, and no training split holds these problems. Columns:
    `language`, `source` (the question in L), `english` (the same question in English), `target` (GSM8K's chain of
    thought, cleaned as the stage-2 training answers are), `line`.
    """
    root = Path(data_dir or default_data_dir())
    english = load_mgsm(["en"], limit=limit, data_dir=root)["source"]
    gsm8k = load_dataset("json", data_files=str(root / "gsm8k" / "test.jsonl"), split="train").select(range(len(english)))
    if [row["question"].strip() for row in gsm8k] != [question.strip() for question in english]:
        raise ValueError(f"{root / 'gsm8k' / 'test.jsonl'} does not start with MGSM's English questions.")
    targets = [clean_gsm8k_answer(answer) for answer in gsm8k["answer"]]
    parts = []
    for language in languages:
        questions = load_mgsm([language], limit=limit, data_dir=root)["source"]
        parts.append(
            Dataset.from_dict(
                {
                    "language": [language] * len(questions),
                    "source": questions,
                    "english": english,
                    "target": targets,
                    "line": list(range(len(questions))),
                }
            )
        )
    return concatenate_datasets(parts)


@dataclass(frozen=True)
class LadderRung:
    """Mean loss per answer token, for one language, of the four readings of the same questions.

    Attributes:
        english: (a) the LLM alone reading the English question in the prompt.
        llm: (b) the LLM alone reading the question in L in the prompt.
        layalign: (c) LayAlign with the question in L as its source and in the prompt (the paper's stage-2 input).
        shuffled: (d) the same with another question's source (the prompt keeps the real question).
    """

    english: float
    llm: float
    layalign: float | None = None
    shuffled: float | None = None

    @property
    def gap(self) -> float | None:
        """(d) - (c): positive when LayAlign uses the source's content."""
        return None if self.layalign is None else self.shuffled - self.layalign

    @property
    def share_closed(self) -> float | None:
        """(b - c) / (b - a): the share of the language gap that LayAlign closes (1.0: as if English)."""
        return None if self.layalign is None else (self.llm - self.layalign) / (self.llm - self.english)

    @property
    def share_closed_shuffled(self) -> float | None:
        """(b - d) / (b - a): the share a source-blind model reaches (answer format learnt in stage 2, not content)."""
        return None if self.shuffled is None else (self.llm - self.shuffled) / (self.llm - self.english)

    def to_dict(self) -> dict[str, float | None]:
        names = ("english", "llm", "layalign", "shuffled", "gap", "share_closed", "share_closed_shuffled")
        return {name: getattr(self, name) for name in names}


def llm_rungs(
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Dataset,
    prompt_template: str = MATH_PROMPT,
    batch_size: int = 8,
) -> dict[str, tuple[float, float]]:
    """Per language of `examples` (from [`load_mgsm_with_answers`]): the LLM alone's answer loss with the English
    question (a) and with the question in L (b)."""
    rungs = {}
    for language in dict.fromkeys(examples["language"]):
        rows = examples.filter(lambda row: row["language"] == language)
        losses = [
            llm_target_loss(llm, tokenizer, [prompt_template.format(query=q) for q in rows[column]], rows["target"], batch_size)
            for column in ("english", "source")
        ]
        rungs[language] = (losses[0], losses[1])
    return rungs


def answer_ladder(
    model: LayAlignForCausalLM,
    processor: LayAlignProcessor,
    examples: Dataset,
    llm_losses: dict[str, tuple[float, float]] | None = None,
    prompt_template: str = MATH_PROMPT,
    batch_size: int = 8,
) -> dict[str, LadderRung]:
    """The answer ladder per language of `examples` (from [`load_mgsm_with_answers`], at least two per language).

    `llm_losses` ((a), (b) per language, from [`llm_rungs`]) are computed from `model.llm` when not given; they do not
    depend on the LayAlign modules, so one computation serves every checkpoint over the same LLM. The answers are
    never cut: `processor.max_length` must hold the longest prompt and answer.
    """
    if llm_losses is None:
        llm_losses = llm_rungs(model.llm, processor.tokenizer, examples, prompt_template, batch_size)
    ladder = {}
    for language in dict.fromkeys(examples["language"]):
        rows = examples.filter(lambda row: row["language"] == language)
        if len(rows) < 2:
            raise ValueError(f"The ladder shuffles sources within a language; {language!r} has {len(rows)} question.")
        sources, targets = rows["source"], rows["target"]
        prompts = [prompt_template.format(query=question) for question in sources]
        real = layalign_target_loss(model, processor, sources, targets, batch_size, prompts)
        shuffled = layalign_target_loss(model, processor, sources[1:] + sources[:1], targets, batch_size, prompts)
        ladder[language] = LadderRung(*llm_losses[language], layalign=real, shuffled=shuffled)
    return ladder


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
