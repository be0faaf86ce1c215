"""Last-number accuracy: a local `evaluate` metric, read offline with `evaluate.load("metrics/last_number_accuracy")`."""

from modeling_layalign.evaluation import accuracy_metric
from modeling_layalign.evaluation.scoring import is_correct_number


class LastNumberAccuracy(accuracy_metric.AccuracyMetric):
    is_correct = staticmethod(is_correct_number)
    rule = "Math scoring as in the paper (MGSM, MSVAMP): the last number of each output against the gold number."
    usage = """
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
