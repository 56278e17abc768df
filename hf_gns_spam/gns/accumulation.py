"""Which ``gradient_accumulation_steps`` the Trainer must fetch with next, so that a growing batch stays exact.

Pure bookkeeping (no transformers import), driven by :class:`hf_gns_spam.gns.callback.GNSCallback` and tested
against a simulation of the Trainer's epoch loop (``tests/support/trainer_loop_simulation.py``).

The Trainer's epoch loop (transformers 5.x ``Trainer._run_epoch``) with S micro-batches per epoch on each process
(``steps_in_epoch``) and a loop of n fetches (``num_update_steps_per_epoch``, fixed when ``train()`` starts) does,
for fetch k = 0 … n−1 with a = ``args.gradient_accumulation_steps`` read at that moment:

* fetch ``a`` micro-batches (the last fetch, k = n−1, fetches ``r = S mod a₀`` or ``a₀``, a₀ = the accumulation
  when the epoch began), fewer if the epoch's data runs out, none once it has. A map-style dataloader's data runs
  out at S; an iterable dataset has no length, so the Trainer sets S = ``max_steps`` × a_min and n = ``max_steps``
  (its "epoch" is the whole run), and its data goes on past S;
* for the micro-batch at epoch position ``step`` (0-based): synchronise and step the optimizer when
  ``(step + 1) mod a = 0`` or ``step + 1 = S``; call ``on_step_begin`` when ``step mod a = 0``.

A fetched group of g micro-batches starting at position p is one exact optimizer step (the loss normalised by its
own label tokens, DDP gradients all-reduced once, at its last micro-batch) iff the optimizer steps exactly at its
last micro-batch. With **p mod a = 0** and g = min(a, S − p) that is always so: the next multiple of a after p is
p + a, which is the group's end or lies beyond the epoch's end. So the controller only ever chooses an
accumulation a that divides the epoch position p (any a at p = 0), and never one below the accumulation the
Trainer's loop was sized with (a_min), so that the loop's n fetches always cover the epoch: with every group at
least a_min, the data runs out no later than the last fetch, and the last fetch's r then covers what is left.
Every a is moreover a multiple of a_min, so every position inside an epoch is one too (see the budget below).

Budget and progress are counted in *reference steps*, the optimizer steps of the same run at a fixed batch of
a_min micro-batches (the steps the Trainer's own ``max_steps`` counts when ``train()`` starts at a_min):

    progress(e, p) = e·n + (n if p = S else p / a_min)

so the learning-rate schedule, driven by progress, is the fixed-batch schedule in data; the budget is the
Trainer's ``max_steps`` (fractional ``num_train_epochs`` included). In the epoch e where it ends, the budget is
B = min(a_min·(budget − e·n), S) micro-batches in, and a group that would pass it is cut to land on it: the
largest multiple of a_min in [a_min, cap] that divides p, cap = B − p. The cut matters at B = S too for an iterable
dataset, whose group reaching past S would be fetched whole but stepped at S, in its middle (a map-style epoch's
data ends at S, which cuts its last group exactly: ``EpochLoop.data_ends_with_epoch``). As p and, when B < S or S
is a multiple of a_min, B are multiples of a_min, a_min always qualifies and the run stops exactly at the budget
(progress = ``max_steps``); otherwise B = S ends a map-style epoch's data, which cuts the last group itself.

:meth:`AccumulationController.plan` replays these decisions on a copy of the controller, for a target that is a
function of the controller's state: the accumulation of every optimizer step left, so the number of steps the run
will take (exact for a schedule known in advance, such as a linear ramp in data; for one that depends on
measurements still to come, the count if the batch stays as it is).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from hf_gns_spam.errors import AccumulationError

__all__ = ["AccumulationController", "AccumulationError", "EpochLoop"]


@dataclass(frozen=True)
class EpochLoop:
    """The Trainer's loop bounds for one ``train()`` call, as it computed them (``set_initial_training_values``)."""

    micro_batches: int  # S = steps_in_epoch: micro-batches each process's dataloader yields per epoch
    fetches: int  # n = num_update_steps_per_epoch: fetches of the epoch loop
    budget: float  # the run's length in reference steps: the Trainer's max_steps at train start
    data_ends_with_epoch: bool = False  # map-style data: nothing follows micro-batch S (an iterable goes on)

    def __post_init__(self) -> None:
        if self.micro_batches < 1 or self.fetches < 1 or not self.budget > 0:
            raise AccumulationError(f"the Trainer's loop has nothing to train on: {self}")


