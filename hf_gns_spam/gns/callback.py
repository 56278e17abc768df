"""``GNSCallback``: the gradient noise scale of a patched model, every optimizer step, inside ``Trainer.train()``.

Per optimizer step (formulas in :mod:`hf_gns_spam.gns.estimator`), over the parameters of the patched norms:

* small: the mean over the step's B examples (all micro-batches, all processes) of ‖g_b‖², g_b the gradient of
  example b's own loss. The norms measure each example's contribution G_b to the gradient of the tensor that was
  back-propagated; G_b = κ·a_b·g_b, with a_b the example's weight in the model's loss (n_b/N for a mean over label
  tokens, n_b of them in example b and N = ``num_items_in_batch``; 1/B for a mean over examples) and κ the factor
  the Trainer applies on top (× processes with ``average_tokens_across_devices``, ÷ accumulation steps for a model
  that does not take ``num_items_in_batch``, × the fp16 loss scale). The patched norms weight each ‖G_b‖² by
  c_b = 1/a_b² inside their backward, and the callback divides by κ².
* big: ‖G_B‖² of the same parameters' accumulated gradient, after the all-reduce and before clipping (read where
  the Trainer clips, divided by the fp16 loss scale²).

With ``schedule="linear"`` or ``"gns"`` (:mod:`hf_gns_spam.gns.schedule`) the callback also grows the batch by
changing ``args.gradient_accumulation_steps`` during ``Trainer.train()``, keeping every step exact
(``reference/hf_trainer.md`` §2): training starts at the smallest accumulation, so the Trainer's per-epoch loop
bounds are upper bounds and no data is dropped; a change is applied only where the micro-batches consumed in the
epoch are a multiple of the new accumulation (deferred otherwise), so optimizer steps never straddle the Trainer's
fetched groups (loss normalisation and DDP synchronisation stay right); the learning-rate schedule is driven by
samples consumed (its step is samples / ``min_batch_size``), so in data it is the same as with a fixed batch;
training stops when the sample budget (``num_train_epochs`` × the data, or ``max_steps`` × ``min_batch_size``) is
used; ``state.max_steps`` and the progress bar follow the expected number of steps; and a resumed run restarts
at the exact micro-batch, with the estimate and the schedule restored.

The estimate and batch size are merged into the Trainer's own log record (so TensorBoard, W&B and
``state.log_history`` get them next to ``loss``, ``grad_norm`` and ``learning_rate``): ``gns``, ``gns_tokens``,
``gns_grad_sq``, ``gns_trace_sigma``, ``batch_size`` (global examples per optimizer step), ``grad_accum_steps``.
"""

from __future__ import annotations

import collections
import inspect
import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import has_length

from hf_gns_spam.gns.estimator import GradientNoiseScale
from hf_gns_spam.gns.schedule import BatchSizeSchedule
from hf_gns_spam.patching import is_patched, set_example_scales_function
from hf_gns_spam.stats import per_example_grad_stats, reset_per_example_grad_stats

__all__ = ["GNSCallback"]

HISTORY_LENGTH = 10_000
METRIC_NAMES = ("gns", "gns_tokens", "gns_grad_sq", "gns_trace_sigma", "batch_size", "grad_accum_steps")


def _find_trainer(callback: TrainerCallback) -> Trainer:
    """The Trainer whose callback handler is calling ``callback`` right now (callbacks get no trainer argument)."""
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
            return candidate
        frame = frame.f_back
    raise RuntimeError("GNSCallback must be given to the Trainer: Trainer(..., callbacks=[GNSCallback(...)])")


def label_token_weights(labels: torch.Tensor, shift: bool, num_items_in_batch: Any) -> torch.Tensor:
    """a_b = n_b / N: each example's weight in a loss that is a mean over label tokens (−100 = ignored)."""
    counted = labels[:, 1:] if shift else labels
    tokens = (counted != -100).reshape(labels.shape[0], -1).sum(1).float()
    total = tokens.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).to(tokens)
    return tokens / total


