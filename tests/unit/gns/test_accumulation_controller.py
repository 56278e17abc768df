"""Property tests of the accumulation controller against a simulation of the Trainer's loop.

Thousands of random runs (``random.Random(seed)`` loops) of :mod:`tests.support.trainer_loop_simulation`: map-style and
iterable data, ``max_steps`` and whole or fractional ``num_train_epochs``, schedules of random non-decreasing, linear
and constant targets, resumes from checkpoints, and a foreign change of ``gradient_accumulation_steps``.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_gns_spam.gns.accumulation import AccumulationController, AccumulationError, EpochLoop
from hf_gns_spam.gns.driver import ScheduleDriver
from hf_gns_spam.integrations.trainer_loop import (
    TrainerLoopObserver,
    fetched_accumulation,
    install_trainer_hooks,
    saved_callback_state,
)
from tests.support.accumulation_properties import check_run
from tests.support.trainer_loop_simulation import (
    Checkpoint,
    DataLoader,
    FunctionRule,
    Record,
    Schedule,
    SimulatedTrainer,
    TrainingArgs,
    set_initial_training_values,
    simulate,
)

EPOCH_CHOICES = (0.05, 0.3, 0.5, 1, 1.5, 2, 2.5, 3)


@dataclass
class Case:
    micro_batches: int | None  # None: an iterable dataset
    min_accumulation: int
    max_target: int
    max_steps: int
    num_train_epochs: float
    schedule_kind: str
    seed: int
    data_ends_with_epoch: bool = True  # as GNSCallback tells the controller for map-style data

    def schedule(self) -> Schedule:
        a_min, top = self.min_accumulation, self.max_target
        if self.schedule_kind == "constant":
            constant = random.Random(self.seed).randint(a_min, top)
            return lambda global_step, progress: constant
        if self.schedule_kind == "linear":
            budget = self.loop().max_steps
            return lambda global_step, progress: a_min + math.floor((top - a_min) * min(progress / budget, 1.0))
        rng, targets, target = random.Random(self.seed), [], a_min
        for _ in range(400):
            if rng.random() < 0.3:
                target = min(target + rng.randint(1, 3), top)
            targets.append(target)
        return lambda global_step, progress: targets[min(global_step, len(targets) - 1)]

    def loop(self):
        """The Trainer's loop values with GA = a_min at train start."""
        args = TrainingArgs(self.min_accumulation, self.max_steps, self.num_train_epochs)
        return set_initial_training_values(args, DataLoader(self.micro_batches))

    def run(self, **kwargs) -> Record:
        return simulate(
            self.micro_batches,
            self.min_accumulation,
            self.schedule(),
            foreseeable=self.schedule_kind != "random",
            max_steps=self.max_steps,
            num_train_epochs=self.num_train_epochs,
            data_ends_with_epoch=self.data_ends_with_epoch,
            **kwargs,
        )


def random_case(rng: random.Random) -> Case:
    case = _random_case(rng)
    case.data_ends_with_epoch = rng.random() < 0.5
    return case


def _random_case(rng: random.Random) -> Case:
    a_min = rng.randint(1, 6)
    top = rng.randint(a_min, 4 * a_min + 8)
    kind = rng.choice(("random", "linear", "constant"))
    seed = rng.randrange(2**32)
    if rng.random() < 0.2:  # iterable: the Trainer needs max_steps
        return Case(None, a_min, top, rng.randint(1, 40), 3.0, kind, seed)
    micro_batches = rng.randint(1, 60)
    fetches = math.ceil(micro_batches / a_min)
    if rng.random() < 0.4:
        return Case(micro_batches, a_min, top, rng.randint(1, 3 * fetches), 3.0, kind, seed)
    return Case(micro_batches, a_min, top, -1, rng.choice(EPOCH_CHOICES), kind, seed)


def test_random_runs_are_exact_and_stop_at_the_budget():
    rng = random.Random(1234)
    kinds: Counter[tuple[bool, bool, str]] = Counter()
    for _ in range(4000):
        case = random_case(rng)
        check_run(case.run(), case.min_accumulation, foreseeable=case.schedule_kind != "random")
        kinds[case.micro_batches is None, case.max_steps > 0, case.schedule_kind] += 1
    assert len(kinds) == 9 and min(kinds.values()) > 100  # iterable (max_steps) or map-style with either, 3 schedules


