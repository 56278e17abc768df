"""Accuracy, the share of predictions equal to their references, as a Hugging Face ``evaluate`` module.

This package's own copy of the Hub's ``evaluate-metric/accuracy`` (the same inputs, options and result, computed
with numpy instead of scikit-learn), for when that one cannot be loaded: offline without a cached copy, or without
scikit-learn, which it imports. ``evaluate.load`` copies this file into its module cache and imports it from there,
so it imports nothing from ``hf_gns_spam``. Load it with ``hf_gns_spam.metrics.load_metric("accuracy")`` (the Hub's
module when it loads, else this one) or ``evaluate.load(<path of this file>)``.

With w_i = ``sample_weight[i]`` (1 without) over the N prediction/reference pairs:

    accuracy = Σ_i w_i·[p_i = r_i] / Σ_i w_i       (normalize=True, the default)
    accuracy = Σ_i w_i·[p_i = r_i]                 (normalize=False: the weighted count of correct predictions)
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the total number of cases processed (hf_gns_spam's copy of
evaluate-metric/accuracy, for offline use):
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground truth labels, as many as predictions.
    normalize (`bool`): True (default) returns the proportion of correct predictions, False their number (or their
        summed sample weights).
    sample_weight (`list` of `float`): a weight for each pair; defaults to None (all 1).
Returns:
    accuracy (`float`): in [0, 1] with normalize=True.
Examples:
    >>> accuracy = evaluate.load("hf_gns_spam/metrics/accuracy.py")
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """The Hub's ``accuracy`` metric (default configuration), without scikit-learn."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/accuracy"],
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(correct.shape) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight has {weights.shape[0]} entries for {correct.shape[0]} predictions")
        total = float(np.dot(correct, weights))
        return {"accuracy": total / float(weights.sum()) if normalize else total}