class GNSCallback(TrainerCallback, ExportableState):
    """Estimate the gradient noise scale every optimizer step and log it with the Trainer's metrics.

    Args:
        schedule: ``None`` measures only; ``"linear"`` ramps the batch in samples from ``min_batch_size`` to
            ``max_batch_size``; ``"gns"`` follows ``gns_multiplier`` × the smoothed GNS (never decreasing).
        min_batch_size, max_batch_size: bounds of the global batch (examples per optimizer step, all processes);
            multiples of ``per_device_train_batch_size`` × processes. Required with a schedule; training starts
            at ``min_batch_size`` (``gradient_accumulation_steps`` is set from it).
        update_interval: ``"gns"``: optimizer steps between two decisions.
        warmup_steps: ``"gns"``: optimizer steps before the first decision.
        gns_multiplier: ``"gns"``: the batch target is this × the GNS in examples.
        ema_decay: decay of the EMAs of |G|² and tr Σ, per optimizer step.
        example_weighting: how each example is weighted in the model's loss: ``"tokens"`` (a mean over label
            tokens, the Trainer's causal-LM and seq2seq loss), ``"examples"`` (a mean over examples, e.g.
            sequence classification) or ``"auto"`` (tokens when the labels have a token dimension).

    Call ``patch_model(model)`` before building the Trainer; the callback measures the patched norms only. Pass
    it in ``Trainer(callbacks=[...])``: it finds that Trainer when the Trainer calls ``on_init_end`` and installs
    its hooks on that instance (no Trainer subclass).
    """

    def __init__(
        self,
        schedule: str | None = None,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        update_interval: int = 10,
        warmup_steps: int = 0,
        gns_multiplier: float = 1.0,
        ema_decay: float = 0.99,
        example_weighting: str = "auto",
    ) -> None:
        if example_weighting not in ("auto", "tokens", "examples"):
            raise ValueError(f"example_weighting must be 'auto', 'tokens' or 'examples', got {example_weighting!r}")
        if schedule is not None:
            if min_batch_size is None or max_batch_size is None:
                raise ValueError(f"schedule={schedule!r} needs min_batch_size and max_batch_size (global examples)")
            # check everything but the unit now (it needs the TrainingArguments): unit 1 accepts any bounds
            BatchSizeSchedule(
                schedule, min_batch_size, max_batch_size, 1, update_interval, warmup_steps, gns_multiplier
            )
        self.schedule = schedule
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.update_interval = update_interval
        self.warmup_steps = warmup_steps
        self.gns_multiplier = gns_multiplier
        self.ema_decay = ema_decay
        self.example_weighting = example_weighting
        self.batch_schedule: BatchSizeSchedule | None = None
        # schedule position (saved in checkpoints)
        self.accumulation = 0  # gradient-accumulation steps in force
        self.epoch_index = -1
        self.micro_in_epoch = 0  # micro-batches consumed in the current epoch (this process)
        self.samples = 0  # examples consumed, all processes
        self.budget = 0  # the training budget in examples
        self.steps_in_epoch = 0
        self._resumed_mid_epoch = False
        self.estimator = GradientNoiseScale(ema_decay=ema_decay)
        self.tokens_per_example = math.nan
        self.last_batch_size = 0
        # the latest optimizer steps' raw inputs to the estimator: small, big, batch_size (bounded: long runs)
        self.history: collections.deque[dict[str, float]] = collections.deque(maxlen=HISTORY_LENGTH)
        self._trainer: Trainer | None = None
        self._big: torch.Tensor | None = None
        self._label_tokens = torch.zeros(())
        self._examples_seen = 0  # examples in this optimizer step's forwards, this process
        self._loss_shifts_labels = True

    # ----------------------------------------------------------------------------------------- installation
    def on_init_end(self, args, state, control, model=None, **kwargs):
        trainer = _find_trainer(self)
        self._trainer = trainer
        if not any(is_patched(m) for m in trainer.model.modules()):
            raise ValueError("GNSCallback found no patched normalization layer: call patch_model(model) first")
        self._loss_shifts_labels = self._shifts_labels(trainer.model)
        set_example_scales_function(trainer.model, self._example_scales)
        self._wrap_clip_grad_norm(trainer)
        self._wrap_log(trainer)
        self._wrap_init_training_state(trainer)
        if self.schedule is not None:
            if trainer.is_deepspeed_enabled:
                raise ValueError(
                    "GNSCallback batch-size schedules do not work with DeepSpeed (its accumulation is fixed)"
                )
            unit = args.per_device_train_batch_size * args.world_size
            self.batch_schedule = BatchSizeSchedule(
                self.schedule,
                self.min_batch_size,
                self.max_batch_size,
                unit,
                self.update_interval,
                self.warmup_steps,
                self.gns_multiplier,
            )
            args.gradient_accumulation_steps = self.batch_schedule.min_accumulation

    @staticmethod
    def _shifts_labels(model: nn.Module) -> bool:
        """Whether the model's own loss predicts token t+1 from t (so labels[:, 0] never counts).

        Read from the loss function the model actually calls, not from the Trainer's token counting (which
        decides from ``loss_type`` and, for e.g. GPT-2, counts one label too many per example).
        """
        from transformers.loss.loss_utils import ForCausalLMLoss

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(inner, "config", None)
        return getattr(inner, "loss_function", None) is ForCausalLMLoss and not getattr(
            config, "is_encoder_decoder", False
        )

    def _wrap_log(self, trainer: Trainer) -> None:
        original_log = trainer.log

        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and self.estimator.updates + self.estimator.skipped > 0:
                logs = {**logs, **self.metrics()}
            original_log(logs, *args, **kwargs)

        trainer.log = log

    def _wrap_clip_grad_norm(self, trainer: Trainer) -> None:
        accelerator = trainer.accelerator
        original_clip = accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._measure_big()  # before clipping changes the gradients
            return original_clip(parameters, max_norm, *args, **kwargs)

        accelerator.clip_grad_norm_ = clip_grad_norm_

    def _wrap_init_training_state(self, trainer: Trainer) -> None:
        """On resume, restore this callback and start at its exact micro-batch (the Trainer assumes a fixed
        accumulation when it computes where to resume)."""
        original = trainer._init_training_state

        def _init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        ):
            epochs_trained, skip = original(
                max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
            )
            saved = trainer.state.stateful_callbacks.get(type(self).__name__) if resume_from_checkpoint else None
            if isinstance(saved, dict) and "attributes" in saved:
                self._restore(saved["attributes"])
                if self.batch_schedule is not None:
                    if self.micro_in_epoch >= self.steps_in_epoch:  # saved at the very end of an epoch
                        epochs_trained, skip = self.epoch_index + 1, 0
                    else:
                        epochs_trained, skip = self.epoch_index, self.micro_in_epoch
                    self._resumed_mid_epoch = skip > 0
                    trainer.args.gradient_accumulation_steps = self.accumulation
                    if trainer.args.ignore_data_skip:
                        skip = 0
            return epochs_trained, skip

        trainer._init_training_state = _init_training_state

    # ----------------------------------------------------------------------------------------- schedule
    def on_train_begin(self, args, state, control, train_dataloader=None, lr_scheduler=None, **kwargs):
        if self.batch_schedule is None or state.global_step > 0:
            return
        self.accumulation = self.batch_schedule.min_accumulation
        args.gradient_accumulation_steps = self.accumulation
        self.epoch_index, self.micro_in_epoch, self.samples = -1, 0, 0
        unit = self.batch_schedule.unit
        if has_length(train_dataloader):
            self.steps_in_epoch = len(train_dataloader)
        else:  # an iterable dataset: the Trainer's "epoch" is max_steps groups of the starting accumulation
            self.steps_in_epoch = args.max_steps * self.batch_schedule.min_accumulation
        if args.max_steps > 0:
            self.budget = args.max_steps * self.min_batch_size
        else:  # an upper bound (exact when every micro-batch is full): never stops the Trainer early
            self.budget = math.ceil(args.num_train_epochs) * self.steps_in_epoch * unit
        self._update_horizon(state)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.batch_schedule is None:
            return
        if self._resumed_mid_epoch:  # keep the restored position inside this epoch
            self._resumed_mid_epoch = False
        else:
            self.epoch_index += 1
            self.micro_in_epoch = 0
            self._maybe_grow(state)
        args.gradient_accumulation_steps = self._accumulation_for_next_step()

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_in_epoch += 1

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if self.batch_schedule is None:
            return
        self.micro_in_epoch += 1
        self.samples += self.last_batch_size
        self._follow_samples(lr_scheduler)
        if args.max_steps > 0 and self.samples >= self.budget:
            control.should_training_stop = True
        self._maybe_grow(state)
        args.gradient_accumulation_steps = self._accumulation_for_next_step()
        self._update_horizon(state)

    def _accumulation_for_next_step(self) -> int:
        """The schedule's accumulation, but no more than the micro-batches left in the Trainer's epoch: the Trainer
        always syncs at the epoch's last micro-batch (for an iterable dataset, its "epoch" is the budget), so the
        last group must be fetched with exactly that size to be normalised right."""
        left = self.steps_in_epoch - self.micro_in_epoch
        return min(self.accumulation, left) if self.steps_in_epoch and left > 0 else self.accumulation

    def _maybe_grow(self, state) -> None:
        """Apply the schedule's target if the epoch position is aligned with it (else wait for a later step)."""
        wanted = self.batch_schedule.target_accumulation(
            self.accumulation, state.global_step, self.samples, self.budget, self.estimator.gns
        )
        if wanted > self.accumulation and self.micro_in_epoch % wanted == 0:
            self.accumulation = wanted

    def _follow_samples(self, lr_scheduler) -> None:
        """Put the LR schedule at step samples / min_batch_size (the same schedule in data as a fixed batch)."""
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        position = self.samples / self.min_batch_size
        lr_scheduler.last_epoch = position
        for group, base_lr, factor in zip(
            lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base_lr * factor(position)
        lr_scheduler._last_lr = [group["lr"] for group in lr_scheduler.optimizer.param_groups]

    def _update_horizon(self, state) -> None:
        """state.max_steps = the steps still needed at the current batch (an upper bound: the batch only grows)."""
        batch = self.accumulation * self.batch_schedule.unit
        remaining = max(self.budget - self.samples, 0)
        state.max_steps = state.global_step + max(math.ceil(remaining / batch), 1 if remaining else 0)
        for callback in self._trainer.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None)
            if bar is not None:
                bar.total = state.max_steps
                bar.refresh()

    # ----------------------------------------------------------------------------------------- measurement
    def _example_scales(self, batch_size: int | None, kwargs: dict) -> torch.Tensor | None:
        """c_b = 1/a_b² for one forward call of the model (set as the patched model's example-scales function);
        also counts the examples and label tokens of the optimizer step."""
        if not torch.is_grad_enabled():  # evaluation: no backward, nothing to scale or count
            return None
        self._examples_seen += batch_size or 0
        if isinstance(kwargs.get("shift_labels"), torch.Tensor):  # padding-free collators give them shifted
            labels, shift = kwargs["shift_labels"], False
        else:
            labels, shift = kwargs.get("labels"), self._loss_shifts_labels
        if not isinstance(labels, torch.Tensor):
            return None
        batch = labels.shape[0]
        by_tokens = self.example_weighting == "tokens" or (self.example_weighting == "auto" and labels.dim() >= 2)
        if not by_tokens:
            return torch.full((batch,), float(batch) ** 2, device=labels.device)
        weights = label_token_weights(labels, shift, kwargs.get("num_items_in_batch"))
        counted = labels[:, 1:] if shift else labels
        self._label_tokens = self._label_tokens.to(labels.device) + (counted != -100).sum()
        return torch.where(weights > 0, weights.clamp_min(1e-30).reciprocal().square(), 0.0)

    def _loss_factor(self) -> float:
        """κ: what the Trainer multiplies the model's loss by before the backward (fp16 scale excluded)."""
        trainer = self._trainer
        accepts_loss_kwargs = trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None
        if not accepts_loss_kwargs:
            return 1.0 / trainer.current_gradient_accumulation_steps
        if trainer.args.average_tokens_across_devices and trainer.accelerator.num_processes > 1:
            return float(trainer.accelerator.num_processes // trainer.get_tp_size())
        return 1.0

    def _loss_scale(self) -> float:
        scaler = getattr(self._trainer.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _norm_parameters(self) -> list[nn.Parameter]:
        stats = per_example_grad_stats(self._trainer.model)
        return [p for n, p in self._trainer.model.named_parameters() if n in stats and p.grad is not None]

    def _measure_big(self) -> None:
        grads = [p.grad for p in self._norm_parameters()]
        self._big = sum(g.float().square().sum() for g in grads) if grads else None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._big is None:  # clip_grad_norm_ was not called (DeepSpeed, mixed meshes): no clipping happened
            self._measure_big()
        model = self._trainer.model
        stats = list(per_example_grad_stats(model).values())
        device = stats[0].sum_sq.device if stats else self._trainer.args.device
        zero = torch.zeros((), device=device)
        scaled_sum = sum((s.scaled_sum_sq for s in stats), zero)
        measured_examples = max((s.count for s in stats), default=zero)
        local = [scaled_sum, measured_examples, self._label_tokens.to(device).float(), zero + self._examples_seen]
        totals = self._trainer.accelerator.reduce(torch.stack(local), reduction="sum")
        total_scaled, measured_examples, label_tokens, batch_size = (float(v) for v in totals.tolist())
        big = self._big
        self._big, self._examples_seen = None, 0
        self._label_tokens = torch.zeros((), device=device)
        reset_per_example_grad_stats(model)

        self.last_batch_size = round(batch_size)
        if measured_examples < 2 or big is None:  # frozen norms (LoRA/QLoRA) or a 1-example step: no estimate
            self.estimator.skipped += 1
            return
        loss_scale = self._loss_scale()
        small = total_scaled / (self._loss_factor() * loss_scale) ** 2 / measured_examples
        big = float(big) / loss_scale**2
        self.history.append({"small": small, "big": big, "batch_size": round(measured_examples)})
        if label_tokens > 0:
            self.tokens_per_example = label_tokens / measured_examples
        self.estimator.update(small, big, round(measured_examples))

    # ----------------------------------------------------------------------------------------- reporting
    def metrics(self) -> dict[str, float]:
        gns = self.estimator.gns
        return {
            "gns": gns,
            "gns_tokens": gns * self.tokens_per_example,
            "gns_grad_sq": self.estimator.grad_sq,
            "gns_trace_sigma": self.estimator.trace_sigma,
            "batch_size": self.last_batch_size,
            "grad_accum_steps": self._trainer.args.gradient_accumulation_steps if self._trainer else math.nan,
        }

    def state(self) -> dict:
        return {
            "args": {
                "schedule": self.schedule,
                "min_batch_size": self.min_batch_size,
                "max_batch_size": self.max_batch_size,
                "update_interval": self.update_interval,
                "warmup_steps": self.warmup_steps,
                "gns_multiplier": self.gns_multiplier,
                "ema_decay": self.ema_decay,
                "example_weighting": self.example_weighting,
            },
            "attributes": {
                "estimator_state": {
                    "grad_sq_ema": self.estimator.grad_sq_ema,
                    "trace_sigma_ema": self.estimator.trace_sigma_ema,
                    "updates": self.estimator.updates,
                    "skipped": self.estimator.skipped,
                },
                "tokens_per_example": self.tokens_per_example,
                "last_batch_size": self.last_batch_size,
                "accumulation": self.accumulation,
                "epoch_index": self.epoch_index,
                "micro_in_epoch": self.micro_in_epoch,
                "samples": self.samples,
                "budget": self.budget,
                "steps_in_epoch": self.steps_in_epoch,
            },
        }

    def _restore(self, attributes: dict[str, Any]) -> None:
        self.estimator = GradientNoiseScale(ema_decay=self.ema_decay, **attributes["estimator_state"])
        for name in ("tokens_per_example", "last_batch_size", "accumulation", "epoch_index", "micro_in_epoch"):
            setattr(self, name, attributes[name])
        for name in ("samples", "budget", "steps_in_epoch"):
            setattr(self, name, attributes[name])
