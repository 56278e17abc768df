"""``GNSCallback``: the gradient noise scale of a patched model, every optimizer step, inside ``Trainer.train()``.

A thin layer over these parts, each with its own module and tests:

* :mod:`hf_gns_spam.integrations.trainer_loop`: the Trainer's private surface (the loop bounds, the loss of each
  micro-batch, the backward, the gradient before clipping, the log record), and attaching the callback however it
  was added (``callbacks=[...]``, ``add_callback``, restored from a checkpoint);
* :mod:`hf_gns_spam.gns.weight_observer`: each example's weight a_b in the loss of every micro-batch, matched
  from the loss value and observed in the gradient that reaches the logits (label smoothing, ``compute_loss``
  overrides, TRL's ``SFTTrainer``, DPO and reward pairs, classification included), refused with a clear error when
  it cannot be;
* :mod:`hf_gns_spam.gns.estimator`: the unbiased estimates for weighted examples and their smoothing;
* :mod:`hf_gns_spam.gns.accumulation`: the gradient-accumulation steps of each fetched group (the batch schedule),
  so that every optimizer step is one whole group the Trainer fetched.

Per optimizer step, over the parameters of the patched norms, with α_b the weight of example b in the loss that was
back-propagated on its process (a_b × what the Trainer multiplied the loss by: ÷ accumulation for a loss not
normalised by ``num_items_in_batch``, the fp16 loss scale; observed in the backward), summed over micro-batches
and processes (P of them, whose gradients DDP averages):

    small = Σ_b ‖G_b‖² / Σ_b α_b²        (G_b: example b's contribution to its process's gradient, G_b = α_b·g_b)
    big   = ‖G‖²·P² / (Σ_b α_b)²          (G: the accumulated gradient after the all-reduce, before clipping)
    B_eff = (Σ_b α_b)² / Σ_b α_b²

so that E[small] = |G|² + tr Σ and E[big] = |G|² + tr Σ / B_eff for per-example gradients g_b (each example's own
loss) independent of the weights; :class:`~hf_gns_spam.gns.estimator.GradientNoiseScale` turns them into |G|²,
tr Σ and GNS = tr Σ / |G|². Every step checks that it consumed the micro-batches the Trainer fetched for it.

The estimate and the step's batch are merged into the Trainer's own log record (so TensorBoard, W&B and
``state.log_history`` get them next to ``loss``): ``gns``, ``gns_tokens``, ``gns_grad_sq``, ``gns_trace_sigma``,
``batch_size`` (examples in the step, all processes), ``grad_accum_steps`` (its micro-batches per process) and
``examples_seen`` (the examples of all optimizer steps so far, all processes, cumulative as the Trainer's
``num_input_tokens_seen``: kept in checkpoints, so a resumed run goes on counting; nan after resuming from a
checkpoint without this callback's state, whose earlier examples it cannot know).

Per norm group. Each patched norm is in one group (:mod:`hf_gns_spam.gns.groups`: ``"block"``, the norms inside
the repeated blocks; ``"final"``, the norm after the last block; ``"other"``), classified once per module. The step's
sums Σ_b ‖G_b‖² and ‖G‖² are also kept per group (sums over modules of what the backward already computed, carried
by the step's one all-reduce) and go through the same formulas into one more estimator per group, with the same
EMA, clipping and skips: logged as ``gns/block``, ``gns/final``, ``gns/other`` (the groups the model has) beside
``gns``, which stays the estimate over every patched norm, each with its smoothed |G|² and tr Σ (the group
estimator's EMAs, as ``gns_grad_sq`` and ``gns_trace_sigma`` are for all norms): ``gns/block_grad_sq``,
``gns/block_trace_sigma``, and so on for ``final`` and ``other``. ``gns_signal`` chooses the estimate the ``"gns"``
schedule follows: ``"block"`` (``gns/block``, the default: it followed the critical batch size measured by
branching best, benchmarks/critical_batch.py) or another group's, or ``"all"`` (``gns``).

With a batch schedule the run's length is a budget in data: the Trainer's ``max_steps`` at train start (its
"Total optimization steps", steps of ``min_batch_size`` examples, from ``max_steps`` or ``num_train_epochs``), which
the run uses up in fewer optimizer steps as the batch grows. ``state.max_steps`` (the progress bar's total, and what
integrations report) is the expected number of optimizer steps: exact from the start for ``"linear"``, whose batches
are a function of the data consumed; for ``"gns"`` the count if the batch stays as it is, recomputed only when a
decision grows it. At the step that uses the budget, ``state.max_steps`` becomes that step before ``on_step_end``,
so the Trainer's own end of training (``DefaultFlowCallback``: stop, the final save of ``save_strategy="steps"``,
the final evaluation of ``eval_strategy="steps"``; then the epoch's end) happens there, as without a schedule; the
bar ends full. The Trainer's printed total is explained once per ``train()`` in the log.

Validation against the whole model (``validate_every=N``, off by default): every N-th optimizer step (steps N, 2N,
…) the callback keeps that step's micro-batch inputs (detached, on their device) and, before the optimizer step,
recomputes each example's own-loss gradient g_e over ALL trainable parameters (:mod:`hf_gns_spam.gns.whole_model`:
one extra forward and backward per example, at batch size 1, without touching the parameters' gradients, the
norms' statistics, the train/eval mode or the RNG). The same estimator inputs as for the norms,

    small = Σ_e α_e²‖g_e‖² / Σ_e α_e²        big = ‖G‖²·P² / (Σ_e α_e)²     (G: all trainable parameters' gradient)

feed a second :class:`~hf_gns_spam.gns.estimator.GradientNoiseScale` (EMA decay ``ema_decay``^N per validation
step, the same horizon in optimizer steps as the norms' EMA), logged as ``gns_total``, ``gns_total_grad_sq`` and
``gns_total_trace_sigma`` in the first log record at or after each validation step; ``total_history`` keeps each
validation step's values beside the norms' ``gns``.

The same sums over the trainable parameters without the embeddings (the ``weight`` of every ``nn.Embedding``, token
and position embeddings, and the parameters of ``model.get_output_embeddings()``, the LM head, tied or not; a tied
head is one Parameter, left out once: :func:`~hf_gns_spam.gns.whole_model.embedding_parameters`), from the same
per-example gradients and carried by the same all-reduce, feed a third estimator with the same decay, logged as
``gns_total_no_embeddings``, ``gns_total_no_embeddings_grad_sq`` and ``gns_total_no_embeddings_trace_sigma``. Why
both: the reference implementation (nanoGNS) leaves the tied embeddings out of its whole-model GNS, and in small
language models the embeddings raise it by a factor of about 1.5–2 over most of a run (``benchmarks/gns_fidelity.py``;
not at the very start). A model without embeddings gives equal values.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_gns_spam.gns.accumulation import AccumulationError, EpochLoop
from hf_gns_spam.gns.arguments import NORM_GROUPS, GNSConfig, GNSSignal, NormGroup
from hf_gns_spam.gns.driver import ScheduleDriver
from hf_gns_spam.gns.estimator import GradientNoiseScale, StepWeights, unbiased_estimates
from hf_gns_spam.gns.example_weights import LossWeighting
from hf_gns_spam.gns.group_gradients import group_squared_norms
from hf_gns_spam.gns.groups import norm_groups
from hf_gns_spam.gns.schedule import BatchSizeSchedule
from hf_gns_spam.gns.weight_observer import ExampleWeightObserver
from hf_gns_spam.gns.whole_model import (
    StoredMicroBatch,
    embedding_parameters,
    squared_gradient_norm,
    weighted_squared_norms,
)
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

HISTORY_LENGTH = 10_000
METRIC_NAMES = (
    "gns", "gns_tokens", "gns_grad_sq", "gns_trace_sigma", "batch_size", "grad_accum_steps", "examples_seen",
)  # fmt: skip
# logged besides METRIC_NAMES with validate_every, in the first record at or after each validation step
TOTAL_METRIC_NAMES = (
    "gns_total", "gns_total_grad_sq", "gns_total_trace_sigma",
    "gns_total_no_embeddings", "gns_total_no_embeddings_grad_sq", "gns_total_no_embeddings_trace_sigma",
)  # fmt: skip
# logged besides METRIC_NAMES, for each norm group the model has (hf_gns_spam.gns.groups): its GNS, |G|² and tr Σ
GROUP_METRIC_NAMES = tuple(
    f"gns/{group}{suffix}" for group in NORM_GROUPS for suffix in ("", "_grad_sq", "_trace_sigma")
)


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
        self.schedule: str | None
        self.min_batch_size: int | None
        self.max_batch_size: int | None
        self.ema_decay: float
        self.validate_every: int | None
        self.gns_signal: GNSSignal
        for name, value in self.config.as_dict().items():  # update_interval, ..., as attributes
            setattr(self, name, value)
        ema_decay, validate_every = self.ema_decay, self.validate_every
        # each norm group's estimate, from the same step's sums as the all-norm estimator's
        self.group_estimators = {group: GradientNoiseScale(ema_decay=ema_decay) for group in NORM_GROUPS}
        self.groups_present: tuple[NormGroup, ...] = ()  # the groups of the patched norms, in NORM_GROUPS order
        self._groups: dict[str, NormGroup] = {}  # statistics key (a norm's parameter name) -> its group, cached
        # the whole model's estimate (validate_every): one update per validation step, the norms' horizon in steps
        self.total_estimator = GradientNoiseScale(ema_decay=ema_decay ** (validate_every or 1))
        # ... and of all but the embeddings (whole_model.embedding_parameters), from the same per-example gradients
        self.total_no_embeddings_estimator = GradientNoiseScale(ema_decay=ema_decay ** (validate_every or 1))
        self.total_history: collections.deque[dict[str, float]] = collections.deque(maxlen=HISTORY_LENGTH)
        self._total_unlogged = False  # a validation step ran since the latest log record
        self._no_norm_gradient_reported = False  # the warning (or error) of a step without any norm gradient
        self.driver: ScheduleDriver | None = None  # the batch schedule through the Trainer's loop, made at attach
        self.estimator = GradientNoiseScale(ema_decay=ema_decay)
        self.samples = 0  # examples consumed, all processes
        # samples counts the run's examples from its start (not after resuming from a checkpoint without our state)
        self.samples_from_start = True
        self.tokens_per_example = math.nan
        self.last_batch_size = 0  # examples in the latest optimizer step, all processes
        self.last_accumulation = 0  # micro-batches in the latest optimizer step, each process
        self.weights = ExampleWeightObserver(self.verify_interval)  # each example's weight in the loss
        # the latest optimizer steps' inputs to the estimator (bounded: long runs)
        self.history: collections.deque[dict[str, float]] = collections.deque(maxlen=HISTORY_LENGTH)
        self._trainer: Trainer | None = None
        self._arguments_accumulation: int | None = None  # the TrainingArguments' value when training started
        self._paired = False  # the Trainer's examples are pairs of rows (TRL's DPO and reward trainers)
        self._reset_step()

    def _reset_step(self) -> None:
        """Per-optimizer-step accumulators (this process)."""
        self._micro_batches = 0
        self._rows = 0
        self._label_tokens = 0
        self._weight_sum: torch.Tensor | float = 0.0
        self._weight_sq_sum: torch.Tensor | float = 0.0
        self.weights.reset_step()
        self._big: torch.Tensor | None = None  # ‖G‖² of replicated gradients (None: not measured)
        self._big_shards = torch.zeros(())  # this process's part of ‖G‖² of sharded gradients
        self._group_big = torch.zeros(len(NORM_GROUPS))  # the same two, per norm group (NORM_GROUPS order)
        self._group_big_shards = torch.zeros(len(NORM_GROUPS))
        self._group_measured = [False] * len(NORM_GROUPS)  # the group has a gradient
        self._unusable_step = False  # a micro-batch whose weights could not be identified
        self._validating = False  # this step is a validation step (validate_every)
        self._stored: list[StoredMicroBatch] = []  # its micro-batches
        self._total_big: torch.Tensor | None = None  # its ‖G‖² over all trainable parameters, before clipping
        self._total_big_no_embeddings: torch.Tensor | None = None  # ... and over all but the embeddings

    # ------------------------------------------------------------------------------------------ attaching
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._check_model(model)  # early checks; add_callback and restored callbacks get them at train()
        self._batch_schedule(args)

    def _check_model(self, model: nn.Module | None) -> None:
        if model is None:
            return
        if not any(is_patched(m) for m in model.modules()):
            raise ValueError("GNSCallback found no patched normalization layer: call patch_model(model) first")
        groups = set(norm_groups(model).values())
        if self.schedule == "gns" and self.gns_signal != "all" and self.gns_signal not in groups:
            raise ValueError(
                f"GNSCallback(schedule='gns') follows gns_signal={self.gns_signal!r}, but the model has no patched "
                f"norm in that group (it has {', '.join(g for g in NORM_GROUPS if g in groups)}; "
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
        rule = self._batch_schedule(trainer.args)
        self.driver = ScheduleDriver(
            trainer.args.gradient_accumulation_steps if rule is None else rule.min_accumulation,
            rule,
            lr_batch_power=self.lr_batch_power,
            signal=lambda: (self.signal_estimator.gns, self.signal_estimator.is_current),
            show_total=functools.partial(show_total_steps, trainer),
            set_learning_rate=set_schedule_position,
        )

    def _batch_schedule(self, args) -> BatchSizeSchedule | None:
        """The schedule in whole micro-batches of this run (validated against the TrainingArguments)."""
        if self.schedule is None:
            return None
        unit = args.per_device_train_batch_size * args.world_size
        return BatchSizeSchedule(
            self.schedule,
            self.min_batch_size,
            self.max_batch_size,
            unit,
            self.update_interval,
            self.warmup_steps,
            self.gns_multiplier,
            self.max_growth,
        )

    def before_loop_bounds(self, trainer: Trainer) -> None:
        self._arguments_accumulation = trainer.args.gradient_accumulation_steps  # given back at the end
        trainer.args.gradient_accumulation_steps = self.driver.min_accumulation

    def loop_bounds(
        self, trainer: Trainer, steps_in_epoch: int, fetches_per_epoch: int, max_steps: int, has_length: bool
    ) -> None:
        self.driver.start(EpochLoop(steps_in_epoch, fetches_per_epoch, max_steps, data_ends_with_epoch=has_length))

    def resume_position(self, trainer: Trainer, epochs_trained: int, skip: int, resuming: bool) -> tuple[int, int]:
        """Where to restart: the saved (epoch, micro-batch), which the Trainer cannot compute once the accumulation
        has changed; the Trainer's own values for a checkpoint without this callback's state."""
        saved = saved_callback_state(trainer, type(self).__name__) if resuming else None
        attributes = saved.get("attributes", {}) if saved is not None else {}
        position = attributes.get("controller_state")
        if position is None:
            self.samples_from_start = not resuming  # the checkpoint's examples are unknown: counted from here on
        else:
            self._restore(attributes)
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
        self.driver.on_epoch_end(self._micro_batches)

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
        return self.estimator if self.gns_signal == "all" else self.group_estimators[self.gns_signal]

    # ------------------------------------------------------------------------------------------ measurement
    def wants_outputs(self, trainer: Trainer) -> bool:
        self._add_weights(self.weights.settle())  # the previous micro-batch's backward has run
        return self.weights.wants_outputs(trainer.model, self._micro_batches + 1)

    def observe_loss(
        self, trainer: Trainer, inputs: dict, num_items_in_batch: Any, loss: torch.Tensor, outputs: Any
    ) -> None:
        self._add_weights(self.weights.settle())
        self._micro_batches += 1
        observed = self.weights.observe_loss(trainer, inputs, num_items_in_batch, loss, outputs, self._micro_batches)
        self._rows += observed.examples
        self._unusable_step |= observed.unusable
        if self._micro_batches == 1:
            self._validating = self.validate_every is not None and (
                (trainer.state.global_step + 1) % self.validate_every == 0
            )
        if observed.tokens is None:
            return
        self._label_tokens += int(observed.tokens.sum())
        if self._validating:
            inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            self._stored.append(StoredMicroBatch(inputs, observed.labels.detach(), observed.sequences, observed.tokens))

    def observe_backward(self, trainer: Trainer, loss: torch.Tensor, loss_scale: float) -> None:
        self._add_weights(self.weights.observe_backward(trainer, loss, loss_scale, self._unusable_step))

    def _add_weights(self, weights: torch.Tensor | None) -> None:
        """Count a micro-batch's examples' weights a_b (in units of the loss passed to the backward), if given."""
        if weights is None:
            return
        if self._validating and self._stored and self._stored[-1].weights is None:
            self._stored[-1].weights = weights
        self._weight_sum = self._weight_sum + weights.sum()
        self._weight_sq_sum = self._weight_sq_sum + weights.square().sum()

    @property
    def weighting(self) -> LossWeighting | None:
        """How the loss weights its examples, once identified (:mod:`hf_gns_spam.gns.weight_observer`)."""
        return self.weights.weighting

    def _groups_of(self, names) -> dict[str, NormGroup]:
        """The group of each statistics key (a patched norm's parameter name), classified once per module."""
        if any(name not in self._groups for name in names):
            modules = norm_groups(self._trainer.model)
            for name in names:
                self._groups.setdefault(name, modules[name.rpartition(".")[0]])
        return self._groups

    def before_clipping(self, trainer: Trainer) -> None:
        """‖G‖² of the patched norms' gradient: replicated gradients (one process, DDP) are summed here; FSDP2's
        shards (DTensor) are summed locally here and over the processes with the step's other statistics. Frozen
        norms' gradients (sinks, local to each process) are averaged over the processes first, as DDP averages the
        trained ones. On a validation step, also ‖G‖² of all trainable parameters, and of all but the embeddings."""
        self._add_weights(self.weights.settle())
        if self._validating and self._total_big is None:
            self._total_big = squared_gradient_norm(trainer.model)
            self._total_big_no_embeddings = squared_gradient_norm(trainer.model, embedding_parameters(trainer.model))
        squared = group_squared_norms(trainer.model, self._groups_of, trainer.accelerator)
        if squared is None:
            self._big = None
            return
        self._group_measured = list(squared.measured)
        self._group_big, self._group_big_shards = squared.replicated, squared.shards
        self._big, self._big_shards = self._group_big.sum(), self._group_big_shards.sum()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self._trainer
        self._add_weights(self.weights.settle())
        if self._big is None:  # no clipping (max_grad_norm=0, DeepSpeed): the gradient is as it was
            self.before_clipping(trainer)
        model = trainer.model
        named_stats = per_example_grad_stats(model)
        stats = list(named_stats.values())
        device = stats[0].sum_sq.device if stats else args.device
        zero = torch.zeros((), device=device)
        validated = self._validating and not self._unusable_step and self._total_big is not None
        total_sq = no_embeddings_sq = norms_sq = zero
        no_embeddings = True  # some trainable parameter is not an embedding
        if validated:  # the whole model's Σ α_e²‖g_e‖², without the embeddings, and the norms' share (recomputed)
            smoothing = label_smoothing(trainer)
            embeddings = {id(p) for p in embedding_parameters(model)}
            no_embedding_names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in embeddings]
            no_embeddings = bool(no_embedding_names)
            groups = {"norms": list(named_stats), "no_embeddings": no_embedding_names}
            sums = weighted_squared_norms(model, self._stored, self.weighting.shifted, smoothing, groups)
            total_sq, no_embeddings_sq, norms_sq = (
                sums[key].to(device, torch.float32) for key in ("all", "no_embeddings", "norms")
            )
        groups = self._groups_of(named_stats)
        self.groups_present = tuple(g for g in NORM_GROUPS if g in set(groups.values()))
        group_sum_sq = [
            sum((s.sum_sq for n, s in named_stats.items() if groups[n] == group), zero) for group in NORM_GROUPS
        ]
        local = torch.stack(
            [
                sum((s.sum_sq for s in stats), zero),
                zero + self._weight_sum,
                zero + self._weight_sq_sum,
                zero + self._micro_batches,
                zero + self._rows,
                zero + self._label_tokens,
                torch.stack([s.count for s in stats]).max() if stats else zero,
                zero if self._big is None else self._big_shards.to(device),
                total_sq,
                no_embeddings_sq,
                norms_sq,
                zero + float(validated),
                *group_sum_sq,
                *self._group_big_shards.to(device),
            ]
        )
        totals = trainer.accelerator.reduce(local, reduction="sum").tolist()  # the step's one all-reduce
        (sum_sq, weight_sum, weight_sq_sum, micro, rows, label_tokens, measured, big_shards, total_sq,
         no_embeddings_sq, norms_sq, validated_processes) = (float(v) for v in totals[:12])  # fmt: skip
        groups_count = len(NORM_GROUPS)
        group_sum_sq, group_big_shards = totals[12 : 12 + groups_count], totals[12 + groups_count :]
        group_big = [b + s for b, s in zip(self._group_big.tolist(), group_big_shards, strict=True)]
        group_measured = self._group_measured
        total_big = float(self._total_big) if validated else math.nan
        # nan (the estimator skips the step) when every trainable parameter is an embedding
        total_big_no_embeddings = float(self._total_big_no_embeddings) if validated and no_embeddings else math.nan
        processes = trainer.accelerator.num_processes
        validated = round(validated_processes) == processes  # every process recomputed its examples
        big = None if self._big is None else float(self._big) + big_shards
        if round(micro) != processes * self._micro_batches:
            raise AccumulationError(
                f"this optimizer step ran {self._micro_batches} micro-batches on this process but {round(micro)} on "
                f"{processes} processes together: the processes are out of step"
            )
        if big is None:
            self._report_no_norm_gradient(state)
        unusable = self._unusable_step
        validating = self._validating
        self.last_accumulation, self.last_batch_size = self._micro_batches, round(rows)
        self.samples += self.last_batch_size
        self.weights.steps_since_verified += 1
        self._reset_step()
        reset_per_example_grad_stats(model)
        if label_tokens > 0:
            self.tokens_per_example = label_tokens / rows
        weights = StepWeights(weight_sum, weight_sq_sum, processes)
        effective_batch = weights.effective_batch
        if unusable or measured < 2 or big is None or not effective_batch > 1.0:  # e.g. no norm reached
            self.estimator.skip()
            for group in self.groups_present:
                self.group_estimators[group].skip()
            small = math.nan
        else:
            small, big = weights.small_big(sum_sq, big)
            entry = {"small": small, "big": big, "effective_batch": effective_batch, "batch_size": rows}
            self.estimator.update(small, big, effective_batch)
            for index, group in enumerate(NORM_GROUPS):  # the same formulas on the group's share of the sums
                if group not in self.groups_present:
                    continue
                if not group_measured[index]:  # the group's norms are frozen
                    self.group_estimators[group].skip()
                    continue
                entry[f"small/{group}"], entry[f"big/{group}"] = weights.small_big(
                    group_sum_sq[index], group_big[index]
                )
                self.group_estimators[group].update(entry[f"small/{group}"], entry[f"big/{group}"], effective_batch)
            self.history.append(entry)
        if validating:
            self._update_total(
                state.global_step + 1,
                validated,
                (total_sq, total_big),
                (no_embeddings_sq, total_big_no_embeddings),
                norms_sq,
                weights,
                small,
            )

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
        if self.schedule == "gns":
            raise ValueError(f"{message}, or use schedule='linear' or None: a 'gns' schedule would never move.")
        if state.is_world_process_zero:
            logger.warning("%s.", message)

    def _update_total(
        self,
        step: int,
        validated: bool,
        total: tuple[float, float],
        no_embeddings: tuple[float, float],
        norms_sq: float,
        weights: StepWeights,
        norms_small: float,
    ) -> None:
        """One validation step into the whole model's estimators (with and without the embeddings: ``total`` and
        ``no_embeddings`` are each (Σ_e α_e²‖g_e‖², ‖G‖²)) and ``total_history``."""
        self._total_unlogged = True
        effective_batch = weights.effective_batch
        if not validated or not effective_batch > 1.0:
            self.total_estimator.skip()
            self.total_no_embeddings_estimator.skip()
            return
        small, big = weights.small_big(*total)
        small_no_embeddings, big_no_embeddings = weights.small_big(*no_embeddings)
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
                "norms_small_recomputed": norms_sq / weights.weight_sq_sum,  # ... and from the recomputed gradients
            }
        )

    # ------------------------------------------------------------------------------------------ reporting
    def metrics(self) -> dict[str, float]:
        gns = self.estimator.gns if self.estimator.is_current else math.nan
        return {
            "gns": gns,
            "gns_tokens": gns * self.tokens_per_example,
            "gns_grad_sq": self.estimator.grad_sq,
            "gns_trace_sigma": self.estimator.trace_sigma,
            "batch_size": self.last_batch_size,
            "grad_accum_steps": self.last_accumulation,
            "examples_seen": self.samples if self.samples_from_start else math.nan,
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

    def log_metrics(self) -> dict[str, float]:
        metrics = self.metrics() if self.last_accumulation else {}
        if self._total_unlogged:  # the first record at or after a validation step
            self._total_unlogged = False
            metrics.update(self.total_metrics())
        return metrics

    def state(self) -> dict:
        return {
            "args": self.config.as_dict(),
            "attributes": {
                "estimator_state": self.estimator.state_dict(),
                "controller_state": self.driver.state_dict() if self.driver else None,
                "samples": self.samples,
                "samples_from_start": self.samples_from_start,
                "tokens_per_example": self.tokens_per_example,
                "last_batch_size": self.last_batch_size,
                "last_accumulation": self.last_accumulation,
                "steps_since_verified": self.weights.steps_since_verified,
                "total_estimator_state": self.total_estimator.state_dict(),
                "total_no_embeddings_estimator_state": self.total_no_embeddings_estimator.state_dict(),
                "group_estimator_states": {g: e.state_dict() for g, e in self.group_estimators.items()},
                "groups_present": list(self.groups_present),
            },
        }

    def _restore(self, attributes: dict[str, Any]) -> None:
        self.estimator = GradientNoiseScale(ema_decay=self.ema_decay, **attributes["estimator_state"])
        for name in ("samples", "tokens_per_example", "last_batch_size", "last_accumulation"):
            setattr(self, name, attributes[name])
        self.weights.steps_since_verified = attributes["steps_since_verified"]
        self.samples_from_start = attributes.get("samples_from_start", True)  # checkpoints from before it lack it
        # checkpoints from before validate_every lack both, from before the embeddings' variant the second
        for name in ("total_estimator", "total_no_embeddings_estimator"):
            if attributes.get(f"{name}_state") is not None:
                ema_decay = getattr(self, name).ema_decay
                setattr(self, name, GradientNoiseScale(ema_decay=ema_decay, **attributes[f"{name}_state"]))
        # checkpoints from before the norm groups lack them: those estimates start afresh
        for group, saved in (attributes.get("group_estimator_states") or {}).items():
            self.group_estimators[group] = GradientNoiseScale(ema_decay=self.ema_decay, **saved)
        self.groups_present = tuple(attributes.get("groups_present", ()))
        if "group_estimator_states" not in attributes and self.schedule == "gns" and self.gns_signal != "all":
            logger.warning(
                "GNSCallback: the checkpoint was saved before the norm groups existed; its batch followed the GNS of "
                "every patched norm (gns_signal='all'). From here on it follows gns_signal=%r, whose estimate starts "
                "afresh (pass gns_signal='all' to keep the old signal).",
                self.gns_signal,
            )