@dataclass
class AccumulationController:
    """Position in the Trainer's loop, and the accumulation to fetch the next group with.

    Call :meth:`start_epoch` at ``on_epoch_begin`` and set ``args.gradient_accumulation_steps`` to what it returns;
    after every optimizer step call :meth:`finish_group` with the micro-batches the step consumed and the size of
    the group the Trainer fetched (checked), then :meth:`next_accumulation` with the schedule's target and set the
    result.
    """

    min_accumulation: int  # a_min: the accumulation the Trainer's loop was sized with
    loop: EpochLoop
    accumulation: int = 0  # a in force (0 before the first epoch)
    epoch: int = -1
    position: int = 0  # p: micro-batches consumed in this epoch (each process)
    fetch: int = 0  # k: fetches the Trainer's loop has done in this epoch
    last_fetch: int = 0  # r: what the epoch's last fetch takes (fixed when the epoch began)

    def __post_init__(self) -> None:
        if self.min_accumulation < 1:
            raise AccumulationError(f"min_accumulation must be >= 1, got {self.min_accumulation}")
        if self.accumulation == 0:
            self.accumulation = self.min_accumulation

    # ------------------------------------------------------------------------------------------ where we are
    @property
    def progress(self) -> float:
        """Reference steps done: e·n + (n at the epoch's end, else p / a_min)."""
        epochs_done = max(self.epoch, 0) * self.loop.fetches
        if self.position >= self.loop.micro_batches:
            return float(epochs_done + self.loop.fetches)
        return epochs_done + self.position / self.min_accumulation

    @property
    def budget_used(self) -> bool:
        return self.progress >= self.loop.budget

    @property
    def epoch_ended(self) -> bool:
        return self.position >= self.loop.micro_batches

    def expected_group(self) -> int:
        """Micro-batches the Trainer will put into the next optimizer step, with the accumulation in force."""
        left = self.loop.micro_batches - self.position
        take = self.last_fetch if self.fetch == self.loop.fetches - 1 else self.accumulation
        if self.fetch >= self.loop.fetches or left <= 0:
            return 0
        return min(take, left)

    # ------------------------------------------------------------------------------------------ decisions
    def start_epoch(self, target: int) -> int:
        """Accumulation for the first group of a new epoch (any a ≥ a_min is aligned at p = 0)."""
        self.epoch += 1
        self.position, self.fetch = 0, 0
        self.accumulation = self._choose(target)
        self.last_fetch = self.loop.micro_batches % self.accumulation or self.accumulation
        self._check_the_loop_covers_the_epoch()
        return self.accumulation

    def resume(self, epoch: int, position: int, accumulation: int) -> None:
        """Continue mid-epoch from a checkpoint: the Trainer skips ``position`` micro-batches and, reading the
        accumulation we restore, starts its loop at fetch ``position // accumulation`` with the last fetch
        sized from that accumulation."""
        if position % accumulation:
            raise AccumulationError(f"cannot resume at micro-batch {position} with accumulation {accumulation}")
        self.epoch, self.position, self.accumulation = epoch, position, accumulation
        self.fetch = position // accumulation
        self.last_fetch = self.loop.micro_batches % accumulation or accumulation
        self._check_the_loop_covers_the_epoch()

    def finish_group(self, consumed: int, fetched: int | None = None) -> None:
        """Record one optimizer step of ``consumed`` micro-batches (counted since the previous step); it must be
        the group the Trainer fetched. Pass ``fetched``, the size of the group the Trainer fetched last
        (``trainer.current_gradient_accumulation_steps`` at ``on_step_end``), to check that too: a step that is
        only part of its fetched group (normalised by the whole group's label tokens) can consume just what the
        controller expects, e.g. when something else set a larger ``gradient_accumulation_steps``."""
        expected = self.expected_group()
        if consumed != expected or (fetched is not None and fetched != expected):
            group = "" if fetched is None else f" (of a fetched group of {fetched})"
            raise AccumulationError(
                f"an optimizer step consumed {consumed} micro-batches{group} where the Trainer's loop (epoch "
                f"{self.epoch}, micro-batch {self.position} of {self.loop.micro_batches}, fetch {self.fetch} of "
                f"{self.loop.fetches}, accumulation {self.accumulation}) fetches {expected}: this step's gradient "
                "is not one whole fetched group. Something else changed gradient_accumulation_steps or the "
                "Trainer's loop differs from the one hf_gns_spam was written for."
            )
        self.position += consumed
        self.fetch += 1

    def finish_epoch(self, unstepped: int) -> None:
        """At the end of the Trainer's epoch loop: ``unstepped`` micro-batches trained since the last optimizer step
        must be none (their gradients would never be applied, or leak into the next epoch's first step)."""
        if unstepped:
            raise AccumulationError(
                f"the Trainer's epoch {self.epoch} ended with {unstepped} micro-batches trained after its last "
                f"optimizer step (accumulation {self.accumulation}): their gradients were never applied. Something "
                "else changed gradient_accumulation_steps or the Trainer's loop differs from the one hf_gns_spam "
                "was written for."
            )

    def next_accumulation(self, target: int) -> int:
        """Accumulation for the next group: toward ``target``, aligned with the epoch position, within budget."""
        if not self.epoch_ended:
            self.accumulation = self._choose(target)
        return self.accumulation

    def _choose(self, target: int) -> int:
        """The largest accumulation a, a multiple of a_min with p mod a = 0, between the one in force and the target
        (capped by the budget); when the budget ends before a group at the accumulation in force would, the largest
        such a in [a_min, cap]."""
        a_min, p, current = self.min_accumulation, self.position, self.accumulation
        cap = self._budget_cap()
        if cap is not None and cap < current:  # the budget ends within the next group: cut it
            low, high = a_min, max(cap, a_min)
        else:
            low = current
            high = max(target if cap is None else min(target, cap), current)
        aligned = [a for a in range(low, high + 1) if a % a_min == 0 and p % a == 0]  # p = 0: every multiple
        if not aligned:  # a_min (cut) or the one in force qualifies, unless the state did not come from here
            raise AccumulationError(f"no accumulation in [{low}, {high}] is aligned with micro-batch {p}: {self}")
        return aligned[-1]

    def _budget_cap(self) -> int | None:
        """Micro-batches left before the budget when it ends inside this epoch or at its end (else None)."""
        steps_left = self.loop.budget - self.epoch * self.loop.fetches  # at the start of this epoch
        if steps_left > self.loop.fetches or (steps_left == self.loop.fetches and self.loop.data_ends_with_epoch):
            return None  # the budget ends after this epoch, or with it where the data's end cuts the last group
        end = min(math.ceil(steps_left * self.min_accumulation), self.loop.micro_batches)
        return max(end - self.position, 1)

    def _check_the_loop_covers_the_epoch(self) -> None:
        """With groups of at least the accumulation in force, the remaining fetches take the rest of the epoch."""
        fetches_left = self.loop.fetches - self.fetch
        capacity = (fetches_left - 1) * self.accumulation + self.last_fetch if fetches_left > 0 else 0
        if capacity < self.loop.micro_batches - self.position:
            raise AccumulationError(
                f"at micro-batch {self.position} of {self.loop.micro_batches} with accumulation "
                f"{self.accumulation}, the Trainer's {fetches_left} remaining fetches take only {capacity} "
                "micro-batches: the rest of the epoch would be skipped"
            )

    # ------------------------------------------------------------------------------------------ looking ahead
    def plan(self, target: Callable[[AccumulationController], int], epoch_starts: bool) -> list[int]:
        """The accumulation of every optimizer step left until the budget is used, if every decision asks for
        ``target(controller)``: this controller's own decisions (:meth:`start_epoch`, :meth:`finish_group`,
        :meth:`next_accumulation`) replayed on a copy, epoch ends, alignment and the cut at the budget included, so
        its length is the number of steps the run takes when the schedule's targets are ``target``'s.

        ``epoch_starts``: the next event is the start of epoch ``epoch + 1`` (before the first epoch, or resumed at
        an epoch's start), not the next group of this one; the end of an epoch is recognised by itself."""
        replay = dataclasses.replace(self)  # the loop is frozen: the copy shares it
        accumulations: list[int] = []
        while not replay.budget_used:
            if epoch_starts or replay.epoch_ended:
                replay.start_epoch(target(replay))
                epoch_starts = False
            group = replay.expected_group()
            if group == 0:  # the epoch loop's fetches end before its data (start_epoch checks that they cannot)
                raise AccumulationError(f"the Trainer's loop would fetch nothing before the budget is used: {replay}")
            accumulations.append(replay.accumulation)
            replay.finish_group(group)
            if not replay.budget_used:
                replay.next_accumulation(target(replay))
        return accumulations

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, int]:
        return {
            "accumulation": self.accumulation,
            "epoch": self.epoch,
            "position": self.position,
            "fetch": self.fetch,
            "last_fetch": self.last_fetch,
        }
