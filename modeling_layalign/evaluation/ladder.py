"""The answer ladder: how much of the language gap on MGSM a stage-2 model closes, against source-blind controls.

For held-out MGSM questions in a language L, the mean loss per token of GSM8K's English answer under five readings:
(a) the LLM alone with the English question, (b) the LLM alone with the question in L, (c) LayAlign with the question
in L, (d) LayAlign given another question's source, (e) the LLM alone given another English question. (e) - (a) is
what the question's content is worth to the LLM reading English; (d) - (c) what the source's content is worth through
LayAlign; their ratio is the content share. `docs/learning.md` reports it for the shipped checkpoints.
"""

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..modeling_layalign import LayAlignForCausalLM
from ..processing_layalign import LayAlignProcessor
from ..training.data import MATH_PROMPT, clean_gsm8k_answer, default_data_dir, load_mgsm
from .scoring import layalign_target_loss, llm_target_loss


LADDER_LANGUAGES = ("sw", "bn", "th", "te", "ja", "zh", "ru", "de", "fr", "es")


def load_mgsm_with_answers(languages, *, limit: int | None = None, first: int = 0, data_dir=None) -> Dataset:
    """MGSM's questions with the English chain of thought of the GSM8K test problem each one translates.

    MGSM line i is GSM8K test line i in every language, and no training split holds these problems. `limit` questions
    per language from line `first` on (a later block is held out from whatever chose a checkpoint on the first ones).
    Columns: `language`, `source` (the question in L), `english` (the same question in English), `target` (GSM8K's
    chain of thought, cleaned as the stage-2 training answers are), `line`.
    """
    if first < 0:
        raise ValueError(f"`first` is the first MGSM line to read, 0 or more; got {first}.")
    root = Path(data_dir or default_data_dir())
    end = None if limit is None else first + limit
    english = load_mgsm(["en"], limit=end, data_dir=root)["source"][first:]
    if not english:
        raise ValueError(f"MGSM has no question from line {first} on.")
    lines = range(first, first + len(english))
    gsm8k = load_dataset("json", data_files=str(root / "gsm8k" / "test.jsonl"), split="train").select(lines)
    if [row["question"].strip() for row in gsm8k] != [question.strip() for question in english]:
        raise ValueError(f"{root / 'gsm8k' / 'test.jsonl'} does not follow MGSM's English questions line by line.")
    targets = [clean_gsm8k_answer(answer) for answer in gsm8k["answer"]]
    parts = []
    for language in languages:
        questions = load_mgsm([language], limit=end, data_dir=root)["source"][first:]
        parts.append(
            Dataset.from_dict(
                {
                    "language": [language] * len(questions),
                    "source": questions,
                    "english": english,
                    "target": targets,
                    "line": list(lines),
                }
            )
        )
    return concatenate_datasets(parts)


@dataclass(frozen=True)
class LadderRung:
    """Mean loss per answer token, for one language, of the five readings of the same questions.

    Attributes:
        english: (a) the LLM alone reading the English question in the prompt.
        llm: (b) the LLM alone reading the question in L in the prompt.
        layalign: (c) LayAlign with the question in L as its source and in the prompt (the paper's stage-2 input).
        shuffled: (d) the same with another question's source (the prompt keeps the real question).
        english_shuffled: (e) the LLM alone reading another English question: the answer's loss without the content.
    """

    english: float
    llm: float
    layalign: float | None = None
    shuffled: float | None = None
    english_shuffled: float | None = None

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

    @property
    def content_share(self) -> float | None:
        """(d - c) / (e - a): what the source's content is worth through LayAlign, as a share of what the English
        question's content is worth to the LLM reading it (1.0: the source carries the question as English does)."""
        if self.layalign is None or self.english_shuffled is None:
            return None
        return self.gap / (self.english_shuffled - self.english)

    def to_dict(self) -> dict[str, float | None]:
        names = ("english", "llm", "layalign", "shuffled", "english_shuffled", "gap", "share_closed",
                 "share_closed_shuffled", "content_share")  # fmt: skip
        return {name: getattr(self, name) for name in names}


def llm_rungs(
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Dataset,
    prompt_template: str = MATH_PROMPT,
    batch_size: int = 8,
) -> dict[str, tuple[float, float, float]]:
    """Per language of `examples` (from [`load_mgsm_with_answers`]): the LLM alone's answer loss with the English
    question (a), with the question in L (b) and with another English question (e), shifted by one as the sources
    of (d) are."""
    rungs = {}
    for language in dict.fromkeys(examples["language"]):
        rows = _language_rows(examples, language)
        readings = (rows["english"], rows["source"], _shifted(rows["english"]))
        rungs[language] = tuple(
            llm_target_loss(llm, tokenizer, [prompt_template.format(query=q) for q in questions], rows["target"], batch_size)
            for questions in readings
        )
    return rungs


def _language_rows(examples: Dataset, language: str) -> Dataset:
    rows = examples.filter(lambda row: row["language"] == language)
    if len(rows) < 2:
        raise ValueError(f"The ladder shuffles questions within a language; {language!r} has {len(rows)} question.")
    return rows


def _shifted(questions: list[str]) -> list[str]:
    """Every question replaced by the next one (the last by the first): another question of the same language."""
    return questions[1:] + questions[:1]


def answer_ladder(
    model: LayAlignForCausalLM,
    processor: LayAlignProcessor,
    examples: Dataset,
    llm_losses: dict[str, tuple[float, float, float]] | None = None,
    prompt_template: str = MATH_PROMPT,
    batch_size: int = 8,
) -> dict[str, LadderRung]:
    """The answer ladder per language of `examples` (from [`load_mgsm_with_answers`], at least two per language).

    `llm_losses` ((a), (b), (e) per language, from [`llm_rungs`]) are computed from `model.llm` when not given; they do not
    depend on the LayAlign modules, so one computation serves every checkpoint over the same LLM. The answers are
    never cut: `processor.max_length` must hold the longest prompt and answer.
    """
    if llm_losses is None:
        llm_losses = llm_rungs(model.llm, processor.tokenizer, examples, prompt_template, batch_size)
    ladder = {}
    for language in dict.fromkeys(examples["language"]):
        rows = _language_rows(examples, language)
        sources, targets = rows["source"], rows["target"]
        prompts = [prompt_template.format(query=question) for question in sources]
        real = layalign_target_loss(model, processor, sources, targets, batch_size, prompts)
        shuffled = layalign_target_loss(model, processor, _shifted(sources), targets, batch_size, prompts)
        english, llm, english_shuffled = llm_losses[language]
        ladder[language] = LadderRung(english, llm, real, shuffled, english_shuffled)
    return ladder
