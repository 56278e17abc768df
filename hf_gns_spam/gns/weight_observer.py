"""Each example's weight in the loss of every training micro-batch, as :class:`~hf_gns_spam.GNSCallback` needs it.

The estimator's inputs need, for every example b of an optimizer step, its weight a_b in the back-propagated loss
L = Σ_b a_b·ℓ_b (:mod:`hf_gns_spam.gns.estimator`). :class:`ExampleWeightObserver` follows the Trainer's
micro-batches and gives them:

* on a micro-batch where the weighting is identified or verified (:meth:`ExampleWeightObserver.due`), the
  weightings whose value matches the loss (:func:`~hf_gns_spam.gns.example_weights.identify_loss_weighting`) are
  candidates, and the gradient that reaches the logits in that micro-batch's backward picks the one that holds
  (:mod:`hf_gns_spam.gns.logit_gradients`); its weights count once that backward has run (:meth:`settle`). Every
  micro-batch is checked until one that tells the weightings apart confirms it (at most
  :data:`UNINFORMATIVE_CHECKS` that cannot), then the first of a step every ``verify_interval`` steps;
* on the others, the confirmed weighting's weights follow from the labels alone
  (:func:`~hf_gns_spam.gns.example_weights.example_weights`);
* for TRL's DPO and reward trainers (``paired``), an example is a pair of rows, weighing 1/P in a micro-batch of P
  pairs (:mod:`hf_gns_spam.integrations.trl_pairs`).

Weights are in units of the loss passed to the backward: the loss ``compute_loss`` returned is rescaled by the
Trainer before ``accelerator.backward`` (the factor is observed, loss passed / loss computed, times the gradient
scaler's scale), and the observed logit gradients include accelerate's own factor
(:func:`~hf_gns_spam.integrations.trainer_loop.backward_factor`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from hf_gns_spam.errors import AccumulationError, ExampleWeightError
from hf_gns_spam.gns.example_weights import LossWeighting, example_weights, identify_loss_weighting, token_counts
from hf_gns_spam.gns.logit_gradients import LogitGradientProbe
from hf_gns_spam.integrations.trainer_loop import backward_factor, label_smoothing
from hf_gns_spam.sequences import sequence_ids

__all__ = ["PAIR_MEAN", "UNINFORMATIVE_CHECKS", "ExampleWeightObserver", "ObservedMicroBatch"]

logger = logging.getLogger("hf_gns_spam.gns.callback")  # its messages are the callback's
# the weighting of TRL's DPO and reward losses: a mean over the micro-batch's examples, which are pairs of rows
PAIR_MEAN = LossWeighting("examples_over_micro", 1.0, shifted=False)
# micro-batches of equal label-token counts checked before the weighting is taken as confirmed without one that
# tells a token mean from a mean of per-example means (fixed-length blocks never have one)
UNINFORMATIVE_CHECKS = 8


@dataclasses.dataclass(frozen=True)
class ObservedMicroBatch:
    """What one training micro-batch holds: its examples (rows, or sequences of a packed batch, or pairs), and where
    they are known, its labels, packed sequences and label tokens per example; ``unusable`` if its loss is not
    finite."""

    examples: int
    labels: torch.Tensor | None = None
    sequences: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    unusable: bool = False


class ExampleWeightObserver:
    """The examples' weights of every training micro-batch (module docstring), for one callback."""

    def __init__(self, verify_interval: int) -> None:
        self.verify_interval = verify_interval
        self.paired = False  # the Trainer's examples are pairs of rows (TRL's DPO and reward trainers)
        self.weighting: LossWeighting | None = None
        self.steps_since_verified = 0  # optimizer steps since the weighting was last checked
        self._confirmed = False  # checked on a micro-batch that tells the weightings apart
        self._uninformative_checks = 0
        self._outputs_hook: torch.utils.hooks.RemovableHandle | None = None  # while compute_loss runs
        self._captured: Any = None  # the outputs of its forward with gradients (_capture_outputs)
        self.reset_step()

    def reset_step(self) -> None:
        # the candidates' weights of the latest micro-batch and the loss compute_loss returned, until its backward
        self._pending: tuple[dict[LossWeighting, torch.Tensor], torch.Tensor] | None = None
        self._probe: LogitGradientProbe | None = None  # watches this micro-batch's logits in its backward
        # ... with the candidates' weights and accelerate's factor, to check once its backward has run
        self._probed: tuple[LogitGradientProbe, dict[LossWeighting, torch.Tensor], float] | None = None

    def due(self, micro_batch: int) -> bool:
        """Whether the weighting is identified (or verified) on this step's ``micro_batch``-th micro-batch (from 1):
        until it is confirmed, then on a step's first every ``verify_interval`` steps."""
        if self.weighting is None or not self._confirmed:
            return True
        return micro_batch == 1 and self.steps_since_verified >= self.verify_interval

    def wants_outputs(self, model: nn.Module, micro_batch: int) -> bool:
        """Before ``compute_loss`` of the ``micro_batch``-th micro-batch: whether it must return the outputs, and if
        so, a hook on ``model`` keeps those of its forward with gradients, only until :meth:`observe_loss` (a copied
        or pickled model never carries it). Call :meth:`settle` first."""
        self.stop_capturing()
        if self.paired or not self.due(micro_batch):  # the pairs' weights are the mean's: nothing to observe
            return False
        self._outputs_hook = model.register_forward_hook(self._capture_outputs)
        return True

    def stop_capturing(self) -> Any:
        """Remove the outputs hook and hand over what it captured."""
        if self._outputs_hook is not None:
            self._outputs_hook.remove()
            self._outputs_hook = None
        captured, self._captured = self._captured, None
        return captured

    def _capture_outputs(self, module: nn.Module, args: tuple, outputs: Any) -> None:
        """Keep the outputs of the micro-batch's forward with gradients, whose logits (or label log-probabilities)
        the backward passes through: compute_loss may return others (TRL's SFTTrainer returns those of a second
        forward without gradients, its training forward having a fused LM head)."""
        if torch.is_grad_enabled():
            self._captured = outputs

    def observe_loss(
        self,
        trainer: Trainer,
        inputs: dict,
        num_items_in_batch: Any,
        loss: torch.Tensor,
        outputs: Any,
        micro_batch: int,
    ) -> ObservedMicroBatch:
        """After ``compute_loss`` of the ``micro_batch``-th micro-batch: its examples, and its weights pending until
        its backward (call :meth:`settle` first)."""
        trained_outputs = self.stop_capturing()
        if self.paired:
            return self._observe_pairs(inputs, loss)
        sequences = sequence_ids(inputs)  # packed / padding-free batches: an example is a sequence
        labels_are_shifted = isinstance(inputs.get("shift_labels"), torch.Tensor)
        labels = inputs["shift_labels"] if labels_are_shifted else inputs.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise ExampleWeightError(
                "GNSCallback needs the labels of every training micro-batch (the examples' weights in the loss "
                f"come from them); this one has none (inputs: {sorted(inputs)})"
            )
        examples = labels.shape[0] if sequences is None else int(sequences.max()) + 1
        due, unusable = self.due(micro_batch), False
        if due and not torch.isfinite(loss.detach()).all():  # nothing to identify on (fp16 overflow, a dead run)
            unusable = True
            if self.weighting is None:
                return ObservedMicroBatch(examples, unusable=True)
            due = False
        weighting, candidates = self.weighting, None
        if due:
            smoothing = label_smoothing(trainer)
            matching = identify_loss_weighting(
                loss, outputs, labels, labels_are_shifted, num_items_in_batch, trainer.accelerator.num_processes,
                smoothing, sequences,
            )  # fmt: skip
            if self.weighting is not None and self.weighting not in matching:
                raise ExampleWeightError(
                    f"the loss weighted its examples as {self.weighting} and now as one of "
                    f"{[str(m) for m in matching]}: GNSCallback cannot follow a loss whose weighting changes during "
                    "training"
                )
            weighting = matching[0] if self.weighting is None else self.weighting
            candidates = [weighting] if self.weighting is not None else matching
            self._probe = LogitGradientProbe.attach(
                trained_outputs if trained_outputs is not None else outputs, labels, weighting.shifted, smoothing,
                sequences,
            )  # fmt: skip
            if self._probe is None:
                raise ExampleWeightError(
                    "GNSCallback matched the loss's value to its examples' cross-entropy, but the model's outputs "
                    "carry no logits (or label log-probabilities) that the backward passes through, so the weights "
                    "cannot be observed in the backward: the loss is not computed from these outputs"
                )
        tokens = token_counts(labels, weighting.shifted, sequences)  # the candidates share the shift
        weights = {
            w: example_weights(tokens, w, num_items_in_batch).to(loss.device) for w in (candidates or [weighting])
        }
        self._pending = (weights, loss.detach())
        return ObservedMicroBatch(examples, labels, sequences, tokens, unusable)

    def _observe_pairs(self, inputs: dict, loss: torch.Tensor) -> ObservedMicroBatch:
        """A micro-batch of TRL's DPO or reward trainer: 2P rows, P pair examples, each weighing 1/P in its loss."""
        rows = inputs.get("input_ids")
        if not isinstance(rows, torch.Tensor) or rows.shape[0] % 2:
            raise ExampleWeightError(
                "GNSCallback expected a micro-batch of chosen and rejected rows (an even number of input_ids rows), "
                f"got {None if not isinstance(rows, torch.Tensor) else tuple(rows.shape)}"
            )
        pairs = rows.shape[0] // 2
        self.weighting = PAIR_MEAN
        self._pending = ({PAIR_MEAN: torch.full((pairs,), 1.0 / pairs, device=loss.device)}, loss.detach())
        return ObservedMicroBatch(pairs, unusable=not bool(torch.isfinite(loss.detach()).all()))

    def observe_backward(
        self, trainer: Trainer, loss: torch.Tensor, loss_scale: float, unusable: bool
    ) -> torch.Tensor | None:
        """Before the backward of ``loss`` (scaled by ``loss_scale``): the micro-batch's weights a_b, or None while
        its backward must first confirm them (:meth:`settle`) or when the step is ``unusable``."""
        if self._pending is None:
            if unusable:
                return None
            raise AccumulationError("a backward pass without a training loss before it: GNSCallback lost track")
        candidates, computed = self._pending
        self._pending = None
        computed = computed.float()
        factor = torch.where(computed != 0, loss.detach().float() / computed, 1.0) * loss_scale
        candidates = {weighting: weights * factor for weighting, weights in candidates.items()}
        if self._probe is not None:
            self._probed = (self._probe, candidates, backward_factor(trainer.accelerator))
            self._probe = None
            return None
        return next(iter(candidates.values()))

    def settle(self) -> torch.Tensor | None:
        """Once a checked micro-batch's backward has run: the weights of the weighting whose token weights reached
        its logits (an ExampleWeightError if none did), and None when no check was waiting."""
        if self._probed is None:
            return None
        probe, candidates, backward = self._probed
        self._probed = None
        weighting = probe.select({w: weights * backward for w, weights in candidates.items()})
        self.weighting, self.steps_since_verified = weighting, 0
        if not self._confirmed:
            self._uninformative_checks += not probe.informative
            self._confirmed = probe.informative or self._uninformative_checks >= UNINFORMATIVE_CHECKS
            if self._confirmed and not probe.informative:
                logger.info(
                    "GNSCallback: the loss's weighting (%s) was checked on %d micro-batches whose examples all had the "
                    "same number of label tokens, which cannot tell a token mean from a mean of per-example means; "
                    "it is re-checked every verify_interval=%d steps.",
                    weighting, self._uninformative_checks, self.verify_interval,
                )  # fmt: skip
        return candidates[weighting]
