"""chrF (sacrebleu's corpus chrF, one reference per prediction): a local `evaluate` metric, read offline with
`evaluate.load("metrics/chrf")`; the demo and the study score reconstructions with it."""

import datasets
import evaluate
import sacrebleu

from modeling_layalign.evaluation import accuracy_metric


_DESCRIPTION = "Character n-gram F-score (Popovic, 2015) of the predictions against one reference each, as sacrebleu computes it."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's outputs.
    references (`list[str]`): one reference per prediction.
Returns:
    score (`float`): corpus chrF, in [0, 100].
Examples:
    >>> metric = evaluate.load("metrics/chrf")
    >>> metric.compute(predictions=["Janet's ducks lay 16 eggs"], references=["Janet's ducks lay 16 eggs"])
    {'score': 100.0}
"""


class Chrf(accuracy_metric.ScoringInputsCheck, evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        return {"score": sacrebleu.corpus_chrf(list(predictions), [list(references)]).score}
