"""The accuracy metrics of `metrics/`: one `evaluate.Metric` that scores each output with a benchmark's own rule.

Each metric script in `metrics/<name>/` subclasses [`AccuracyMetric`] and names its rule (`is_correct`) and its
descriptions; `evaluate.load("metrics/<name>")` reads the script offline. The scripts import this module, not the
class, because `evaluate` takes the first metric class it finds in a script's namespace as the script's metric.
"""

from collections.abc import Callable

import datasets
import evaluate


class AccuracyMetric(evaluate.Metric):
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
        return {"accuracy": sum(hits) / len(hits) if hits else 0.0}
