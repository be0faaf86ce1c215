"""Last-number accuracy: a local `evaluate` metric, read offline with `evaluate.load("metrics/last_number_accuracy")`."""

import datasets
import evaluate

from modeling_layalign.evaluation import is_correct_number


_DESCRIPTION = "Math scoring as in the paper (MGSM, MSVAMP): the last number of each output against the gold number."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's outputs.
    references (`list[str]`): the gold numbers, as text.
Returns:
    accuracy (`float`): the share of predictions scored correct, in [0, 1].
Examples:
    >>> metric = evaluate.load("metrics/last_number_accuracy")
    >>> metric.compute(predictions=["so 9 - 3 = 6. The answer is: 6", "The answer is 7"], references=["6", "8"])
    {'accuracy': 0.5}
"""


class LastNumberAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        hits = [is_correct_number(prediction, reference) for prediction, reference in zip(predictions, references)]
        return {"accuracy": sum(hits) / len(hits) if hits else 0.0}
