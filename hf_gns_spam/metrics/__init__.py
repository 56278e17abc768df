"""Evaluation metrics for the Trainer through Hugging Face ``evaluate``, offline too.

* :func:`load_metric` is ``evaluate.load(name)`` (the Hub's module, downloaded or from evaluate's cache) and, when
  that cannot be loaded (offline without a cached copy, or a library the Hub's module imports is missing), the
  module of the same name shipped in this folder. Shipped: ``accuracy`` (``accuracy.py``: the Hub's
  ``evaluate-metric/accuracy``, computed with numpy instead of scikit-learn).
* :func:`causal_lm_accuracy` gives the Trainer's ``compute_metrics`` and ``preprocess_logits_for_metrics`` for
  next-token accuracy, as transformers' ``run_clm.py`` computes it: the logits are reduced to their argmax on the
  device, batch by batch, and the prediction at position t is compared with the label at t + 1. Label tokens -100
  are left out (padding, and the EOS tokens that ``DataCollatorForLanguageModeling`` masks when the pad token is the
  EOS token; ``run_clm.py`` counts them, its blocks have none). The Trainer logs it as ``eval_accuracy``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SHIPPED_METRICS", "causal_lm_accuracy", "load_metric"]

logger = logging.getLogger(__name__)

_FOLDER = Path(__file__).resolve().parent
SHIPPED_METRICS = ("accuracy",)
IGNORE_INDEX = -100  # label of tokens without a loss term (transformers' convention)


def load_metric(name: str, **load_kwargs: Any):
    """``evaluate.load(name, **load_kwargs)``, or this package's module ``name`` when the Hub's cannot be loaded.

    Raises what ``evaluate.load`` raised when there is no shipped module of that name (:data:`SHIPPED_METRICS`).
    """
    import evaluate

    try:
        return evaluate.load(name, **load_kwargs)
    except (FileNotFoundError, ConnectionError, ImportError) as error:
        if name not in SHIPPED_METRICS:
            raise
        logger.info("evaluate cannot load %r (%s); using hf_gns_spam's module %s", name, error, _FOLDER / name)
        return evaluate.load(str(_FOLDER / f"{name}.py"), **load_kwargs)


def _argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: the predicted token at each position [batch, length] (the Trainer then
    gathers token ids instead of [batch, length, vocabulary] logits)."""
    if isinstance(logits, tuple):  # (logits, past_key_values, ...)
        logits = logits[0]
    return logits.argmax(dim=-1)


def causal_lm_accuracy(metric=None) -> tuple[Callable[[Any], dict[str, float]], Callable]:
    """``(compute_metrics, preprocess_logits_for_metrics)`` for ``Trainer(...)``: next-token accuracy.

    Args:
        metric: an ``evaluate`` accuracy module; default ``load_metric("accuracy", keep_in_memory=True)`` (in
            memory: processes that compute it at once, as under torchrun, share no cache file).
    """
    metric = load_metric("accuracy", keep_in_memory=True) if metric is None else metric

    def compute_metrics(prediction) -> dict[str, float]:
        """``prediction``: the Trainer's ``EvalPrediction`` of argmax token ids and labels, [examples, length]."""
        predictions = np.asarray(prediction.predictions)[:, :-1].reshape(-1)
        labels = np.asarray(prediction.label_ids)[:, 1:].reshape(-1)
        scored = labels != IGNORE_INDEX
        return metric.compute(predictions=predictions[scored], references=labels[scored])

    return compute_metrics, _argmax_logits
