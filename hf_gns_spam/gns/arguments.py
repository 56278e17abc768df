"""The checks of :class:`~hf_gns_spam.gns.callback.GNSCallback`'s constructor arguments, without torch.

:func:`check_callback_arguments` is every check ``GNSCallback.__init__`` makes, and the only place they are made:
the callback calls it first, and the launcher (``hf-gns-spam launch``) calls it on its options before anything
imports torch, so that a value out of its range is reported at once, with the same message. It imports only the
torch-free :mod:`hf_gns_spam.gns.schedule` and :mod:`hf_gns_spam.gns.estimator`, whose own checks it runs:

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

The parameters and their defaults are ``GNSCallback.__init__``'s (tests/test_gns_callback.py compares the two), and
:data:`CALLBACK_DEFAULTS` gives them to the launcher's options and the main job's arguments, so the three share one
set of defaults. Those of the "gns" schedule are the ones benchmarks/critical_batch.py and
benchmarks/batch_schedule.py support (BENCHMARKS.md): follow the per-block norms' GNS (``gns_signal="block"``: the
final norm's GNS stays flat while the critical batch grows, and dominates the all-norm sum), smoothed over about
100 steps (``ema_decay=0.99``), times 0.75 (``gns_multiplier``: the block GNS was 1.34× the main job's critical
batch measured by branching at 0.0075 nats per window, a 0.02-nat allowance spread over the windows where the batch
is above its minimum; 0.6–1.1× it at 0.01 nats), with the learning rate × √(B / B_min) (``lr_batch_power=0.5``),
deciding every 10 steps once 10% of the run's data is consumed (``warmup_steps=0.1``: the GNS of the first steps is
a transient far above the batch that pays there, and the schedule never decreases).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, get_args

from hf_gns_spam.gns.estimator import GradientNoiseScale
from hf_gns_spam.gns.schedule import BatchSizeSchedule, is_step_count

__all__ = ["CALLBACK_DEFAULTS", "GNS_SIGNALS", "NORM_GROUPS", "GNSSignal", "NormGroup", "check_callback_arguments"]

# the groups of patched norms with their own GNS (hf_gns_spam.gns.groups decides each norm's group), in log order
NormGroup = Literal["block", "final", "other"]
NORM_GROUPS: tuple[NormGroup, ...] = get_args(NormGroup)
# which estimate a "gns" schedule follows: every patched norm ("all", the logged gns), or one group's
GNSSignal = Literal["all", "block", "final", "other"]
GNS_SIGNALS: tuple[GNSSignal, ...] = get_args(GNSSignal)


def check_callback_arguments(
    schedule: str | None = None,
    min_batch_size: int | None = None,
    max_batch_size: int | None = None,
    update_interval: int = 10,
    warmup_steps: float = 0.1,
    gns_multiplier: float = 0.75,
    max_growth: float = 2.0,
    lr_batch_power: float = 0.5,
    ema_decay: float = 0.99,
    verify_interval: int = 100,
    validate_every: int | None = None,
    gns_signal: GNSSignal = "block",
) -> None:
    """Raise ValueError, naming the argument and its valid range, for the first argument ``GNSCallback`` refuses
    (module docstring); return None when it accepts them all."""
    if schedule is not None:
        if min_batch_size is None or max_batch_size is None:
            raise ValueError(f"schedule={schedule!r} needs min_batch_size and max_batch_size (global examples)")
        # check everything but the unit now (it needs the TrainingArguments): unit 1 accepts any bounds
        BatchSizeSchedule(
            schedule, min_batch_size, max_batch_size, 1, update_interval, warmup_steps, gns_multiplier, max_growth
        )
    if not 0.0 <= lr_batch_power <= 1.0:
        raise ValueError(f"lr_batch_power must be in [0, 1] (0.5: square-root scaling), got {lr_batch_power}")
    if not is_step_count(verify_interval):
        raise ValueError(f"verify_interval must be an int >= 1 (optimizer steps), got {verify_interval!r}")
    bounds_given = min_batch_size is not None and max_batch_size is not None
    if schedule is None and bounds_given and max_batch_size < min_batch_size:  # unused, but contradictory
        raise ValueError(f"max_batch_size={max_batch_size} < min_batch_size={min_batch_size}")
    if validate_every is not None and not is_step_count(validate_every):
        raise ValueError(f"validate_every must be None (off) or an int >= 1 (optimizer steps), got {validate_every!r}")
    if gns_signal not in GNS_SIGNALS:
        raise ValueError(f"gns_signal must be one of {', '.join(map(repr, GNS_SIGNALS))}, got {gns_signal!r}")
    GradientNoiseScale(ema_decay=ema_decay)  # its own check of the range


# GNSCallback's keyword defaults (this signature's, which is GNSCallback.__init__'s), for the launcher and the main job
CALLBACK_DEFAULTS: dict[str, Any] = {
    name: parameter.default for name, parameter in inspect.signature(check_callback_arguments).parameters.items()
}
