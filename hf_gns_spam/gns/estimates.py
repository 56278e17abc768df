"""Every gradient-noise-scale estimate ``GNSCallback`` keeps, updated from one optimizer step's sums at a time.

From a step's :class:`~hf_gns_spam.gns.step_sums.StepTotals` (weights α_b, Σ_b ‖G_b‖², ‖G‖²), each estimate is a
:class:`~hf_gns_spam.gns.estimator.GradientNoiseScale` fed with (small, big, B_eff) of
:class:`~hf_gns_spam.gns.estimator.StepWeights`:

* ``estimator``: over every patched norm, logged as ``gns``, ``gns_grad_sq``, ``gns_trace_sigma`` (and ``gns_tokens``
  = gns × label tokens per example); beside them ``nonfinite_grad_steps``, the optimizer steps so far whose
  gradient had a NaN or ±inf entry (said once in a warning at the first log record after one);
* ``group_estimators``: per norm group (``"block"``, ``"final"``, ``"other"``: :mod:`hf_gns_spam.gns.groups`), the
  same formulas on the group's share of the sums, with the same EMA and skips, logged as ``gns/<group>``,
  ``gns/<group>_grad_sq``, ``gns/<group>_trace_sigma`` for the groups the model has (a group whose norms had no
  gradient in a step skips it);
* ``total_estimator`` and ``total_no_embeddings_estimator`` (``validate_every=N``): the whole model's, from the
  per-example gradients of all trainable parameters recomputed every N-th step (EMA decay ``ema_decay``^N, the
  same horizon in optimizer steps), with and without the embeddings (the ``weight`` of every ``nn.Embedding`` and
  the LM head's parameters: :func:`~hf_gns_spam.gns.whole_model.embedding_parameters`), logged as ``gns_total``,
  ``gns_total_no_embeddings`` and their ``_grad_sq``/``_trace_sigma`` in the first log record at or after each
  validation step. Why both: the reference implementation (nanoGNS) leaves the tied embeddings out of its
  whole-model GNS, and in small language models the embeddings raise it by a factor of about 1.5–2 over most of a
  run (``benchmarks/gns_fidelity.py``).

A step is skipped by every estimate (no decision is made on it) when a micro-batch's weights could not be
identified, fewer than 2 examples were measured, no norm had a gradient, or B_eff ≤ 1.
"""

from __future__ import annotations

import collections
import math
from typing import Any

from hf_gns_spam.gns.arguments import NORM_GROUPS, NormGroup
from hf_gns_spam.gns.estimator import GradientNoiseScale, unbiased_estimates
from hf_gns_spam.gns.step_sums import StepTotals

__all__ = ["HISTORY_LENGTH", "METRIC_NAMES", "TOTAL_METRIC_NAMES", "NoiseScaleEstimates"]

HISTORY_LENGTH = 10_000
# the keys of GNSCallback.metrics(), in every log record with a loss
METRIC_NAMES = (
    "gns", "gns_tokens", "gns_grad_sq", "gns_trace_sigma", "nonfinite_grad_steps", "batch_size", "grad_accum_steps",
    "examples_seen",
)  # fmt: skip
# logged with validate_every, in the first record at or after each validation step
TOTAL_METRIC_NAMES = (
    "gns_total", "gns_total_grad_sq", "gns_total_trace_sigma",
    "gns_total_no_embeddings", "gns_total_no_embeddings_grad_sq", "gns_total_no_embeddings_trace_sigma",
)  # fmt: skip


