"""The control flow of ``transformers.Trainer.train()`` (5.24) without a model, to test the accumulation controller.

Transcribed from ``.venv/lib/python3.11/site-packages/transformers/trainer.py`` (cited as ``trainer.py:LINE``) and
``trainer_callback.py``: ``set_initial_training_values`` (loop bounds from the accumulation at train start),
``_init_training_state`` (resume point, with the callback's override), ``_inner_training_loop`` (epoch loop),
``_run_epoch`` (skip on resume, ``remainder``, fetches of ``gradient_accumulation_steps`` micro-batches, the sync
test, ``on_step_begin`` / ``on_substep_end`` / ``on_optimizer_step`` / ``on_step_end``, the stop checks),
``get_batch_samples`` and
``DefaultFlowCallback``'s stop at ``state.max_steps``. A micro-batch is its id ``(epoch, index in the epoch)``; the
record keeps every fetched group, every optimizer step's micro-batches, where ``on_step_begin`` fired, and a
checkpoint after every optimizer step.

:class:`DriverCallback` calls the shipped :class:`~hf_gns_spam.gns.driver.ScheduleDriver` from these events as
``GNSCallback`` does, so the property tests exercise the code that ships. Not modelled: several processes (each
process's dataloader is assumed to yield the same S micro-batches), ``ignore_data_skip``, ``sync_each_batch`` /
DeepSpeed (sync every micro-batch), ``should_epoch_stop`` set by a callback, ``auto_find_batch_size``, sequence
parallelism (``len_dataloader * sp_size``), an iterable dataset that runs out before the Trainer's "epoch" of
``max_steps × GA`` micro-batches (the data is endless here), and what happens inside a step (losses,
``num_items_in_batch``, the optimizer; the LR scheduler only as the positions the driver sets).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from hf_gns_spam.gns.accumulation import AccumulationController, EpochLoop
from hf_gns_spam.gns.driver import ScheduleDriver, ScheduleRule

MicroBatch = tuple[int, int]  # (epoch, position in that epoch's order)
Schedule = Callable[[int, float], int]  # (global_step, progress in reference steps) -> target accumulation
Hook = Callable[[str, "SimulatedTrainer"], None]  # (event, trainer): a later callback (e.g. one that changes GA)


@dataclass
class TrainingArgs:
    """The ``TrainingArguments`` fields the loop reads."""

    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 3.0


@dataclass
class TrainerState:
    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


@dataclass
class TrainerControl:
    should_training_stop: bool = False
    should_epoch_stop: bool = False


@dataclass(frozen=True)
class Checkpoint:
    """What ``_save_checkpoint`` keeps that the loop reads back: the global step and the callback's state (JSON)."""

    global_step: int
    callback_state: str


class DataLoader:
    """S micro-batches per epoch (map-style, has ``len``), or an endless iterable (``micro_batches=None``)."""

    def __init__(self, micro_batches: int | None) -> None:
        self.micro_batches = micro_batches

    @property
    def has_length(self) -> bool:
        return self.micro_batches is not None

    def __len__(self) -> int:
        if self.micro_batches is None:
            raise TypeError("an iterable dataloader has no length")
        return self.micro_batches

    def iterate(self, epoch: int, skip: int) -> Iterator[MicroBatch]:
        """``iter(skip_first_batches(dataloader, skip))`` for one epoch (same order: the RNG state is restored)."""
        indices = range(skip, self.micro_batches) if self.micro_batches is not None else itertools.count(skip)
        return ((epoch, index) for index in indices)


@dataclass(frozen=True)
class LoopValues:
    """What ``set_initial_training_values`` returns that the loop uses (trainer.py:2495)."""

    num_train_epochs: int
    num_update_steps_per_epoch: int
    steps_in_epoch: int
    max_steps: int


@dataclass(frozen=True)
class Group:
    """One fetch of ``get_batch_samples``: which epoch, which ``update_step``, GA when fetched, the micro-batches."""

    epoch: int
    update_step: int
    accumulation: int
    ids: tuple[MicroBatch, ...]


