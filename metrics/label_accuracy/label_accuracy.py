"""Label accuracy: a local `evaluate` metric, read offline with `evaluate.load("metrics/label_accuracy")`."""

from modeling_layalign.evaluation import accuracy_metric
from modeling_layalign.evaluation.scoring import is_correct_label


class LabelAccuracy(accuracy_metric.AccuracyMetric):
    is_correct = staticmethod(is_correct_label)
    rule = "XNLI scoring: each output's first word, case and punctuation ignored, against the gold label."
    usage = """
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