def test_a_constant_minimum_is_the_trainer_unchanged():
    """With the target a_min throughout, the simulation is the stock Trainer: max_steps steps of a_min (the epoch's
    last one shorter)."""
    rng = random.Random(7)
    for _ in range(500):
        case = random_case(rng)
        case.max_target = case.min_accumulation
        record = case.run()
        check_run(record, case.min_accumulation)
        assert len(record.steps) == record.loop.max_steps
        size = record.loop.steps_in_epoch
        assert all(len(step.ids) == case.min_accumulation or step.ids[-1][1] == size - 1 for step in record.steps)


def assert_same_continuation(full: Record, resumed: Record, global_step: int) -> None:
    """(f) the resumed run takes the same micro-batches in the same optimizer steps, and stops at the same point."""
    assert resumed.steps == [step for step in full.steps if step.global_step > global_step]
    assert [group.ids for group in resumed.groups if group.ids] == [step.ids for step in resumed.steps]
    assert resumed.step_begins == [step.ids[0] for step in resumed.steps]
    assert resumed.unsynced == []
    assert resumed.stopped_by in (["callback"], ["DefaultFlowCallback", "callback"])
    stop = full.controller
    assert (resumed.controller.epoch, resumed.controller.position, resumed.controller.progress) == (
        stop.epoch,
        stop.position,
        stop.progress,
    )


def test_resumed_runs_continue_exactly():
    rng = random.Random(99)
    resumes = 0
    for _ in range(1500):
        case = random_case(rng)
        full = case.run()
        checkpoints = full.checkpoints[:-1]  # the last one is the finished run
        if len(checkpoints) > 12:
            checkpoints = rng.sample(checkpoints, 12)
        for checkpoint in checkpoints:
            checkpoint = json.loads(json.dumps(checkpoint.__dict__))  # what a checkpoint directory keeps
            resumed = case.run(resume_from=Checkpoint(**checkpoint))
            resumes += 1
            assert_same_continuation(full, resumed, checkpoint["global_step"])
            if resumed.checkpoints[:-1] and rng.random() < 0.3:  # interrupted again
                again = rng.choice(resumed.checkpoints[:-1])
                assert_same_continuation(full, case.run(resume_from=again), again.global_step)
    assert resumes > 5000


def test_every_step_boundary_of_small_runs_resumes_exactly():
    rng = random.Random(5)
    for _ in range(300):
        case = random_case(rng)
        full = case.run()
        for checkpoint in full.checkpoints[:-1]:
            assert_same_continuation(full, case.run(resume_from=checkpoint), checkpoint.global_step)


def foreign_change(event: str, at_step: int, accumulation: int):
    """A later callback that sets gradient_accumulation_steps once, at ``event`` of global step ``at_step``."""
    done = []

    def hook(name: str, trainer: SimulatedTrainer) -> None:
        at = not done and name == event and trainer.state.global_step == at_step
        if at and trainer.args.gradient_accumulation_steps != accumulation:
            trainer.args.gradient_accumulation_steps = accumulation
            done.append(True)

    return hook, done


def test_a_foreign_change_of_the_accumulation_is_caught_or_harmless():
    """(g) a GA set by someone else either raises AccumulationError or leaves every step one fetched group."""
    rng = random.Random(2024)
    outcomes: Counter[str] = Counter()
    for _ in range(3000):
        case = random_case(rng)
        steps = case.run().steps
        event = rng.choice(("on_step_end", "on_epoch_begin", "on_step_begin"))
        at = rng.choice(
            [step.global_step - 1 for step in steps if step.ids[0][1] == 0]  # where an epoch begins
            if event == "on_epoch_begin"
            else range(len(steps))
        )
        hook, done = foreign_change(event, at, rng.randint(1, case.max_target + 3))
        try:
            record = case.run(hook=hook)
        except AccumulationError:
            outcomes["raised"] += 1
            continue
        check_run(record, case.min_accumulation, foreign=True)  # not caught: then it did no harm
        outcomes["harmless" if done else "no change"] += 1
    assert outcomes["raised"] > 1000 and outcomes["harmless"] > 100


