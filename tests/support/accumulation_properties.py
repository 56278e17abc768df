"""The properties every run of the accumulation controller must have, checked on a simulated run's record
(:mod:`tests.support.trainer_loop_simulation`)."""

from __future__ import annotations

from tests.support.trainer_loop_simulation import Record


def budget_point(record: Record, min_accumulation: int) -> tuple[int, int]:
    """(epoch in which the budget ends, micro-batches of that epoch within the budget): B = min(a_min·steps, S)."""
    loop = record.loop
    epoch = min((loop.max_steps - 1) // loop.num_update_steps_per_epoch, loop.num_train_epochs - 1)
    steps_left = loop.max_steps - epoch * loop.num_update_steps_per_epoch
    return epoch, min(steps_left * min_accumulation, loop.steps_in_epoch)


def check_run(record: Record, min_accumulation: int, *, foreign: bool = False, foreseeable: bool = False) -> None:
    """Properties (a)-(f) of one train() call that ran to its end (``foreign``: someone else also set GA;
    ``foreseeable``: the targets are a function of the progress alone)."""
    loop, steps = record.loop, record.steps
    size = loop.steps_in_epoch
    # (a) every optimizer step is exactly one fetched group: sync at the group's last micro-batch, no step spanning
    # two groups, no group spanning two steps; nothing trained is left out of a step
    fetched = [group.ids for group in record.groups if group.ids]
    assert [step.ids for step in steps] == fetched
    assert record.unsynced == []
    assert foreign or all(group.accumulation % min_accumulation == 0 for group in record.groups)
    # (d) on_step_begin once per step, at its first micro-batch (a foreign GA may move it, unseen by the controller)
    assert foreign or record.step_begins == [step.ids[0] for step in steps]
    # (c) stopped by the callback exactly at the budget (DefaultFlowCallback at most at the same step): no overshoot
    assert record.stopped_by in (["callback"], ["DefaultFlowCallback", "callback"]), record.stopped_by
    controller = record.controller
    last_epoch, budget_micro = budget_point(record, min_accumulation)
    assert (controller.epoch, controller.position) == (last_epoch, budget_micro) == (steps[-1].ids[-1][0], budget_micro)
    assert controller.progress == loop.max_steps
    # (b) each epoch's micro-batches consumed exactly once, in order; all of them for every epoch before the last
    consumed = [index for step in steps for index in step.ids]
    assert len(set(consumed)) == len(consumed)
    for epoch in sorted({epoch for epoch, _ in consumed}):
        positions = [index for e, index in consumed if e == epoch]
        assert positions == list(range(size if epoch < last_epoch else budget_micro))
    # (e) the batch never decreases, except for the epoch's last group and groups cut by the budget
    previous = 0
    for step in steps:
        epoch, start = step.ids[0]
        epoch_end = step.ids[-1][1] == size - 1
        cut = epoch == last_epoch and budget_micro - start < previous
        if cut or not epoch_end:
            assert cut or len(step.ids) >= previous, (steps, step)
            previous = len(step.ids)
    # (f) the learning rate follows the data: its positions never go back and end at the budget; the steps
    # expected at train start are the steps taken when the targets could be foreseen
    if not foreign:
        positions = record.lr_positions
        assert positions == sorted(positions) and positions[-1] == loop.max_steps, positions
    if foreseeable:
        assert record.expected_at_start == len(steps)
