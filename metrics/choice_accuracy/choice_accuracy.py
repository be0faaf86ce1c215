"""Choice accuracy: a local `evaluate` metric, read offline with `evaluate.load("metrics/choice_accuracy")`."""

from modeling_layalign.evaluation import accuracy_metric
from modeling_layalign.evaluation.scoring import is_correct_choice


class ChoiceAccuracy(accuracy_metric.AccuracyMetric):
    is_correct = staticmethod(is_correct_choice)
    rule = "X-CSQA scoring: the answer letter each output starts with against the gold letter."
    usage = """
Args:
    predictions (`list[str]`): the model's outputs.
    references (`list[str]`): the gold letters.
Returns:
    accuracy (`float`): the share of predictions scored correct, in [0, 1].
Examples:
    >>> metric = evaluate.load("metrics/choice_accuracy")
    >>> metric.compute(predictions=["B. a river", "(C)"], references=["B", "D"])
    {'accuracy': 0.5}
"""
