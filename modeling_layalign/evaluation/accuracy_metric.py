"""The accuracy metrics of `metrics/`: one `evaluate.Metric` that scores each output with a benchmark's own rule.

Each metric script in `metrics/<name>/` subclasses [`AccuracyMetric`] and names its rule (`is_correct`) and its
descriptions; `evaluate.load("metrics/<name>")` reads the script offline. The scripts import this module, not the
class, because `evaluate` takes the first metric class it finds in a script's namespace as the script's metric.
"""

from collections.abc import Callable

import datasets
import evaluate


def check_scoring_inputs(predictions, references) -> None:
    """Raises a `ValueError` naming the argument unless both are non-empty lists (or tuples) of one length: `evaluate`
    would score a plain string character by character, and an empty list has no score."""
    for name, value in (("predictions", predictions), ("references", references)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list of strings, one per example, got {type(value).__name__}: {value!r:.60}.")
        if not value:
            raise ValueError(f"`{name}` is empty: there is nothing to score.")
    if len(predictions) != len(references):
        raise ValueError(f"`predictions` holds {len(predictions)} outputs but `references` holds {len(references)}.")


class ScoringInputsCheck:
    """Mixed into a metric in front of `evaluate.Metric`: `compute` checks its inputs first (see
    [`check_scoring_inputs`])."""

    def compute(self, *, predictions=None, references=None, **kwargs):
        # (The docstring ends in a newline: `evaluate` appends the metric's `inputs_description` to it.)
        """Scores `predictions` against `references`, one reference per prediction, after checking them.
        """
        check_scoring_inputs(predictions, references)
        return super().compute(predictions=predictions, references=references, **kwargs)


class AccuracyMetric(ScoringInputsCheck, evaluate.Metric):
    """The share of outputs that `is_correct(prediction, reference)` accepts, in [0, 1].

    Attributes:
        is_correct: the benchmark's scoring rule, `(output, gold) -> bool`, as a `staticmethod`.
        rule: what `is_correct` compares, one sentence (the metric's `description`).
        usage: the `Args` / `Returns` / `Examples` text of `compute` (the metric's `inputs_description`).
    """

    is_correct: Callable[[str, str], bool]
    rule: str
    usage: str

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.rule,
            citation="",
            inputs_description=self.usage,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        hits = [self.is_correct(prediction, reference) for prediction, reference in zip(predictions, references)]
        return {"accuracy": sum(hits) / len(hits)}
