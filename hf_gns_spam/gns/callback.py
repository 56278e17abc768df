"""``GNSCallback``: the gradient noise scale of a patched model, every optimizer step, inside ``Trainer.train()``.

An adapter from the Trainer's events to these parts, each with its own module and tests:

* :mod:`hf_gns_spam.integrations.trainer_loop`: the Trainer's private surface (the loop bounds, the loss of each
  micro-batch, the backward, the gradient before clipping, the log record), and attaching the callback however it
  was added (``callbacks=[...]``, ``add_callback``, restored from a checkpoint);
* :mod:`hf_gns_spam.gns.weight_observer`: each example's weight a_b in the loss of every micro-batch, matched
  from the loss value and observed in the gradient that reaches the logits (label smoothing, ``compute_loss``
  overrides, TRL's ``SFTTrainer``, DPO and reward pairs, classification included), refused with a clear error when
  it cannot be;
* :mod:`hf_gns_spam.gns.step_sums`: one step's sums (Σ_b ‖G_b‖², ‖G‖², the weights), in all and per norm group,
  and their one all-reduce; the formulas of small, big and B_eff;
* :mod:`hf_gns_spam.gns.estimates`: the estimates from those sums (all norms, per group, the whole model's with
  ``validate_every``), their metrics and their checkpoint state;
* :mod:`hf_gns_spam.gns.driver`: the batch schedule through the Trainer's loop (accumulation of every fetched
  group, resume, the budget in data, the expected steps, the learning rate's position).

The estimate and the step's batch are merged into the Trainer's own log record (so TensorBoard, W&B and
``state.log_history`` get them next to ``loss``): ``gns``, ``gns_tokens``, ``gns_grad_sq``, ``gns_trace_sigma``,
``gns/<group>`` and its ``_grad_sq``/``_trace_sigma``, ``batch_size`` (examples in the step, all processes),
``grad_accum_steps`` (its micro-batches per process) and ``examples_seen`` (the examples of all optimizer steps so
far, all processes, cumulative as the Trainer's ``num_input_tokens_seen``: kept in checkpoints, so a resumed run goes
on counting; nan after resuming from a checkpoint without this callback's state, whose earlier examples it cannot
know). ``gns_signal`` chooses the estimate the ``"gns"`` schedule follows: ``"block"`` (``gns/block``, the default:
it followed the critical batch size measured by branching best, benchmarks/critical_batch.py) or another group's,
or ``"all"`` (``gns``).

Validation against the whole model (``validate_every=N``, off by default): every N-th optimizer step the callback
keeps that step's micro-batch inputs and, before the optimizer step, recomputes each example's own-loss gradient over
all trainable parameters (:mod:`hf_gns_spam.gns.whole_model`: one extra forward and backward per example, without
touching the parameters' gradients, the norms' statistics, the train/eval mode or the RNG), for ``gns_total`` and
``gns_total_no_embeddings``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState

from hf_gns_spam.gns.accumulation import EpochLoop
from hf_gns_spam.gns.arguments import NORM_GROUPS, GNSConfig, NormGroup
from hf_gns_spam.gns.driver import ScheduleDriver
from hf_gns_spam.gns.estimates import NoiseScaleEstimates
from hf_gns_spam.gns.estimator import GradientNoiseScale
from hf_gns_spam.gns.groups import norm_groups
from hf_gns_spam.gns.saved_state import RunShape, check_resume
from hf_gns_spam.gns.schedule import follows_gns
from hf_gns_spam.gns.step_sums import StepSums
from hf_gns_spam.gns.weight_observer import ExampleWeightObserver
from hf_gns_spam.integrations.trainer_loop import (
    TrainerLoopObserver,
    fetched_accumulation,
    install_trainer_hooks,
    label_smoothing,
    saved_callback_state,
    set_schedule_position,
    show_total_steps,
)
from hf_gns_spam.integrations.trl_pairs import check_paired_trainer, is_paired_trainer
from hf_gns_spam.patching import is_patched, set_paired_rows
from hf_gns_spam.stats import per_example_grad_stats, reset_per_example_grad_stats

__all__ = ["GNSCallback"]

logger = logging.getLogger(__name__)


class GNSCallback(TrainerCallback, ExportableState, TrainerLoopObserver):
    """Estimate the gradient noise scale every optimizer step, log it, and optionally grow the batch.

    ``GNSCallback(**options)``: the options, their defaults and their checks are :class:`GNSConfig`'s (keyword or
    positional, in its field order: ``schedule``, ``min_batch_size``, ``max_batch_size``, ``update_interval``,
    ``warmup_steps``, ``gns_multiplier``, ``max_growth``, ``lr_batch_power``, ``ema_decay``, ``verify_interval``,
    ``validate_every``, ``gns_signal``); each is also an attribute of the callback, and ``config`` holds them all.

    Call ``patch_model(model)`` before training; the callback measures the patched norms only. It can be passed
    in ``Trainer(callbacks=[...])``, added with ``trainer.add_callback``, or restored from a checkpoint.
    """

    def __init__(self, *args: Any, **options: Any) -> None:
        self.config = GNSConfig(*args, **options)  # every check of the options, shared with the launcher
        install_trainer_hooks()
        for name, value in self.config.as_dict().items():  # schedule, ..., gns_signal as attributes
            setattr(self, name, value)
        self.estimates = NoiseScaleEstimates(self.ema_decay, self.validate_every)
        self.weights = ExampleWeightObserver(self.verify_interval)  # each example's weight in the loss
        self.step = StepSums()  # the sums of the optimizer step in progress, this process
        self.driver: ScheduleDriver | None = None  # the batch schedule through the Trainer's loop, made at attach
        self.samples = 0  # examples consumed, all processes
        # samples counts the run's examples from its start (not after resuming from a checkpoint without our state)
        self.samples_from_start = True
        self.last_batch_size = 0  # examples in the latest optimizer step, all processes
        self.last_accumulation = 0  # micro-batches in the latest optimizer step, each process
        self._groups: dict[str, NormGroup] = {}  # statistics key (a norm's parameter name) -> its group, cached
        self._no_norm_gradient_reported = False  # the warning (or error) of a step without any norm gradient
        self._trainer: Trainer | None = None
        self._arguments_accumulation: int | None = None  # the TrainingArguments' value when training started
        self._paired = False  # the Trainer's examples are pairs of rows (TRL's DPO and reward trainers)

    def _reset_step(self) -> None:
        self.step = StepSums()
        self.weights.reset_step()

    # ------------------------------------------------------------------------------------------ attaching
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._check_model(model)  # early checks; add_callback and restored callbacks get them at train()
        self.config.batch_schedule(args.per_device_train_batch_size * args.world_size)

    def _check_model(self, model: nn.Module | None) -> None:
        if model is None:
            return
        if not any(is_patched(m) for m in model.modules()):
            raise ValueError("GNSCallback found no patched normalization layer: call patch_model(model) first")
        groups = set(norm_groups(model).values())
        if follows_gns(self.schedule) and self.gns_signal != "all" and self.gns_signal not in groups:
            raise ValueError(
                f"GNSCallback(schedule={self.schedule!r}) follows gns_signal={self.gns_signal!r}, but the model has "
                f"no patched norm in that group (it has {', '.join(g for g in NORM_GROUPS if g in groups)}; "
                "hf_gns_spam.gns.groups gives the rule): pass gns_signal='all' to follow every patched norm, or "
                "one of the groups it has"
            )

    def attach(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self._paired = self.weights.paired = is_paired_trainer(trainer)
        if self._paired:  # TRL's DPO and reward trainers: an example is a pair of rows (integrations/trl_pairs.py)
            check_paired_trainer(trainer)
            if self.validate_every is not None:
                raise ValueError(
                    f"GNSCallback(validate_every=...) does not work with {type(trainer).__name__}: the whole model's "
                    "per-example gradients are computed for examples that are one row, not a pair of rows"
                )
        set_paired_rows(trainer.model, self._paired)
        self._check_model(trainer.model)
        if trainer.is_deepspeed_enabled:
            raise ValueError(
                "GNSCallback does not work with DeepSpeed: ZeRO keeps the gradients in its own partitioned buffers, "
                "where the accumulated gradient of the norms cannot be read, and its accumulation is fixed in its "
                "config. Use DDP or FSDP2 (accelerate launch --use_fsdp --fsdp_version 2) instead."
            )
        if self.validate_every is not None and trainer.is_fsdp_enabled:
            raise ValueError(
                "GNSCallback(validate_every=...) does not work with FSDP: the per-example gradients of all "
                "parameters need the whole parameters on every process"
            )
        args = trainer.args
        rule = self.config.batch_schedule(args.per_device_train_batch_size * args.world_size)
        self.driver = ScheduleDriver(
            args.gradient_accumulation_steps if rule is None else rule.min_accumulation,
            rule,
            lr_batch_power=self.lr_batch_power,
            signal=lambda: (self.signal_estimator.gns, self.signal_estimator.is_current),
            show_total=functools.partial(show_total_steps, trainer),
            set_learning_rate=set_schedule_position,
        )

    def before_loop_bounds(self, trainer: Trainer) -> None:
        self._arguments_accumulation = trainer.args.gradient_accumulation_steps  # given back at the end
        trainer.args.gradient_accumulation_steps = self.driver.min_accumulation

    def loop_bounds(
        self, trainer: Trainer, steps_in_epoch: int, fetches_per_epoch: int, max_steps: int, has_length: bool
    ) -> None:
        self.driver.start(EpochLoop(steps_in_epoch, fetches_per_epoch, max_steps, data_ends_with_epoch=has_length))

    def resume_position(
        self, trainer: Trainer, epochs_trained: int, skip: int, checkpoint: str | None
    ) -> tuple[int, int]:
        """Where to restart: the saved (epoch, micro-batch), which the Trainer cannot compute once the accumulation
        has changed, after checking the saved state against this run (:mod:`hf_gns_spam.gns.saved_state`); the
        Trainer's own values for a checkpoint without this callback's state."""
        saved = saved_callback_state(trainer, type(self).__name__) if checkpoint is not None else None
        if saved is None:
            self.samples_from_start = checkpoint is None  # the checkpoint's examples are unknown: counted from here on
            return self.driver.resume(trainer.args, None, epochs_trained, skip)
        where = os.path.join(checkpoint, TRAINER_STATE_NAME)
        changes = check_resume(saved, self.config, RunShape.of(trainer.args), where)
        if changes and trainer.state.is_world_process_zero:
            logger.warning(
                "GNSCallback: resuming from %s with other options than it was saved with; from step %d on: %s.",
                where, trainer.state.global_step, ", ".join(changes),
            )  # fmt: skip
        self._restore(saved["attributes"])
        position = saved["attributes"]["controller_state"]
        return self.driver.resume(trainer.args, position, epochs_trained, skip, trainer.args.ignore_data_skip)

    # ------------------------------------------------------------------------------------------ the schedule
    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.samples, self.samples_from_start = 0, True
        self._reset_step()
        self.driver.on_train_begin(state)
        if self.driver.rule is not None and state.is_world_process_zero:
            logger.warning(self.driver.explanation())

    def on_epoch_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.driver.on_epoch_begin(args, state, lr_scheduler)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.driver.on_epoch_end(self.step.micro_batches)

    def on_train_end(self, args, state, control, **kwargs):
        self.weights.stop_capturing()  # a compute_loss that raised may have left its hook
        if self._paired:  # the model's later forwards (outside this Trainer) take rows as examples again
            set_paired_rows(self._trainer.model, False)
        # the TrainingArguments come out as they went in: the model's saved training_args.bin, and a second
        # Trainer or run built from the same arguments, get the user's accumulation, not the grown one
        if self._arguments_accumulation is not None:
            args.gradient_accumulation_steps = self._arguments_accumulation

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.driver.on_optimizer_step(state, self.last_accumulation, fetched_accumulation(self._trainer))

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.driver.on_step_end(args, state, control, lr_scheduler)

    @property
    def signal_estimator(self) -> GradientNoiseScale:
        """The estimate the ``"gns"`` schedule follows (``gns_signal``)."""
        estimates = self.estimates
        return estimates.estimator if self.gns_signal == "all" else estimates.group_estimators[self.gns_signal]

    # ------------------------------------------------------------------------------------------ measurement
    def wants_outputs(self, trainer: Trainer) -> bool:
        self.step.add_weights(self.weights.settle())  # the previous micro-batch's backward has run
        return self.weights.wants_outputs(trainer.model, self.step.micro_batches + 1)

    def observe_loss(
        self, trainer: Trainer, inputs: dict, num_items_in_batch: Any, loss: torch.Tensor, outputs: Any
    ) -> None:
        step = self.step
        step.add_weights(self.weights.settle())
        step.micro_batches += 1
        if step.micro_batches == 1:
            step.validating = self.validate_every is not None and (
                (trainer.state.global_step + 1) % self.validate_every == 0
            )
        step.add_micro_batch(
            self.weights.observe_loss(trainer, inputs, num_items_in_batch, loss, outputs, step.micro_batches), inputs
        )

    def observe_backward(self, trainer: Trainer, loss: torch.Tensor, loss_scale: float) -> None:
        self.step.add_weights(self.weights.observe_backward(trainer, loss, loss_scale, self.step.unusable))

    def _groups_of(self, names) -> dict[str, NormGroup]:
        """The group of each statistics key (a patched norm's parameter name), classified once per module."""
        if any(name not in self._groups for name in names):
            modules = norm_groups(self._trainer.model)
            for name in names:
                self._groups.setdefault(name, modules[name.rpartition(".")[0]])
        return self._groups

    def after_clipping(self, trainer: Trainer, gradient_norm: Any) -> None:
        self.step.gradient_norm = gradient_norm

    def before_clipping(self, trainer: Trainer) -> None:
        """‖G‖² of the accumulated gradient, after the all-reduce and before clipping."""
        self.step.add_weights(self.weights.settle())
        self.step.measure_gradient(trainer.model, self._groups_of, trainer.accelerator)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer, step = self._trainer, self.step
        step.add_weights(self.weights.settle())
        if step.big is None:  # no clipping (max_grad_norm=0, DeepSpeed): the gradient is as it was
            self.before_clipping(trainer)
        model = trainer.model
        totals = step.reduce(
            model,
            per_example_grad_stats(model),
            self._groups_of,
            trainer.accelerator,
            self.weights.weighting,
            label_smoothing(trainer) if step.validating else 0.0,
        )
        if totals.big is None:
            self._report_no_norm_gradient(state)
        self.last_accumulation, self.last_batch_size = step.micro_batches, totals.examples
        self.samples += self.last_batch_size
        self.weights.steps_since_verified += 1
        self._reset_step()
        reset_per_example_grad_stats(model)
        self.estimates.update(totals, state.global_step + 1, step.validating)

    def _report_no_norm_gradient(self, state) -> None:
        """Say once, at the first step where the backward reached no patched norm (only parameters above the last
        norm are trained, e.g. LoRA on the output head alone), that there is no GNS; a "gns" schedule, which would
        then never move, is an error. Frozen norms are measured wherever the backward passes through them."""
        if self._no_norm_gradient_reported:
            return
        self._no_norm_gradient_reported = True
        message = (
            f"GNSCallback: at optimizer step {state.global_step + 1} the backward reached no patched normalization "
            "layer (nothing trained lies below one: a frozen norm is measured only where the gradient passes through "
            "it anyway), so there is no GNS: gns and gns/<group> stay nan. Train something below a norm (LoRA on the "
            "attention or MLP projections) or make a norm's weight trainable (weight.requires_grad_(True))"
        )
        if follows_gns(self.schedule):
            raise ValueError(f"{message}, or use schedule='linear' or None: a 'gns' schedule would never move.")
        if state.is_world_process_zero:
            logger.warning("%s.", message)

    # ------------------------------------------------------------------------------------------ reporting
    def metrics(self) -> dict[str, float]:
        return {
            **self.estimates.metrics(),
            "batch_size": self.last_batch_size,
            "grad_accum_steps": self.last_accumulation,
            "examples_seen": self.samples if self.samples_from_start else math.nan,
        }

    def log_metrics(self) -> dict[str, float]:
        report = self.estimates.nonfinite_report(self._trainer.state.global_step)
        if report is not None and self._trainer.state.is_world_process_zero:
            logger.warning(report)
        metrics = self.metrics() if self.last_accumulation else {}
        metrics.update(self.estimates.unlogged_total_metrics())  # the first record at or after a validation step
        return metrics

    def state(self) -> dict:
        return {
            "args": self.config.as_dict(),
            "run": RunShape.of(self._trainer.args).as_dict() if self._trainer is not None else None,
            "attributes": {
                **self.estimates.state_dict(),
                "controller_state": self.driver.state_dict() if self.driver else None,
                "samples": self.samples,
                "samples_from_start": self.samples_from_start,
                "last_batch_size": self.last_batch_size,
                "last_accumulation": self.last_accumulation,
                "steps_since_verified": self.weights.steps_since_verified,
            },
        }

    def _restore(self, attributes: dict[str, Any]) -> None:
        self.estimates.load_state_dict(attributes)
        for name in ("samples", "last_batch_size", "last_accumulation"):
            setattr(self, name, attributes[name])
        self.weights.steps_since_verified = attributes["steps_since_verified"]
        self.samples_from_start = attributes.get("samples_from_start", True)  # checkpoints from before it lack it
