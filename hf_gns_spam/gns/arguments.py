""":class:`GNSConfig`, the options of :class:`~hf_gns_spam.gns.callback.GNSCallback`: one typed definition with
their defaults, checks and help text, without torch.

``GNSCallback(**options)`` builds a :class:`GNSConfig`; the launcher (``hf-gns-spam launch``) makes its options
from the fields' metadata and builds one from them before anything imports torch, so that a value out of its range
is reported at once, with the same message; the callback saves :meth:`GNSConfig.as_dict` in checkpoints; the
README's options table is made from it (``scripts/options_table.py``, checked by a test). The checks, in
``__post_init__``, use only the torch-free :mod:`hf_gns_spam.gns.schedule` and :mod:`hf_gns_spam.gns.estimator`:

* with a schedule, both batch bounds are given and :class:`~hf_gns_spam.gns.schedule.BatchSizeSchedule` accepts
  them with a unit of 1 (every check but the one against the TrainingArguments' micro-batch × processes, which the
  callback makes when it meets the Trainer): the schedule's name, ``max_batch_size >= min_batch_size``,
  ``update_interval`` (an int), ``warmup_steps``, ``gns_multiplier`` (finite), ``max_growth``; without a schedule,
  bounds that are given must not contradict each other;
* ``lr_batch_power`` in [0, 1], ``verify_interval`` an int >= 1, ``validate_every`` None or an int >= 1;
* ``gns_signal`` one of :data:`GNS_SIGNALS` (``"all"``, or a norm group of :data:`NORM_GROUPS`; whether the
  model has that group is checked when the callback meets the model);
* ``ema_decay`` in [0, 1), as :class:`~hf_gns_spam.gns.estimator.GradientNoiseScale` requires (the whole model's
  estimator of ``validate_every`` decays by ``ema_decay``^N, in [0, 1) with it).

:data:`CALLBACK_DEFAULTS` gives the defaults to the main job's arguments. Those of the "gns" schedule are the ones
benchmarks/critical_batch.py and benchmarks/batch_schedule.py support (BENCHMARKS.md): follow the per-block norms'
GNS (``gns_signal="block"``: the final norm's GNS stays flat while the critical batch grows, and dominates the
all-norm sum), smoothed over about 100 steps (``ema_decay=0.99``), times 0.75 (``gns_multiplier``: the block GNS was
1.34× the main job's critical batch measured by branching at 0.0075 nats per window, a 0.02-nat allowance spread
over the windows where the batch is above its minimum; 0.6–1.1× it at 0.01 nats), with the learning rate × √(B /
B_min) (``lr_batch_power=0.5``), deciding every 10 steps once 10% of the run's data is consumed
(``warmup_steps=0.1``: the GNS of the first steps is a transient far above the batch that pays there, and the
schedule never decreases).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, get_args

from hf_gns_spam.gns.estimator import GradientNoiseScale
from hf_gns_spam.gns.schedule import SCHEDULES, BatchSizeSchedule, is_step_count

__all__ = ["CALLBACK_DEFAULTS", "GNS_SIGNALS", "NORM_GROUPS", "GNSConfig", "GNSSignal", "NormGroup"]

# the groups of patched norms with their own GNS (hf_gns_spam.gns.groups decides each norm's group), in log order
NormGroup = Literal["block", "final", "other"]
NORM_GROUPS: tuple[NormGroup, ...] = get_args(NormGroup)
# which estimate a "gns" schedule follows: every patched norm ("all", the logged gns), or one group's
GNSSignal = Literal["all", "block", "final", "other"]
GNS_SIGNALS: tuple[GNSSignal, ...] = get_args(GNSSignal)


_ANY_SCHEDULE = (None, *SCHEDULES)
_SCHEDULED = SCHEDULES
_MADE = ("kind", "unit")  # the BatchSizeSchedule fields that are not options: the schedule's name, the batch unit


def _option(flag: str, parse: Callable[[str], Any], schedules: tuple[str | None, ...], help_text: str) -> dict:
    """A field's metadata: the launcher's ``flag`` and how it parses a value, the schedules the option applies to,
    and its one-line help (the launcher's --help and the README's options table)."""
    return {"flag": flag, "parse": parse, "schedules": schedules, "help": help_text}


@dataclasses.dataclass(frozen=True)
class GNSConfig:
    """The options of :class:`~hf_gns_spam.gns.callback.GNSCallback`, validated at construction (a ValueError
    names the option and its valid range). ``GNSCallback(**options)`` builds one; the launcher's options
    (``hf-gns-spam launch --help``), the callback's saved state and the README's options table are made from its
    fields.

    Attributes:
        schedule: ``None`` measures only; ``"linear"`` ramps the batch in samples from ``min_batch_size`` to
            ``max_batch_size``; ``"gns"`` follows ``gns_multiplier`` × the smoothed GNS (never decreasing, at most
            ``max_growth`` × per decision).
        min_batch_size, max_batch_size: bounds of the global batch (examples per optimizer step, all processes);
            multiples of ``per_device_train_batch_size`` × processes (checked when the callback meets the
            TrainingArguments). Required with a schedule; training starts at ``min_batch_size``
            (``gradient_accumulation_steps`` is set from it); without one, given bounds must be ordered.
        update_interval: ``"gns"``: optimizer steps between two decisions (an int ≥ 1).
        warmup_steps: ``"gns"``: no decision before this many optimizer steps (a whole value ≥ 1) or before this
            fraction of the run's data (a value in (0, 1), as ``TrainingArguments.warmup_steps``): 0.1 lets the
            GNS's transient after initialisation pass (:mod:`hf_gns_spam.gns.schedule`).
        gns_multiplier: ``"gns"``: the batch target is this × the GNS in examples (finite, > 0).
        max_growth: ``"gns"``: the most one decision may multiply the batch by (> 1).
        lr_batch_power: with a schedule, the learning rate is the LR schedule at the data consumed times
            (B / min_batch_size)^lr_batch_power for the step's batch B, in [0, 1]: 0.5 (square-root scaling) lets a
            larger batch take larger steps (benchmarks/batch_schedule.py: without it a growing batch saved no
            optimizer steps there); 0 keeps the schedule in data of a fixed batch.
        ema_decay: decay of the EMAs of |G|² and tr Σ per optimizer step, in [0, 1) (0.99: a horizon of about 100
            steps; benchmarks/critical_batch.py: the smoother estimate follows the critical batch more closely).
        verify_interval: optimizer steps (an int ≥ 1) between two checks that the loss still weights its examples
            as identified (each recomputes one micro-batch's per-example losses and observes the gradient that
            reaches its logits, :mod:`hf_gns_spam.gns.logit_gradients`). Every micro-batch is checked until one
            whose examples have unequal label-token counts confirms the weighting.
        validate_every: ``None`` (off) or N ≥ 1: every N-th optimizer step, also estimate the GNS of all trainable
            parameters from their per-example gradients and log it as ``gns_total`` (``_grad_sq``,
            ``_trace_sigma``), and without the embeddings as ``gns_total_no_embeddings``, to check the norms'
            estimate. Cost: one extra forward and backward per example of the validated step, at batch size 1;
            training itself is unchanged. Not with FSDP, reentrant gradient checkpointing or TRL's pair trainers.
        gns_signal: ``"gns"``: the estimate the batch follows: ``"block"`` the GNS of the norms inside the repeated
            blocks, logged as ``gns/block``; ``"final"`` or ``"other"`` that group's (:mod:`hf_gns_spam.gns.groups`);
            ``"all"`` every patched norm's, logged as ``gns``. The model must have the group (checked when the
            callback meets it). Why "block": the final norm carries most of the norms' |G|², and its GNS stays flat
            while the critical batch grows (benchmarks/critical_batch.py, BENCHMARKS.md).
    """

    schedule: str | None = dataclasses.field(
        default=None,
        metadata=_option("--gns-schedule", str, _ANY_SCHEDULE, f"batch-size schedule: none, {', '.join(SCHEDULES)}"),
    )
    min_batch_size: int | None = dataclasses.field(
        default=None,
        metadata=_option("--min-batch-size", int, _SCHEDULED,
                         "global batch (examples per optimizer step, all processes) to start from; launcher default: "
                         "the script's per_device_train_batch_size x processes x gradient_accumulation_steps"),
    )  # fmt: skip
    max_batch_size: int | None = dataclasses.field(
        default=None,
        metadata=_option("--max-batch-size", int, _SCHEDULED,
                         "global batch the schedule may grow to; launcher default: 8 x --min-batch-size"),
    )  # fmt: skip
    update_interval: int = dataclasses.field(
        default=10,
        metadata=_option("--gns-update-interval", int, ("gns",), "optimizer steps between batch-size decisions"),
    )
    warmup_steps: float = dataclasses.field(
        default=0.1,
        metadata=_option("--gns-warmup-steps", float, ("gns",),
                         "no batch-size decision before this many optimizer steps (>= 1) or this fraction of the "
                         "data (< 1)"),
    )  # fmt: skip
    gns_multiplier: float = dataclasses.field(
        default=0.75, metadata=_option("--gns-multiplier", float, ("gns",), "the batch follows this x the GNS")
    )
    max_growth: float = dataclasses.field(
        default=2.0,
        metadata=_option("--gns-max-growth", float, ("gns",), "the most one decision multiplies the batch by"),
    )
    lr_batch_power: float = dataclasses.field(
        default=0.5,
        metadata=_option("--gns-lr-batch-power", float, _SCHEDULED,
                         "learning rate x (batch / min batch)^p on top of its schedule (0.5: square-root scaling; 0: "
                         "the schedule in data of a fixed batch)"),
    )  # fmt: skip
    ema_decay: float = dataclasses.field(
        default=0.99,
        metadata=_option("--gns-ema-decay", float, _ANY_SCHEDULE,
                         "decay of the EMAs of |G|^2 and tr(Sigma), per optimizer step"),
    )  # fmt: skip
    verify_interval: int = dataclasses.field(
        default=100,
        metadata=_option("--gns-verify-interval", int, _ANY_SCHEDULE,
                         "optimizer steps between two checks of how the loss weights its examples"),
    )  # fmt: skip
    validate_every: int | None = dataclasses.field(
        default=None,
        metadata=_option("--gns-validate-every", int, _ANY_SCHEDULE,
                         "also log the whole model's GNS (gns_total) every N optimizer steps (costly; off by default)"),
    )  # fmt: skip
    gns_signal: GNSSignal = dataclasses.field(
        default="block",
        metadata=_option("--gns-signal", str, ("gns",),
                         "the GNS the batch follows: all (every patched norm, the logged gns), block, final or other"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        """Raise ValueError, naming the option and its valid range, for the first option out of range (the
        module's docstring lists the checks)."""
        schedule, min_batch, max_batch = self.schedule, self.min_batch_size, self.max_batch_size
        if schedule is not None:
            if min_batch is None or max_batch is None:
                raise ValueError(f"schedule={schedule!r} needs min_batch_size and max_batch_size (global examples)")
            self.batch_schedule(1)  # everything but the unit (it needs the TrainingArguments): 1 accepts any bounds
        if not 0.0 <= self.lr_batch_power <= 1.0:
            raise ValueError(f"lr_batch_power must be in [0, 1] (0.5: square-root scaling), got {self.lr_batch_power}")
        if not is_step_count(self.verify_interval):
            raise ValueError(f"verify_interval must be an int >= 1 (optimizer steps), got {self.verify_interval!r}")
        if schedule is None and min_batch is not None and max_batch is not None and max_batch < min_batch:
            raise ValueError(f"max_batch_size={max_batch} < min_batch_size={min_batch}")  # unused, but contradictory
        if self.validate_every is not None and not is_step_count(self.validate_every):
            raise ValueError(
                f"validate_every must be None (off) or an int >= 1 (optimizer steps), got {self.validate_every!r}"
            )
        if self.gns_signal not in GNS_SIGNALS:
            raise ValueError(f"gns_signal must be one of {', '.join(map(repr, GNS_SIGNALS))}, got {self.gns_signal!r}")
        GradientNoiseScale(ema_decay=self.ema_decay)  # its own check of the range

    def batch_schedule(self, unit: int) -> BatchSizeSchedule | None:
        """The schedule (None without one) in whole micro-batches of ``unit`` examples (the per-device batch × the
        processes), checked against it."""
        if self.schedule is None:
            return None
        # every field of the schedule but its kind and unit is the option of the same name
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(BatchSizeSchedule) if f.name not in _MADE}
        return BatchSizeSchedule(kind=self.schedule, unit=unit, **options)

    def as_dict(self) -> dict[str, Any]:
        """The options by name (the callback's saved state, ``GNSCallback(**config.as_dict())``)."""
        return dataclasses.asdict(self)


# the defaults by option name, for the main job's arguments and the launcher's --help
CALLBACK_DEFAULTS: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(GNSConfig)}
