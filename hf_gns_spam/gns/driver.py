"""The batch schedule driven through the Trainer's loop: which accumulation each group is fetched with, where a
resumed run restarts, when the run's budget ends, the expected number of steps and the learning rate's position.

:class:`ScheduleDriver` owns the :class:`~hf_gns_spam.gns.accumulation.AccumulationController` (the exact bookkeeping of
the Trainer's epoch loop), the schedule's rule (:class:`~hf_gns_spam.gns.schedule.BatchSizeSchedule` or anything with
its two methods, :class:`ScheduleRule`) and the plan of the steps left. It imports nothing from transformers: its event
methods take the Trainer's ``args``, ``state`` and ``control`` and read or set only their public fields
``args.gradient_accumulation_steps``, ``state.global_step``, ``state.max_steps`` and ``control.should_training_stop``;
the two things the Trainer has no public field for (the progress bar's total and the learning-rate schedule's position)
go through the functions it is given. ``GNSCallback`` calls it from the Trainer's events; the property tests
(``tests/support/trainer_loop_simulation.py``) call the same object from a simulation of the Trainer's loop, thousands
of runs, so what they test is what ships.

With a schedule the run's length is a budget in data: the Trainer's ``max_steps`` when ``train()`` starts (steps of
the minimum batch, from ``max_steps`` or ``num_train_epochs``), used up in fewer optimizer steps as the batch grows.
``state.max_steps`` is the expected number of optimizer steps: exact from the start for a rule whose targets are
foreseeable (``"linear"``, a function of the data consumed); otherwise the count if the batch stays as it is,
planned again whenever a decision departs from the plan. At the step that uses the budget, ``state.max_steps``
becomes that step before ``on_step_end``, so the Trainer's own end of training (``DefaultFlowCallback``: stop, the
final save and evaluation of the ``"steps"`` strategies; then the epoch's end) happens there.

The learning rate after each decision is the LR schedule at the progress in reference steps (the schedule of the
fixed minimum batch, in data), times (a / a_min)^lr_batch_power for the next step's accumulation a.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from hf_gns_spam.errors import AccumulationError
from hf_gns_spam.gns.accumulation import AccumulationController, EpochLoop

__all__ = ["ScheduleDriver", "ScheduleRule"]


class ScheduleRule(Protocol):
    """What the driver asks of a batch-size schedule (:class:`~hf_gns_spam.gns.schedule.BatchSizeSchedule`)."""

    kind: str
    min_batch_size: int
    max_batch_size: int
    foreseeable: bool  # every target is known in advance (the plan is then exact)

    def target_accumulation(
        self, current: int, step: int, samples: float, budget: float, gns: float, estimate_is_current: bool
    ) -> int: ...

    def foreseeable_target(self, current: int, samples: float, budget: float) -> int: ...


def _no_signal() -> tuple[float, bool]:
    return math.nan, False


class ScheduleDriver:
    """The accumulation of every group, from the schedule's targets, through the Trainer's loop.

    ``min_accumulation``: the accumulation the Trainer's loop is sized with (a_min); ``rule``: the schedule, or None
    for a constant a_min (the controller then only checks that every step is one fetched group); ``signal()``: the
    GNS a rule follows and whether it is current; ``show_total(total)``: show the expected number of steps (the
    progress bar); ``set_learning_rate(lr_scheduler, position, factor)``: put the LR schedule at ``position``
    reference steps, times ``factor``.

    Call :meth:`start` with the loop bounds of each ``train()``, :meth:`resume` once the restart point is known,
    then the ``on_*`` methods from the Trainer's events of the same names.
    """

    def __init__(
        self,
        min_accumulation: int,
        rule: ScheduleRule | None = None,
        *,
        lr_batch_power: float = 0.0,
        signal: Callable[[], tuple[float, bool]] = _no_signal,
        show_total: Callable[[int], None] = lambda total: None,
        set_learning_rate: Callable[[Any, float, float], None] = lambda lr_scheduler, position, factor: None,
    ) -> None:
        self.min_accumulation = min_accumulation
        self.rule = rule
        self.lr_batch_power = lr_batch_power
        self._signal = signal
        self._show_total = show_total
        self._set_learning_rate = set_learning_rate
        self.controller: AccumulationController | None = None
        self.resumed_mid_epoch = False  # the restored position and accumulation stand at the next epoch's begin
        # the expected accumulation of each optimizer step left, planned after step plan_start (with a rule)
        self.plan: list[int] = []
        self.plan_start = 0

    # ------------------------------------------------------------------------------------------ a train() call
    def start(self, loop: EpochLoop) -> None:
        """A ``train()`` call with these loop bounds begins (from its start, until :meth:`resume` says otherwise)."""
        self.controller = AccumulationController(self.min_accumulation, loop)
        self.resumed_mid_epoch = False

    def resume(
        self, args: Any, saved: dict[str, int] | None, epochs_trained: int, skip: int, ignore_data_skip: bool = False
    ) -> tuple[int, int]:
        """Where to restart: (epoch, micro-batches to skip in it). ``saved`` is :meth:`state_dict` of the checkpoint,
        or None for a fresh run or a checkpoint without it; ``epochs_trained`` and ``skip`` are the Trainer's own
        restart point, which is exact only while the accumulation has not changed, and is used when ``saved`` is
        None."""
        controller = self.controller
        if saved is None:
            if skip:
                controller.resume(epochs_trained, skip, args.gradient_accumulation_steps)
                self.resumed_mid_epoch = True
            else:
                controller.epoch = epochs_trained - 1  # on_epoch_begin starts epochs_trained
            return epochs_trained, skip
        epoch, micro, accumulation = saved["epoch"], saved["position"], saved["accumulation"]
        controller.accumulation = accumulation
        if micro >= controller.loop.micro_batches:  # saved at the end of an epoch: the next one starts
            # at the end of that epoch, as the uninterrupted run is when it starts the next: the same progress
            # (the linear schedule's target and the learning rate of the next epoch's first step)
            controller.epoch, controller.position = epoch, micro
            return epoch + 1, 0
        if micro == 0 or ignore_data_skip:  # the Trainer restarts the epoch from its beginning
            controller.epoch = epoch - 1
            return epoch, 0
        controller.resume(epoch, micro, accumulation)
        args.gradient_accumulation_steps = accumulation
        self.resumed_mid_epoch = True
        return epoch, micro

    def state_dict(self) -> dict[str, int] | None:
        """The position to restart from (None before the first ``train()``)."""
        return self.controller.state_dict() if self.controller else None

    # ------------------------------------------------------------------------------------------ the events
    def on_train_begin(self, state: Any) -> None:
        if self.rule is not None:
            self._plan_steps(state, epoch_starts=not self.resumed_mid_epoch)

    def on_epoch_begin(self, args: Any, state: Any, lr_scheduler: Any = None) -> None:
        if self.resumed_mid_epoch:  # the restored position and accumulation stand
            self.resumed_mid_epoch = False
            return
        args.gradient_accumulation_steps = self.controller.start_epoch(self._target(state))
        if self.rule is not None:
            self._follow_plan(state)
            if self.lr_batch_power:  # the epoch's first batch may differ
                self._set_position(lr_scheduler)

    def on_epoch_end(self, unstepped: int) -> None:
        """``unstepped``: micro-batches trained since the epoch's last optimizer step (must be none)."""
        self.controller.finish_epoch(unstepped)

    def on_optimizer_step(self, state: Any, consumed: int, fetched: int | None) -> None:
        """The step's group is complete: ``consumed`` micro-batches since the previous step, of a fetched group of
        ``fetched`` (checked). With a rule, whether it is the run's last step is known here, before ``on_step_end``,
        where ``DefaultFlowCallback`` applies the Trainer's own end-of-training rules when ``global_step >=
        state.max_steps``: so state.max_steps becomes the step the Trainer counts next when the budget is used, and
        is the planned total otherwise."""
        self.controller.finish_group(consumed, fetched)
        if self.rule is None:
            return
        step = state.global_step + 1  # the Trainer counts this step after on_optimizer_step
        self._total(state, step if self.controller.budget_used else self.plan_start + len(self.plan))

    def on_step_end(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None) -> None:
        """Stop at the budget, or set the next group's accumulation and learning rate."""
        if self.rule is None:
            return
        controller = self.controller
        if (state.global_step >= state.max_steps) != controller.budget_used:
            where = "here" if controller.budget_used else "later"
            raise AccumulationError(
                f"at optimizer step {state.global_step}, state.max_steps is {state.max_steps} where the batch "
                f"schedule's budget ends {where}: the Trainer would stop at the wrong step (did something else set "
                "state.max_steps?)"
            )
        if controller.budget_used:
            self._set_position(lr_scheduler)
            control.should_training_stop = True  # DefaultFlowCallback's doing; also without it, the budget ends here
            return
        args.gradient_accumulation_steps = controller.next_accumulation(self._target(state))
        self._set_position(lr_scheduler)
        if not controller.epoch_ended:  # else the next epoch's first decision is at on_epoch_begin
            self._follow_plan(state)

    # ------------------------------------------------------------------------------------------ decisions
    def _target(self, state: Any) -> int:
        """The accumulation the rule asks for now (a_min without a rule)."""
        if self.rule is None:
            return self.min_accumulation
        controller = self.controller
        gns, is_current = self._signal()
        return self.rule.target_accumulation(
            controller.accumulation, state.global_step, controller.progress, controller.loop.budget, gns, is_current
        )

    def _set_position(self, lr_scheduler: Any) -> None:
        """The next step's learning rate: the LR schedule at the progress in reference steps, times
        (a / a_min)^lr_batch_power."""
        position = min(self.controller.progress, self.controller.loop.budget)
        factor = (self.controller.accumulation / self.min_accumulation) ** self.lr_batch_power
        self._set_learning_rate(lr_scheduler, position, factor)

    # ------------------------------------------------------------------------------------------ the expected steps
    @property
    def expected_steps(self) -> int:
        """The optimizer steps the run is expected to take in all (state.max_steps, the progress bar's total)."""
        return self.plan_start + len(self.plan)

    def _plan_steps(self, state: Any, epoch_starts: bool) -> None:
        """Expect the accumulations of the rest of the run: the controller's decisions replayed for the rule's
        foreseeable targets."""
        rule = self.rule
        self.plan = self.controller.plan(
            lambda c: rule.foreseeable_target(c.accumulation, c.progress, c.loop.budget), epoch_starts
        )
        self.plan_start = state.global_step
        self._total(state, self.expected_steps)

    def _follow_plan(self, state: Any) -> None:
        """After a decision: the next step's accumulation is the planned one (the rest of the plan stands, and the
        total shown does not move), or the rule asked for more than foreseen: plan again from here."""
        index = state.global_step - self.plan_start
        if index >= len(self.plan) or self.plan[index] != self.controller.accumulation:
            self._plan_steps(state, epoch_starts=False)

    def _total(self, state: Any, total: int) -> None:
        state.max_steps = total
        self._show_total(total)

    def explanation(self) -> str:
        """Why the step count the Trainer printed at train start is not the number of steps the run takes."""
        rule = self.rule
        foreseen = (
            f"exact: the {rule.kind} schedule is known in advance"
            if rule.foreseeable
            else "if the batch stays as it is; updated when it grows"
        )
        return (
            f"GNSCallback(schedule={rule.kind!r}): with a batch schedule the run's length is a budget in data. "
            f"The Trainer's 'Total optimization steps = {self.controller.loop.budget:,}' counts steps of "
            f"min_batch_size={rule.min_batch_size} examples; the run trains on the same examples as that fixed-batch "
            "run and stops when they are used, in fewer optimizer steps as the batch grows (up to "
            f"max_batch_size={rule.max_batch_size}). Expected: {self.expected_steps:,} optimizer steps ({foreseen}), "
            "the total of state.max_steps and the progress bar."
        )
