"""Batch-size schedules: the global batch (examples per optimizer step) as a whole number of micro-batches.

A batch is ``unit × k`` where ``unit = per_device_train_batch_size × processes`` (one micro-batch on every
process) and k is the number of gradient-accumulation steps. Schedules never decrease the batch.

* ``"linear"`` (Gray et al. 2024): the batch grows linearly in samples consumed, from ``min_batch_size`` at the
  start to ``max_batch_size`` when the training budget is used: B(s) = B_min + (B_max − B_min)·s/S.
* ``"gns"`` (closed loop): every ``update_interval`` steps after the warm-up, the batch moves towards
  ``gns_multiplier × GNS`` (the smoothed gradient noise scale in examples), but by at most ``max_growth`` × the
  current batch per decision, so that one noisy estimate cannot lock the batch at B_max:

      k_new = max(k, min(round(clamp(gns_multiplier·GNS, B_min, B_max) / unit), floor(max_growth·k)))

  with k the current accumulation steps (batch = unit·k). An infinite GNS (the smoothed |G|² is not positive:
  noise dominates) grows by the cap; a GNS that is nan (no estimate yet) or not current (the latest step was
  skipped: a NaN loss, an overflow) makes no decision.

Targets are rounded to the nearest whole number of units and clamped to the bounds; the cap is rounded down.

The warm-up (``warmup_steps``), as ``TrainingArguments(warmup_steps=...)`` in transformers 5: a value ≥ 1 is a
number of optimizer steps before the first decision; a value in (0, 1) is a fraction of the run's budget in data (no
decision before ``warmup_steps × budget`` examples). The GNS of the first steps after initialisation is a transient
(benchmarks/critical_batch.py: the per-block norms' GNS starts at 20–45 and falls to 5–10 by 7–10% of the main job,
while the batch that pays is 8 there); a schedule that never decreases must not follow it, hence the default 0.1.

What can be foreseen (:meth:`BatchSizeSchedule.foreseeable_target`, from which the expected number of optimizer
steps is computed): ``"linear"``'s targets are a function of the data consumed, known for the whole run in advance;
``"gns"``'s depend on estimates still to be measured, so the best expectation is that the batch stays as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RULES", "SCHEDULES", "BatchSizeSchedule", "Rule", "follows_gns", "is_step_count"]


@dataclass(frozen=True)
class Rule:
    """What the rest of the package knows of a schedule rule; its targets are
    :meth:`BatchSizeSchedule.target_accumulation`'s branch for it. A new rule is a row here, that branch, and its
    options in :class:`~hf_gns_spam.gns.arguments.GNSConfig` (fields whose metadata names the rule)."""

    follows_gns: bool  # its decisions follow the measured GNS: it needs one (a norm with a gradient, B_min >= 2)
    foreseeable: bool  # its targets are a function of the data consumed, known for the whole run in advance


RULES: dict[str, Rule] = {
    "linear": Rule(follows_gns=False, foreseeable=True),
    "gns": Rule(follows_gns=True, foreseeable=False),
}
SCHEDULES = tuple(RULES)


def follows_gns(schedule: str | None) -> bool:
    """Whether the schedule named ``schedule`` (None: none) decides from the measured GNS."""
    return schedule is not None and RULES[schedule].follows_gns


def is_step_count(value: object) -> bool:
    """Whether ``value`` is an int >= 1 (not a bool): a number of optimizer steps."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class BatchSizeSchedule:
    kind: str
    min_batch_size: int
    max_batch_size: int
    unit: int  # examples per accumulation step across all processes
    update_interval: int = 10
    warmup_steps: float = 0  # >= 1: optimizer steps; in (0, 1): a fraction of the budget in data (module docstring)
    gns_multiplier: float = 1.0
    max_growth: float = 2.0  # a "gns" decision asks for at most max_growth × the current batch

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be None or one of {', '.join(map(repr, SCHEDULES))}, got {self.kind!r}")
        if self.unit < 1:
            raise ValueError(f"the batch unit (micro-batch x processes) must be positive, got {self.unit}")
        for name in ("min_batch_size", "max_batch_size"):
            value = getattr(self, name)
            if value < self.unit or value % self.unit:
                raise ValueError(
                    f"{name}={value} must be a positive multiple of per_device_train_batch_size x processes = "
                    f"{self.unit} (the batch grows by whole micro-batches on every process)"
                )
        if self.max_batch_size < self.min_batch_size:
            raise ValueError(f"max_batch_size={self.max_batch_size} < min_batch_size={self.min_batch_size}")
        if self.rule.follows_gns and self.min_batch_size < 2:
            raise ValueError(
                f"schedule={self.kind!r} needs min_batch_size >= 2: the noise scale is measured across examples"
            )
        if not is_step_count(self.update_interval):
            raise ValueError(f"update_interval must be an int >= 1 (optimizer steps), got {self.update_interval!r}")
        if not 0 < self.gns_multiplier < math.inf:
            raise ValueError(f"gns_multiplier must be a finite number > 0, got {self.gns_multiplier}")
        if not (0 <= self.warmup_steps < 1 or (1 <= self.warmup_steps < math.inf and self.warmup_steps % 1 == 0)):
            raise ValueError(
                f"warmup_steps must be a whole number of optimizer steps (>= 1) or a fraction of the run's data in "
                f"[0, 1), got {self.warmup_steps}"
            )
        if not 1.0 < self.max_growth < math.inf:
            raise ValueError(f"max_growth must be in (1, inf), got {self.max_growth}")
        least_growth = 1.0 + 1.0 / self.min_accumulation  # the cap must allow one more unit from the smallest batch
        if self.kind == "gns" and self.max_growth < least_growth:
            raise ValueError(
                f"schedule='gns' needs max_growth >= {least_growth:g} (min_batch_size={self.min_batch_size} + one "
                f"micro-batch x processes), got {self.max_growth}"
            )

    @property
    def rule(self) -> Rule:
        return RULES[self.kind]

    @property
    def foreseeable(self) -> bool:
        """Whether every target is known in advance (the driver's expected step count is then exact)."""
        return self.rule.foreseeable

    @property
    def min_accumulation(self) -> int:
        return self.min_batch_size // self.unit

    def _accumulation(self, batch_size: float) -> int:
        """Accumulation steps for a target batch: the nearest whole number of units, within the bounds."""
        clamped = min(max(batch_size, self.min_batch_size), self.max_batch_size)
        return max(self.min_accumulation, math.floor(clamped / self.unit + 0.5))

    def target_accumulation(
        self, current: int, step: int, samples: float, budget: float, gns: float, estimate_is_current: bool
    ) -> int:
        """The accumulation steps wanted after ``step`` optimizer steps and ``samples`` examples (never fewer).

        ``gns`` and ``estimate_is_current`` (False when the latest step was skipped) only matter for ``"gns"``.
        """
        if self.kind == "linear":
            progress = min(samples / budget, 1.0) if budget > 0 else 0.0
            wanted = self._accumulation(self.min_batch_size + (self.max_batch_size - self.min_batch_size) * progress)
        else:
            if (
                self.warming_up(step, samples, budget)
                or step % self.update_interval
                or math.isnan(gns)
                or not estimate_is_current
            ):
                return current
            # inf: the |G|² average is not positive, noise dominates: grow, by the cap
            cap = math.floor(self.max_growth * current + 1e-9)  # 1e-9: 1.4 x 45 is 62.99999999999999
            wanted = min(self._accumulation(self.gns_multiplier * gns), cap)
        return max(current, wanted)

    def warming_up(self, step: int, samples: float, budget: float) -> bool:
        """Whether ``"gns"`` still waits: fewer than ``warmup_steps`` optimizer steps done (a value >= 1), or less
        than that fraction of the budget consumed (a value in (0, 1))."""
        if self.warmup_steps >= 1:
            return step < self.warmup_steps
        return samples < self.warmup_steps * budget

    def foreseeable_target(self, current: int, samples: float, budget: float) -> int:
        """The target of a future decision as far as it is known now: ``"linear"``'s own (a function of the data
        consumed, ``samples``); for ``"gns"``, ``current``: its decisions follow measurements still to come, and
        until one asks for more, the batch stays as it is."""
        if not self.foreseeable:
            return current
        return self.target_accumulation(current, 0, samples, budget, math.nan, False)