@dataclass(frozen=True)
class Step:
    """One optimizer step: the micro-batches whose gradients it summed (since the previous step)."""

    global_step: int
    ids: tuple[MicroBatch, ...]


@dataclass
class Record:
    loop: LoopValues
    groups: list[Group] = field(default_factory=list)  # every fetch, empty ones included
    steps: list[Step] = field(default_factory=list)
    step_begins: list[MicroBatch] = field(default_factory=list)  # the micro-batch at which on_step_begin fired
    checkpoints: list[Checkpoint] = field(default_factory=list)  # after every optimizer step
    unsynced: list[MicroBatch] = field(default_factory=list)  # trained, but in no optimizer step when train() ended
    stopped_by: list[str] = field(default_factory=list)  # who set should_training_stop
    epochs_run: list[int] = field(default_factory=list)
    controller: AccumulationController | None = None
    expected_at_start: int = 0  # state.max_steps after on_train_begin: the steps the driver expects
    lr_positions: list[float] = field(default_factory=list)  # where the driver set the LR schedule, in order


def set_initial_training_values(args: TrainingArgs, dataloader: DataLoader) -> LoopValues:
    """trainer.py:2495-2563 (one process, no sequence parallelism)."""
    max_steps = args.max_steps  # trainer.py:2509
    epoch_based = max_steps < 0  # trainer.py:2511
    len_dataloader = len(dataloader) if dataloader.has_length else None  # trainer.py:2512
    ga = args.gradient_accumulation_steps
    if len_dataloader is not None:  # trainer.py:2521
        num_update_steps_per_epoch = max(len_dataloader // ga + int(len_dataloader % ga > 0), 1)  # trainer.py:2522
        if epoch_based:
            max_steps = math.ceil(args.num_train_epochs * num_update_steps_per_epoch)  # trainer.py:2529
    if len_dataloader:  # trainer.py:2531
        if args.max_steps > 0:
            num_train_epochs = max_steps // num_update_steps_per_epoch + int(
                max_steps % num_update_steps_per_epoch > 0
            )  # trainer.py:2534
        else:
            num_train_epochs = math.ceil(args.num_train_epochs)  # trainer.py:2541
    elif args.max_steps > 0:  # trainer.py:2543
        num_train_epochs = sys.maxsize  # trainer.py:2545
        num_update_steps_per_epoch = max_steps  # trainer.py:2546
    else:
        raise ValueError("args.max_steps must be set to a positive value if dataloader does not have a length")
    steps_in_epoch = len_dataloader if len_dataloader is not None else max_steps * ga  # trainer.py:2554
    return LoopValues(num_train_epochs, num_update_steps_per_epoch, steps_in_epoch, max_steps)


def get_batch_samples(epoch_iterator: Iterator[MicroBatch], num_batches: int) -> list[MicroBatch]:
    """trainer.py:2289-2304: up to ``num_batches`` micro-batches, fewer once the epoch's data runs out."""
    batch_samples = []
    for _ in range(num_batches):  # trainer.py:2297
        try:
            batch_samples.append(next(epoch_iterator))
        except StopIteration:  # trainer.py:2300
            break
    return batch_samples


@dataclass(frozen=True)
class FunctionRule:
    """A :class:`~hf_gns_spam.gns.driver.ScheduleRule` whose targets are a test's function of (global step,
    progress in reference steps). ``foreseeable``: the function depends on the progress alone, so the driver may
    plan with it (as with ``"linear"``); otherwise the driver expects the batch to stay as it is (as with
    ``"gns"``)."""

    targets: Schedule
    foreseeable: bool = False
    kind: str = "test"
    min_batch_size: int = 0
    max_batch_size: int = 0

    def target_accumulation(
        self, current: int, step: int, samples: float, budget: float, gns: float, estimate_is_current: bool
    ) -> int:
        return self.targets(step, samples)

    def foreseeable_target(self, current: int, samples: float, budget: float) -> int:
        return self.targets(0, samples) if self.foreseeable else current