def test_a_fetch_larger_than_the_step_is_caught():
    """The Trainer fetches 4 micro-batches at position 2 (someone set GA = 4 after the controller chose 2): the
    optimizer steps after micro-batches 2-3 and 4-5, each 2 as the controller expects, but both are normalised as
    one group of 4. Only the size of the fetched group shows it."""

    def schedule(global_step: int, progress: float) -> int:
        return 1 if global_step == 0 else 2

    def run(report_fetched: bool) -> Record:
        hook, _ = foreign_change("on_step_end", 2, 4)
        return simulate(12, 1, schedule, num_train_epochs=1, hook=hook, report_fetched=report_fetched)

    with pytest.raises(AccumulationError, match="fetched group of 4"):
        run(report_fetched=True)
    blind = run(report_fetched=False)  # the micro-batches counted alone match what the controller expects
    assert [[index for _, index in step.ids] for step in blind.steps][2:4] == [[2, 3], [4, 5]]
    assert [[index for _, index in group.ids] for group in blind.groups][2] == [2, 3, 4, 5]


def test_an_iterable_dataset_ends_on_a_whole_group():
    """An iterable dataset's data goes on past the Trainer's "epoch" (max_steps × a_min micro-batches), which ends
    with a sync: the last group must end there, not be fetched whole and stepped in its middle (the controller
    used to let a group of 4 be fetched and stepped after 2, and with a_min = 2 fell back to a group of 5 stepped
    after 1)."""
    for a_min, target, max_steps in ((1, 4, 2), (2, 5, 3), (2, 3, 4), (3, 7, 5)):
        record = simulate(None, a_min, lambda global_step, progress, target=target: target, max_steps=max_steps)
        check_run(record, a_min)
        assert record.controller.position == max_steps * a_min
    record = simulate(None, 1, lambda global_step, progress: 4, max_steps=2)
    assert [[index for _, index in step.ids] for step in record.steps] == [[0, 1]]


def test_the_budget_is_reached_exactly_with_a_larger_minimum():
    """Accumulations are multiples of a_min, so the budget's micro-batch is always reachable: 5 micro-batches, a_min
    2, max_steps 5 (epoch 1 ends its budget after 4) used to step 3 + 2 there, ending at progress 6."""
    record = simulate(5, 2, lambda global_step, progress: 3, max_steps=5)
    check_run(record, 2)
    assert [[index for _, index in step.ids] for step in record.steps] == [[0, 1], [2, 3], [4], [0, 1], [2, 3]]
    assert record.controller.progress == 5


def test_the_plan_is_the_run_of_a_schedule_known_in_advance():
    """``plan`` replays the controller's decisions: for targets that are a function of the controller's state (a
    linear ramp in data; a constant, which is "gns" between two decisions that grow the batch), the accumulations
    it expects from train start, and from every checkpoint (mid-epoch and at an epoch's end), are the run's steps."""
    rng = random.Random(31)
    kinds: Counter[str] = Counter()
    for _ in range(2000):
        case = random_case(rng)
        if case.schedule_kind == "random":  # its targets follow the global step, not the controller's state
            continue
        schedule = case.schedule()

        def target(controller: AccumulationController, schedule: Schedule = schedule) -> int:
            return schedule(0, controller.progress)

        record = case.run()
        taken = [group.accumulation for group in record.groups if group.ids]
        loop = record.controller.loop
        assert AccumulationController(case.min_accumulation, loop).plan(target, epoch_starts=True) == taken
        for checkpoint in record.checkpoints:
            saved = AccumulationController(case.min_accumulation, loop, **json.loads(checkpoint.callback_state))
            assert saved.plan(target, epoch_starts=False) == taken[checkpoint.global_step :]
        kinds[case.schedule_kind] += 1
    assert min(kinds.values()) > 500


