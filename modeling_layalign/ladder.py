"""The answer ladder: how much of the language gap on MGSM a stage-2 model closes, against source-blind controls.

For held-out MGSM questions in a language L, the mean loss per token of GSM8K's English answer under four readings:
(a) the LLM alone with the English question, (b) the LLM alone with the question in L, (c) LayAlign with the question
in L, (d) LayAlign given another question's source. `docs/learning.md` reports it for the shipped checkpoints.
"""

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import MATH_PROMPT, clean_gsm8k_answer, default_data_dir, load_mgsm
from .evaluation import layalign_target_loss, llm_target_loss
from .modeling_layalign import LayAlignForCausalLM
from .processing_layalign import LayAlignProcessor


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