class DriverCallback:
    """``GNSCallback``'s calls of the shipped :class:`~hf_gns_spam.gns.driver.ScheduleDriver`, from the simulated
    loop's events: GA = a_min before ``train()``; the loop bounds and the restart point at ``_init_training_state``;
    the ``on_*`` events; the micro-batches each optimizer step consumed (counted with ``on_substep_end``) and the
    size of the group the Trainer fetched last (``trainer.current_gradient_accumulation_steps``) at
    ``on_optimizer_step``. Records the learning-rate positions the driver sets and the expected total at train
    start."""

    def __init__(
        self,
        min_accumulation: int,
        rule: ScheduleRule,
        *,
        signal: Callable[[], tuple[float, bool]] = lambda: (math.nan, False),
        report_fetched: bool = True,
        data_ends_with_epoch: bool = True,
    ) -> None:
        self.min_accumulation = min_accumulation
        self.data_ends_with_epoch = data_ends_with_epoch
        self.report_fetched = report_fetched
        self.lr_positions: list[float] = []
        self.driver = ScheduleDriver(
            min_accumulation,
            rule,
            signal=signal,
            set_learning_rate=lambda lr_scheduler, position, factor: self.lr_positions.append(position),
        )
        self.micro_batches_since_step = 0

    @property
    def controller(self) -> AccumulationController | None:
        return self.driver.controller

    def on_init_end(self, trainer: SimulatedTrainer) -> None:
        trainer.args.gradient_accumulation_steps = self.min_accumulation

    def init_training_state(
        self,
        trainer: SimulatedTrainer,
        max_steps: int,
        num_update_steps_per_epoch: int,
        saved: str | None,
        epochs_trained: int,
        skip: int,
    ) -> tuple[int, int]:
        """The override of ``_init_training_state``: the resume point (epoch, micro-batches to skip)."""
        dataloader = trainer.dataloader
        micro_batches = len(dataloader) if dataloader.has_length else max_steps * self.min_accumulation
        loop = EpochLoop(
            micro_batches=micro_batches,
            fetches=num_update_steps_per_epoch,
            budget=max_steps,
            data_ends_with_epoch=dataloader.has_length and self.data_ends_with_epoch,
        )
        self.driver.start(loop)
        position = json.loads(saved) if saved is not None else None
        return self.driver.resume(trainer.args, position, epochs_trained, skip)

    def on_train_begin(self, trainer: SimulatedTrainer) -> None:
        self.driver.on_train_begin(trainer.state)
        trainer.record.expected_at_start = trainer.state.max_steps

    def on_epoch_begin(self, trainer: SimulatedTrainer) -> None:
        self.driver.on_epoch_begin(trainer.args, trainer.state)

    def on_substep_end(self, trainer: SimulatedTrainer) -> None:
        self.micro_batches_since_step += 1

    def on_epoch_end(self, trainer: SimulatedTrainer) -> None:
        self.driver.on_epoch_end(self.micro_batches_since_step)

    def on_optimizer_step(self, trainer: SimulatedTrainer) -> None:
        consumed, self.micro_batches_since_step = self.micro_batches_since_step + 1, 0
        fetched = trainer.current_gradient_accumulation_steps if self.report_fetched else None
        self.driver.on_optimizer_step(trainer.state, consumed, fetched)

    def on_step_end(self, trainer: SimulatedTrainer) -> None:
        self.driver.on_step_end(trainer.args, trainer.state, trainer.control)
        if self.controller.budget_used:
            trainer.record.stopped_by.append("callback")

    def state(self) -> str:
        return json.dumps(self.driver.state_dict())