# ----------------------------------------------------------------------------------------------- regression cases
def rows_of(micro_batch: int, rows: int = 90, per_micro_batch: int = 4) -> range:
    return range(per_micro_batch * micro_batch, min(per_micro_batch * (micro_batch + 1), rows))


def linear_examples(first: int, last: int, budget: int, per_micro_batch: int = 4) -> Schedule:
    """A linear ramp of the batch in examples, first -> last over the budget, as accumulation targets."""
    return lambda global_step, progress: int(first + (last - first) * min(progress / budget, 1.0)) // per_micro_batch


def test_ninety_rows_two_epochs_of_a_linear_ramp():
    """90 rows in micro-batches of 4 (23, the last of 2 rows), a linear ramp 4 -> 16 examples, 2 epochs."""
    record = simulate(23, 1, linear_examples(4, 16, budget=46), num_train_epochs=2)
    check_run(record, 1)
    seen = Counter(row for step in record.steps for _, micro_batch in step.ids for row in rows_of(micro_batch))
    assert seen == Counter({row: 2 for row in range(90)})
    assert record.controller.progress == 46 == record.loop.max_steps
    assert {len(step.ids) for step in record.steps} == {1, 2, 3} and len(record.steps) < 46


def test_half_an_epoch_stops_after_half_the_reference_steps():
    for a_min in (1, 2, 3):
        fetches = math.ceil(23 / a_min)
        record = simulate(23, a_min, linear_examples(4 * a_min, 16 * a_min, budget=23), num_train_epochs=0.5)
        check_run(record, a_min)
        assert record.loop.max_steps == math.ceil(fetches / 2)
        assert record.controller.progress == math.ceil(fetches / 2)
        consumed = [index for step in record.steps for index in step.ids]
        assert consumed == [(0, index) for index in range(record.controller.position)]
    record = simulate(23, 1, linear_examples(4, 16, budget=12), num_train_epochs=0.5)
    assert record.controller.position == 12 and record.controller.progress == 12  # 48 of the 90 rows


def test_restored_state_dict_round_trips():
    loop = EpochLoop(micro_batches=23, fetches=23, budget=46)
    controller = AccumulationController(1, loop)
    controller.start_epoch(2)
    controller.finish_group(2)
    controller.next_accumulation(4)
    restored = AccumulationController(1, loop, **json.loads(json.dumps(controller.state_dict())))
    assert restored == controller


# ------------------------------------------------------------------------- the simulation is the installed Trainer
class Rows(Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index), "x": torch.ones(2)}


class EndlessRows(IterableDataset):
    def __iter__(self):
        for index in itertools.count():
            yield {"index": torch.tensor(index), "x": torch.ones(2)}


class Probe(nn.Module):
    """Reports each micro-batch it trains on (one row each) to the driver."""

    def __init__(self, driver: RealDriver) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.driver = driver

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        self.driver.trained(int(index[0]))
        return {"loss": self.linear(x).square().mean()}