class NoiseScaleEstimates:
    """The estimates (module docstring), the latest steps' inputs (``history``, ``total_history``, bounded) and the
    label tokens per example."""

    def __init__(self, ema_decay: float, validate_every: int | None) -> None:
        self.ema_decay = ema_decay
        self.estimator = GradientNoiseScale(ema_decay=ema_decay)
        self.group_estimators = {group: GradientNoiseScale(ema_decay=ema_decay) for group in NORM_GROUPS}
        self.groups_present: tuple[NormGroup, ...] = ()  # the groups of the patched norms, in NORM_GROUPS order
        # the whole model's: one update per validation step, the norms' horizon in optimizer steps
        self.total_estimator = GradientNoiseScale(ema_decay=ema_decay ** (validate_every or 1))
        self.total_no_embeddings_estimator = GradientNoiseScale(ema_decay=ema_decay ** (validate_every or 1))
        self.history: collections.deque[dict[str, float]] = collections.deque(maxlen=HISTORY_LENGTH)
        self.total_history: collections.deque[dict[str, float]] = collections.deque(maxlen=HISTORY_LENGTH)
        self.tokens_per_example = math.nan
        self.total_unlogged = False  # a validation step ran since the latest log record
        self.nonfinite_grad_steps = 0  # optimizer steps whose gradient had a NaN or ±inf entry, all processes
        self.nonfinite_reported = False  # the one warning about them was given

    def update(self, totals: StepTotals, step: int, validating: bool) -> None:
        """One optimizer step (``step``, counted from 1) into the norms' estimates, and on a validation step into
        the whole model's."""
        self.groups_present = totals.groups_present
        self.nonfinite_grad_steps += totals.nonfinite
        if totals.label_tokens > 0:
            self.tokens_per_example = totals.label_tokens / totals.examples
        weights = totals.weights
        effective_batch = weights.effective_batch
        if totals.unusable or totals.measured_examples < 2 or totals.big is None or not effective_batch > 1.0:
            self.estimator.skip()
            for group in self.groups_present:
                self.group_estimators[group].skip()
            small = math.nan
        else:
            small, big = weights.small_big(totals.sum_sq, totals.big)
            entry = {"small": small, "big": big, "effective_batch": effective_batch, "batch_size": totals.examples}
            self.estimator.update(small, big, effective_batch)
            for index, group in enumerate(NORM_GROUPS):  # the same formulas on the group's share of the sums
                if group not in self.groups_present:
                    continue
                if not totals.group_measured[index]:  # the group's norms are frozen
                    self.group_estimators[group].skip()
                    continue
                entry[f"small/{group}"], entry[f"big/{group}"] = weights.small_big(
                    totals.group_sum_sq[index], totals.group_big[index]
                )
                self.group_estimators[group].update(entry[f"small/{group}"], entry[f"big/{group}"], effective_batch)
            self.history.append(entry)
        if validating:
            self._update_total(step, totals, small)

    def _update_total(self, step: int, totals: StepTotals, norms_small: float) -> None:
        """One validation step into the whole model's estimators and ``total_history``."""
        self.total_unlogged = True
        weights = totals.weights
        effective_batch = weights.effective_batch
        if not totals.validated or not effective_batch > 1.0:
            self.total_estimator.skip()
            self.total_no_embeddings_estimator.skip()
            return
        small, big = weights.small_big(*totals.total)
        small_no_embeddings, big_no_embeddings = weights.small_big(*totals.no_embeddings)
        grad_sq, trace_sigma = unbiased_estimates(small, big, effective_batch)
        grad_sq_no_embeddings, trace_sigma_no_embeddings = unbiased_estimates(
            small_no_embeddings, big_no_embeddings, effective_batch
        )
        self.total_estimator.update(small, big, effective_batch)
        self.total_no_embeddings_estimator.update(small_no_embeddings, big_no_embeddings, effective_batch)
        smoothed = self.total_metrics()
        self.total_history.append(
            {
                "step": step,
                "small": small,
                "big": big,
                "effective_batch": effective_batch,
                "grad_sq": grad_sq,  # this step's unbiased estimates (before smoothing)
                "trace_sigma": trace_sigma,
                "small_no_embeddings": small_no_embeddings,
                "big_no_embeddings": big_no_embeddings,
                "grad_sq_no_embeddings": grad_sq_no_embeddings,
                "trace_sigma_no_embeddings": trace_sigma_no_embeddings,
                "gns_total": smoothed["gns_total"],  # the smoothed estimates after this step
                "gns_total_no_embeddings": smoothed["gns_total_no_embeddings"],
                "gns": self.metrics()["gns"],
                "norms_small": norms_small,  # the norms' small from their statistics ...
                "norms_small_recomputed": totals.norms_sq / weights.weight_sq_sum,  # ... and recomputed
            }
        )

    # ------------------------------------------------------------------------------------------ reporting
    def metrics(self) -> dict[str, float]:
        """The norms' smoothed estimates: ``gns`` (nan while the latest step gave none), ``gns_tokens``,
        ``gns_grad_sq``, ``gns_trace_sigma`` and each present group's."""
        gns = self.estimator.gns if self.estimator.is_current else math.nan
        return {
            "gns": gns,
            "gns_tokens": gns * self.tokens_per_example,
            "gns_grad_sq": self.estimator.grad_sq,
            "gns_trace_sigma": self.estimator.trace_sigma,
            "nonfinite_grad_steps": self.nonfinite_grad_steps,
            **self.group_metrics(),
        }

    def group_metrics(self) -> dict[str, float]:
        """For each norm group the model has: ``gns/<group>``, its smoothed GNS (nan while the latest step gave the
        group no estimate), and ``gns/<group>_grad_sq`` and ``gns/<group>_trace_sigma``, its smoothed |G|² and tr Σ
        (nan before its first estimate)."""
        metrics = {}
        for group in self.groups_present:
            estimator = self.group_estimators[group]
            metrics[f"gns/{group}"] = estimator.gns if estimator.is_current else math.nan
            metrics[f"gns/{group}_grad_sq"] = estimator.grad_sq
            metrics[f"gns/{group}_trace_sigma"] = estimator.trace_sigma
        return metrics

    def total_metrics(self) -> dict[str, float]:
        """The whole model's smoothed estimates (``validate_every``), with and without the embeddings; the GNS is
        nan before the first validation step and while the latest one gave no estimate."""
        metrics = {}
        for prefix, estimator in (
            ("gns_total", self.total_estimator),
            ("gns_total_no_embeddings", self.total_no_embeddings_estimator),
        ):
            metrics[prefix] = estimator.gns if estimator.is_current else math.nan
            metrics[f"{prefix}_grad_sq"] = estimator.grad_sq
            metrics[f"{prefix}_trace_sigma"] = estimator.trace_sigma
        return metrics

    def unlogged_total_metrics(self) -> dict[str, float]:
        """The whole model's metrics once after each validation step (for the first log record at or after it)."""
        if not self.total_unlogged:
            return {}
        self.total_unlogged = False
        return self.total_metrics()

    def nonfinite_report(self, step: int) -> str | None:
        """The one warning, at the first log record after a step whose gradient was not finite."""
        if self.nonfinite_reported or not self.nonfinite_grad_steps:
            return None
        self.nonfinite_reported = True
        return (
            f"GNSCallback: {self.nonfinite_grad_steps} optimizer step(s) up to step {step} had a gradient with NaN or "
            "±inf entries (counted in the logs as nonfinite_grad_steps; their GNS estimates were skipped). Stable-SPAM "
            "treats such entries as zero; other optimizers apply them. Look for the loss or the data that caused it."
        )

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "estimator_state": self.estimator.state_dict(),
            "tokens_per_example": self.tokens_per_example,
            "total_estimator_state": self.total_estimator.state_dict(),
            "total_no_embeddings_estimator_state": self.total_no_embeddings_estimator.state_dict(),
            "group_estimator_states": {g: e.state_dict() for g, e in self.group_estimators.items()},
            "groups_present": list(self.groups_present),
            "nonfinite_grad_steps": self.nonfinite_grad_steps,
        }

    def load_state_dict(self, attributes: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checkpoints from before the whole model's or the groups' estimates lack
        them: those start afresh)."""
        self.estimator = GradientNoiseScale(ema_decay=self.ema_decay, **attributes["estimator_state"])
        self.tokens_per_example = attributes["tokens_per_example"]
        for name in ("total_estimator", "total_no_embeddings_estimator"):
            if attributes.get(f"{name}_state") is not None:
                ema_decay = getattr(self, name).ema_decay
                setattr(self, name, GradientNoiseScale(ema_decay=ema_decay, **attributes[f"{name}_state"]))
        for group, saved in (attributes.get("group_estimator_states") or {}).items():
            self.group_estimators[group] = GradientNoiseScale(ema_decay=self.ema_decay, **saved)
        self.groups_present = tuple(attributes.get("groups_present", ()))
        self.nonfinite_grad_steps = attributes.get("nonfinite_grad_steps", 0)  # older checkpoints lack it
