"""The repository's local `evaluate` metrics (`metrics/`) load offline with `evaluate.load(path)` and score as the
scoring functions of `modeling_layalign.evaluation.scoring` do."""

import pytest
import sacrebleu

from modeling_layalign.evaluation.paper_benchmarks import BENCHMARKS
from modeling_layalign.evaluation.scoring import METRICS_DIR, load_metric


evaluate = pytest.importorskip("evaluate")


@pytest.mark.parametrize(
    "name,predictions,references,expected",
    [
        ("last_number_accuracy", ["so 1,000 - 3 = 997. The answer is: 997", "The answer is 7", "none"], ["997", "8", "1"], 1 / 3),
        ("choice_accuracy", ["B. a river", "(C)", " D"], ["B", "D", "D"], 2 / 3),
        ("label_accuracy", ["Entailment.", "neutral", "contradiction"], ["entailment", "contradiction", "contradiction"], 2 / 3),
    ],
)
def test_accuracy_metrics_load_offline_from_their_folder_and_score(name, predictions, references, expected):
    metric = evaluate.load(str(METRICS_DIR / name))
    assert metric.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(expected)


def test_chrf_metric_is_sacrebleus_corpus_chrf():
    predictions, references = ["Janet's ducks lay 16 eggs per day.", "She sells the rest"], ["Janet's ducks lay 16 eggs.", "She sells the remainder"]
    result = load_metric("chrf").compute(predictions=predictions, references=references)
    assert result["score"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    assert load_metric("chrf").compute(predictions=["same"], references=["same"])["score"] == 100.0


def test_every_benchmark_names_a_local_metric():
    assert {benchmark.metric for benchmark in BENCHMARKS.values()} <= {path.name for path in METRICS_DIR.iterdir()}
    with pytest.raises(ValueError, match="No local metric"):
        load_metric("bleu")


@pytest.mark.parametrize("name", ["last_number_accuracy", "choice_accuracy", "label_accuracy", "chrf"])
def test_inputs_that_cannot_be_scored_are_named(name):
    metric = load_metric(name)
    with pytest.raises(ValueError, match="`predictions` is empty: there is nothing to score"):
        metric.compute(predictions=[], references=[])
    # A plain string would be scored character by character.
    with pytest.raises(ValueError, match="`predictions` must be a list of strings, one per example, got str"):
        metric.compute(predictions="12", references=["13"])
    with pytest.raises(ValueError, match="`references` must be a list of strings"):
        metric.compute(predictions=["12"], references="13")
    with pytest.raises(ValueError, match="`predictions` holds 2 outputs but `references` holds 1"):
        metric.compute(predictions=["12", "13"], references=["13"])