class RealDriver(TrainerCallback, ExportableState, TrainerLoopObserver):
    """The shipped :class:`ScheduleDriver` in a real Trainer, through the shipped Trainer hooks
    (:mod:`hf_gns_spam.integrations.trainer_loop`), called as ``GNSCallback`` and the simulation's
    ``DriverCallback`` call it; records what the simulation records: the fetched groups, the optimizer steps'
    micro-batches, where on_step_begin fired."""

    def __init__(self, min_accumulation: int, rule: FunctionRule) -> None:
        install_trainer_hooks()
        self.min_accumulation = min_accumulation
        self.driver = ScheduleDriver(min_accumulation, rule)
        self.trainer: Trainer | None = None
        self.since_step, self.step_begins_next = 0, False
        self.groups, self.steps, self.step_begins, self.pending = [], [], [], []

    def state(self) -> dict:
        return {"args": {}, "attributes": {"saved": json.dumps(self.driver.state_dict())}}

    def attach(self, trainer: Trainer) -> None:
        if self.trainer is trainer:  # attached at every train() hook: record the fetches once
            return
        self.trainer, get_batch_samples = trainer, trainer.get_batch_samples

        def fetch(epoch_iterator, num_batches, device):
            batch_samples, num_items = get_batch_samples(epoch_iterator, num_batches, device)
            epoch = self.driver.controller.epoch
            self.groups.append(tuple((epoch, int(batch["index"][0])) for batch in batch_samples))
            return batch_samples, num_items

        trainer.get_batch_samples = fetch

    def before_loop_bounds(self, trainer: Trainer) -> None:
        trainer.args.gradient_accumulation_steps = self.min_accumulation

    def loop_bounds(self, trainer, steps_in_epoch, fetches_per_epoch, max_steps, has_length) -> None:
        self.driver.start(EpochLoop(steps_in_epoch, fetches_per_epoch, max_steps, data_ends_with_epoch=has_length))

    def resume_position(self, trainer, epochs_trained, skip, resuming) -> tuple[int, int]:
        saved = saved_callback_state(trainer, type(self).__name__) if resuming else None
        position = json.loads(saved["attributes"]["saved"]) if saved is not None else None
        return self.driver.resume(trainer.args, position, epochs_trained, skip)

    def trained(self, index: int) -> None:
        micro_batch = (self.driver.controller.epoch, index)
        if self.step_begins_next:
            self.step_begins.append(micro_batch)
            self.step_begins_next = False
        self.pending.append(micro_batch)

    def on_train_begin(self, args, state, control, **kwargs):
        self.driver.on_train_begin(state)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.driver.on_epoch_begin(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_begins_next = True

    def on_substep_end(self, args, state, control, **kwargs):
        self.since_step += 1

    def on_epoch_end(self, args, state, control, **kwargs):
        self.driver.on_epoch_end(self.since_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        consumed, self.since_step = self.since_step + 1, 0
        self.steps.append(tuple(self.pending))
        self.pending = []
        self.driver.on_optimizer_step(state, consumed, fetched_accumulation(self.trainer))

    def on_step_end(self, args, state, control, **kwargs):
        self.driver.on_step_end(args, state, control)


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(self.train_dataset)


def real_run(case: Case, output_dir: str, resume_from: str | None = None, save: bool = False) -> RealDriver:
    driver = RealDriver(case.min_accumulation, FunctionRule(case.schedule(), case.schedule_kind != "random"))
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=case.min_accumulation,  # GNSCallback sets it at on_init_end
        max_steps=case.max_steps,
        num_train_epochs=case.num_train_epochs,
        save_strategy="steps" if save else "no",
        save_steps=1,
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=True,
    )
    dataset = Rows(case.micro_batches) if case.micro_batches else EndlessRows()
    trainer = SequentialTrainer(model=Probe(driver), args=args, train_dataset=dataset, callbacks=[driver])
    trainer.train(resume_from_checkpoint=resume_from)
    return driver


def assert_same(real: RealDriver, simulated: Record) -> None:
    assert [group for group in real.groups if group] == [group.ids for group in simulated.groups if group.ids]
    assert real.steps == [step.ids for step in simulated.steps]
    assert real.step_begins == simulated.step_begins and real.pending == []


@pytest.mark.parametrize(
    "case",
    [
        Case(11, 1, 6, -1, 2.5, "random", 3),
        Case(23, 2, 9, 17, 3.0, "linear", 4),
        Case(13, 3, 12, -1, 1.5, "random", 5),
        Case(None, 1, 5, 9, 3.0, "random", 6),
        Case(None, 2, 9, 7, 3.0, "linear", 7),
    ],
)
def test_the_simulation_is_the_installed_trainer(case: Case, tmp_path):
    """The real Trainer driven like the simulation fetches, steps and resumes the same (one run, 2 resumes)."""
    simulated = case.run()
    assert_same(real_run(case, str(tmp_path / "run"), save=True), simulated)
    for checkpoint in simulated.checkpoints[1:-1:3][:2]:
        directory = str(tmp_path / "run" / f"checkpoint-{checkpoint.global_step}")
        resumed = real_run(case, str(tmp_path / "resumed"), resume_from=directory)
        assert_same(resumed, case.run(resume_from=checkpoint))