class SimulatedTrainer:
    """``Trainer.train()``'s loop over ``dataloader`` with ``DefaultFlowCallback``, the controller's callback and,
    last, ``hook`` (called with the event's name after the others, at every event)."""

    def __init__(
        self, args: TrainingArgs, dataloader: DataLoader, callback: DriverCallback, hook: Hook | None = None
    ) -> None:
        self.args = args
        self.dataloader = dataloader
        self.callback = callback
        self.hook = hook
        self.state = TrainerState()
        self.control = TrainerControl()
        self.current_gradient_accumulation_steps = 0
        callback.on_init_end(self)  # Trainer.__init__ -> on_init_end: GNSCallback sets GA = a_min

    def _event(self, name: str) -> None:
        # DEFAULT_CALLBACKS come first (trainer.py:595): DefaultFlowCallback.on_step_end (trainer_callback.py:592)
        if name == "on_step_end" and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            self.record.stopped_by.append("DefaultFlowCallback")
        getattr(self.callback, name, lambda trainer: None)(self)
        if self.hook is not None:
            self.hook(name, self)

    def train(self, resume_from: Checkpoint | None = None) -> Record:
        """``_inner_training_loop`` (trainer.py:1583)."""
        loop = set_initial_training_values(self.args, self.dataloader)  # trainer.py:1610
        self.record = Record(loop=loop)
        epochs_trained, steps_trained_in_current_epoch = self._init_training_state(loop, resume_from)
        self.pending: list[MicroBatch] = []  # model.zero_grad() (trainer.py:1651): the gradient buffer's micro-batches
        self.control.should_training_stop = False  # CallbackHandler.on_train_begin (trainer_callback.py:491)
        self._event("on_train_begin")  # trainer.py:1653
        for epoch in range(epochs_trained, loop.num_train_epochs):  # trainer.py:1658
            self.control.should_epoch_stop = False  # CallbackHandler.on_epoch_begin (trainer_callback.py:498)
            self._event("on_epoch_begin")  # trainer.py:1659
            self.record.epochs_run.append(epoch)
            self._run_epoch(epoch, loop, resume_from, epochs_trained, steps_trained_in_current_epoch)
            if self.control.should_training_stop:  # trainer.py:1673
                break
        self.record.unsynced = list(self.pending)
        self.record.controller = self.callback.controller
        self.record.lr_positions = list(self.callback.lr_positions)
        return self.record

    def _init_training_state(self, loop: LoopValues, resume_from: Checkpoint | None) -> tuple[int, int]:
        """trainer.py:1678-1713, wrapped by the callback's override (which gets the Trainer's result)."""
        self.state = TrainerState()
        epochs_trained = steps_trained_in_current_epoch = 0
        if resume_from is not None:
            self.state.global_step = resume_from.global_step  # TrainerState.load_from_json
            epochs_trained = int(self.state.global_step // loop.num_update_steps_per_epoch)  # trainer.py:1706
            steps_trained_in_current_epoch = self.state.global_step % loop.num_update_steps_per_epoch  # :1708
            steps_trained_in_current_epoch *= self.args.gradient_accumulation_steps  # trainer.py:1709
        self.state.max_steps = loop.max_steps  # init_training_references (trainer.py:1711, trainer_callback.py:183)
        epochs_trained, steps_trained_in_current_epoch = self.callback.init_training_state(
            self,
            loop.max_steps,
            loop.num_update_steps_per_epoch,
            resume_from.callback_state if resume_from is not None else None,
            epochs_trained,
            steps_trained_in_current_epoch,
        )
        return epochs_trained, steps_trained_in_current_epoch

    def _run_epoch(
        self,
        epoch: int,
        loop: LoopValues,
        resume_from: Checkpoint | None,
        epochs_trained: int,
        steps_trained_in_current_epoch: int,
    ) -> None:
        """trainer.py:1827-1999."""
        args, steps_in_epoch = self.args, loop.steps_in_epoch
        num_update_steps_per_epoch = loop.num_update_steps_per_epoch
        step = -1  # trainer.py:1843
        num_update_steps_trained = 0  # trainer.py:1849
        skip = 0
        # trainer.py:1850-1851 (ignore_data_skip is False; the elif branch only reloads the RNG state)
        if epoch == epochs_trained and resume_from is not None and steps_trained_in_current_epoch > 0:
            skip = steps_trained_in_current_epoch  # skip_first_batches (trainer.py:1852)
            step = steps_trained_in_current_epoch - 1  # trainer.py:1853
            num_update_steps_trained = steps_trained_in_current_epoch // args.gradient_accumulation_steps  # :1854
        epoch_iterator = self.dataloader.iterate(epoch, skip)  # trainer.py:1867
        remainder = steps_in_epoch % args.gradient_accumulation_steps  # trainer.py:1870
        if remainder == 0:
            remainder = args.gradient_accumulation_steps  # trainer.py:1872
        for update_step in range(num_update_steps_trained, num_update_steps_per_epoch):  # trainer.py:1877
            num_batches = (
                args.gradient_accumulation_steps if update_step != (num_update_steps_per_epoch - 1) else remainder
            )  # trainer.py:1878
            batch_samples = get_batch_samples(epoch_iterator, num_batches)  # trainer.py:1881
            self.current_gradient_accumulation_steps = len(batch_samples)  # trainer.py:1885
            self.record.groups.append(Group(epoch, update_step, args.gradient_accumulation_steps, tuple(batch_samples)))
            for inputs in batch_samples:  # trainer.py:1895
                step += 1  # trainer.py:1896
                do_sync_step = (step + 1) % args.gradient_accumulation_steps == 0 or (
                    step + 1
                ) == steps_in_epoch  # trainer.py:1897
                if step % args.gradient_accumulation_steps == 0:  # trainer.py:1901
                    self.record.step_begins.append(inputs)
                    self._event("on_step_begin")  # trainer.py:1902
                self.pending.append(inputs)  # training_step: forward + backward into the gradient buffer
                if do_sync_step:  # trainer.py:1936
                    self._event("on_optimizer_step")  # after optimizer.step (trainer.py 5.25: 1981)
                    self.state.global_step += 1  # trainer.py:1955 (after optimizer.step, model.zero_grad)
                    self.state.epoch = epoch + (step + 1) / steps_in_epoch  # trainer.py:1956
                    self.record.steps.append(Step(self.state.global_step, tuple(self.pending)))
                    self.pending = []
                    self._event("on_step_end")  # trainer.py:1957
                    self.record.checkpoints.append(  # _maybe_log_save_evaluate -> _save_checkpoint (trainer.py:2285)
                        Checkpoint(self.state.global_step, self.callback.state())
                    )
                else:
                    self._event("on_substep_end")  # trainer.py:1969
                if self.control.should_epoch_stop or self.control.should_training_stop:  # trainer.py:1971
                    break
            if self.control.should_epoch_stop or self.control.should_training_stop:  # trainer.py:1973
                break
        if step < 0:  # trainer.py:1981: the epoch yielded nothing
            self.control.should_training_stop = True
            self.record.stopped_by.append("empty epoch")
        self._event("on_epoch_end")  # trainer.py:1989


def simulate(
    micro_batches: int | None,
    min_accumulation: int,
    schedule: Schedule | ScheduleRule,
    *,
    foreseeable: bool = False,
    signal: Callable[[], tuple[float, bool]] = lambda: (math.nan, False),
    max_steps: int = -1,
    num_train_epochs: float = 3.0,
    resume_from: Checkpoint | None = None,
    report_fetched: bool = True,
    hook: Hook | None = None,
    data_ends_with_epoch: bool = True,
) -> Record:
    """One ``train()`` call of a fresh Trainer (resuming from ``resume_from`` if given), with the targets of
    ``schedule``: a function (``foreseeable``: of the progress alone, see :class:`FunctionRule`) or a rule such as
    :class:`~hf_gns_spam.gns.schedule.BatchSizeSchedule`, which follows ``signal()``."""
    args = TrainingArgs(max_steps=max_steps, num_train_epochs=num_train_epochs)
    callback = DriverCallback(
        min_accumulation,
        FunctionRule(schedule, foreseeable) if callable(schedule) else schedule,
        signal=signal,
        report_fetched=report_fetched,
        data_ends_with_epoch=data_ends_with_epoch,
    )
    trainer = SimulatedTrainer(args, DataLoader(micro_batches), callback, hook=hook)
    return trainer.train(resume_from=resume_from)
