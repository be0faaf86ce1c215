"""Scoring LayAlign against its LLM alone: answer scoring, per-token loss, batched generation, alignment measures.

The answer ladder of stage 2 is in `ladder.py`, the paper's benchmarks in `paper_benchmarks.py`.
"""

import re
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.logging import tqdm

from ..modeling_layalign import LayAlignForCausalLM
from ..processing_layalign import IGNORE_INDEX, LayAlignProcessor, pad_sequences


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
METRICS_DIR = Path(__file__).resolve().parents[2] / "metrics"


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


def is_correct_choice(prediction: str, gold: str) -> bool:
    """X-CSQA scoring: the answer letter the output starts with (after stripping) against the gold letter."""
    match = re.match(r"\s*\(?([A-H])\b", prediction)
    return match is not None and match.group(1) == gold.strip()


def is_correct_label(prediction: str, gold: str) -> bool:
    """XNLI scoring: the output's first word (case and punctuation ignored) against the gold label."""
    words = re.findall(r"[A-Za-z]+|\d+", prediction)
    return bool(words) and words[0].lower() == str(gold).strip().lower()


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
