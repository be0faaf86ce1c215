"""Label accuracy: a local `evaluate` metric, read offline with `evaluate.load("metrics/label_accuracy")`."""

import datasets
import evaluate

from modeling_layalign.evaluation import is_correct_label


_DESCRIPTION = "XNLI scoring: each output's first word, case and punctuation ignored, against the gold label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's outputs.
    references (`list[str]`): the gold label words.
Returns:
    accuracy (`float`): the share of predictions scored correct, in [0, 1].
Examples:
    >>> metric = evaluate.load("metrics/label_accuracy")
    >>> metric.compute(predictions=["Entailment.", "neutral"], references=["entailment", "contradiction"])
    {'accuracy': 0.5}
"""


class LabelAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        hits = [is_correct_label(prediction, reference) for prediction, reference in zip(predictions, references)]
        return {"accuracy": sum(hits) / len(hits) if hits else 0.0}
