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

The estimate and batch size are merged into the Trainer's own log record (so TensorBoard, W&B and
``state.log_history`` get them next to ``loss``, ``grad_norm`` and ``learning_rate``): ``gns``, ``gns_tokens``,
``gns_grad_sq``, ``gns_trace_sigma``, ``batch_size`` (global examples per optimizer step), ``grad_accum_steps``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_gns_spam.gns.estimator import GradientNoiseScale
from hf_gns_spam.patching import is_patched, set_example_scales_function
from hf_gns_spam.stats import per_example_grad_stats, reset_per_example_grad_stats

__all__ = ["GNSCallback"]

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
        schedule: ``None`` measures only. (The batch-size schedules ``"linear"`` and ``"gns"`` are not available
            yet.)
        ema_decay: decay of the EMAs of |G|² and tr Σ, per optimizer step.
        example_weighting: how each example is weighted in the model's loss: ``"tokens"`` (a mean over label
            tokens, the Trainer's causal-LM and seq2seq loss), ``"examples"`` (a mean over examples, e.g.
            sequence classification) or ``"auto"`` (tokens when the labels have a token dimension).

    Call ``patch_model(model)`` before building the Trainer; the callback measures the patched norms only.
    """

    def __init__(self, schedule: str | None = None, ema_decay: float = 0.99, example_weighting: str = "auto") -> None:
        if schedule is not None:
            raise NotImplementedError(
                f"GNSCallback(schedule={schedule!r}): batch-size schedules are not available yet; use schedule=None"
            )
        if example_weighting not in ("auto", "tokens", "examples"):
            raise ValueError(f"example_weighting must be 'auto', 'tokens' or 'examples', got {example_weighting!r}")
        self.schedule = schedule
        self.ema_decay = ema_decay
        self.example_weighting = example_weighting
        self.estimator = GradientNoiseScale(ema_decay=ema_decay)
        self.tokens_per_example = math.nan
        self.last_batch_size = 0
        self.history: list[dict[str, float]] = []  # per optimizer step: small, big, batch_size
        self._trainer: Trainer | None = None
        self._big: torch.Tensor | None = None
        self._label_tokens = torch.zeros(())
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

    # ----------------------------------------------------------------------------------------- measurement
    def _example_scales(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """c_b = 1/a_b² for one forward call of the model (set as the patched model's example-scales function)."""
        if not torch.is_grad_enabled():  # evaluation: no backward, nothing to scale or count
            return None
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
        device = stats[0].sum_sq.device if stats else torch.device("cpu")
        scaled_sum = sum((s.scaled_sum_sq for s in stats), torch.zeros((), device=device))
        examples = max((s.count for s in stats), default=torch.zeros((), device=device))
        totals = torch.stack([scaled_sum, examples, self._label_tokens.to(device).float()])
        totals = self._trainer.accelerator.reduce(totals, reduction="sum")
        loss_scale = self._loss_scale()
        factor_sq = (self._loss_factor() * loss_scale) ** 2
        total_scaled, batch_size, label_tokens = (float(v) for v in totals.tolist())
        big = float(self._big) / loss_scale**2 if self._big is not None else math.nan
        self._big = None
        self._label_tokens = torch.zeros((), device=device)
        reset_per_example_grad_stats(model)
        batch_size = round(batch_size)
        self.last_batch_size = batch_size
        if batch_size < 2:
            self.estimator.skipped += 1
            return
        small = total_scaled / factor_sq / batch_size
        self.history.append({"small": small, "big": big, "batch_size": batch_size})
        if label_tokens > 0:
            self.tokens_per_example = label_tokens / batch_size
        self.estimator.update(small, big, batch_size)

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
            },
        }

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step > 0 else None
        if isinstance(saved, dict) and "attributes" in saved:  # resuming: continue the estimate where it was
            attributes = saved["attributes"]
            self.estimator = GradientNoiseScale(ema_decay=self.ema_decay, **attributes["estimator_state"])
            self.tokens_per_example = attributes["tokens_per_example"]
            self.last_batch_size = attributes["last_batch_size"]
