"""Batch-size schedules inside a real Trainer.train(): every step exact, data, LR, stop point and resume."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from datasets import Dataset
from torch.utils.data import IterableDataset

from hf_gns_spam import GNSCallback
from tests.support import model_zoo
from tests.support.data import padded_dataset
from tests.support.schedule_runs import rows, run


class Counting(IterableDataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __iter__(self):
        while True:
            yield from self.dataset


@pytest.mark.slow
def test_linear_schedule_epochs_every_step_exact_no_data_lost(tmp_path):
    callback = GNSCallback(schedule="linear", min_batch_size=1, max_batch_size=4)
    trainer, auditor = run(tmp_path, callback, num_train_epochs=2)
    trainer.train()
    assert auditor.max_relative_error < 1e-5
    sizes = [len(step) for step in auditor.steps]
    # 1 -> 4 in samples; a change waits until the epoch position is a multiple of it: 4 never comes in time
    assert sizes == [1] * 8 + [2] * 8 + [3] * 8 and callback.driver.controller.accumulation == 3
    assert trainer.args.gradient_accumulation_steps == 1  # the arguments come out as they went in
    # every example exactly once per epoch
    dataset_rows = sorted(tuple(r) for r in padded_dataset(size=24)["input_ids"])
    seen = rows([m for step in auditor.steps for m in step])
    assert len(seen) == 48 and sorted(seen[:24]) == dataset_rows and sorted(seen[24:]) == dataset_rows
    assert callback.samples == 48
    assert trainer.state.global_step == len(auditor.steps) < 48
    assert trainer.state.max_steps == trainer.state.global_step  # the horizon followed the growing batch
    # the logged batch sizes are the steps' sizes; the accumulation never decreases inside an epoch
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["batch_size"] for r in records] == sizes
    # LR in samples: step k used lr = base · f(samples before step k / min_batch_size) · (B_k / min_batch_size)^0.5
    # (the default lr_batch_power, square-root scaling)
    assert callback.lr_batch_power == 0.5
    factor = trainer.lr_scheduler.lr_lambdas[0]
    before = [sum(sizes[:k]) for k in range(len(sizes))]
    expected = [1e-3 * factor(s / 1) * (b / 1) ** 0.5 for s, b in zip(before, sizes, strict=True)]
    assert auditor.learning_rates == pytest.approx(expected, rel=1e-9)
    assert auditor.learning_rates[-1] < 0.02 * max(auditor.learning_rates)  # the cosine reached its end in data


@pytest.mark.slow
@pytest.mark.parametrize("iterable", [False, True], ids=["map", "iterable"])
def test_max_steps_budget_in_samples(tmp_path, iterable):
    data = padded_dataset(size=24)
    callback = GNSCallback(schedule="linear", min_batch_size=2, max_batch_size=6)
    trainer, auditor = run(
        tmp_path, callback, dataset=Counting(data) if iterable else data, max_steps=20, per_device_train_batch_size=2
    )
    trainer.train()
    assert auditor.max_relative_error < 1e-5
    sizes = [2 * len(step) for step in auditor.steps]
    assert sum(sizes) == callback.samples and len(sizes) < 20 and sizes[:6] == [2] * 6 and max(sizes) >= 4
    if iterable:  # the Trainer's iterable "epoch" is the budget: the last step is cut to end exactly there
        assert callback.samples == 40
    else:  # stops in the step that uses up max_steps x the starting batch = 40 examples
        assert 40 <= callback.samples < 40 + sizes[-1] and sizes == sorted(sizes)


@pytest.mark.slow
def test_gns_schedule_grows_with_the_measured_gns(tmp_path):
    callback = GNSCallback(
        schedule="gns", min_batch_size=2, max_batch_size=8, warmup_steps=3, update_interval=2, gns_multiplier=1e6
    )
    trainer, auditor = run(tmp_path, callback, num_train_epochs=2)
    trainer.train()
    assert auditor.max_relative_error < 1e-5
    sizes = [len(step) for step in auditor.steps]
    assert sizes[:3] == [2, 2, 2] and max(sizes) == 8
    assert trainer.args.gradient_accumulation_steps == 1  # the user's value, not the schedule's minimum (2)
    assert callback.samples == 48
    assert not math.isnan(callback.estimates.estimator.gns)  # inf is legitimate: the smoothed |G|² can be negative


@pytest.mark.slow
@pytest.mark.parametrize(
    ("saving", "step", "position"),
    [({"save_strategy": "steps", "save_steps": 11}, 11, 14), ({"save_strategy": "epoch"}, 16, 24)],
    ids=["mid-epoch", "epoch-end"],
)
def test_resume_is_bit_identical(tmp_path, saving, step, position):
    """From a checkpoint inside an epoch, after the batch grew, and from one at an epoch's end (whose next epoch
    starts at the schedule's target and learning rate for the data consumed, as in the uninterrupted run)."""

    def callback():
        return GNSCallback(schedule="linear", min_batch_size=1, max_batch_size=4)

    straight, _ = run(tmp_path / "a", callback(), num_train_epochs=2)
    straight.train()
    first, _ = run(tmp_path / "b", callback(), num_train_epochs=2, **saving)
    first.train()
    resumed_callback = callback()
    resumed, auditor = run(
        tmp_path / "b", resumed_callback, model=model_zoo.build("llama", seed=5), num_train_epochs=2, **saving
    )
    checkpoint = tmp_path / "b" / "out" / f"checkpoint-{step}"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["GNSCallback"]
    saved_position = saved["attributes"]["controller_state"]
    assert saved_position["accumulation"] == 2 and saved_position["position"] == position  # after the batch grew
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), (_, b) in zip(resumed.model.named_parameters(), straight.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_callback.samples == 48 and resumed.state.global_step == straight.state.global_step
    straight_callback = next(c for c in straight.callback_handler.callbacks if isinstance(c, GNSCallback))
    assert resumed_callback.estimates.estimator == straight_callback.estimates.estimator
    assert auditor.max_relative_error < 1e-5
    # the examples seen, logged every step, go on counting from the checkpoint's: the uninterrupted run's counts
    straight_records = [r for r in straight.state.log_history if "loss" in r]
    resumed_records = [r for r in resumed.state.log_history if "loss" in r]
    assert [r["step"] for r in resumed_records] == [r["step"] for r in straight_records]
    counts = list(itertools.accumulate(r["batch_size"] for r in straight_records))
    assert [r["examples_seen"] for r in resumed_records] == [r["examples_seen"] for r in straight_records] == counts
    assert counts[-1] == 48 and resumed_records[-1]["step"] > step  # records after the checkpoint's step


@pytest.mark.slow
def test_learning_rate_follows_the_batch_with_lr_batch_power(tmp_path):
    """lr = base · f(samples before the step / min_batch_size) · (B / B_min)^0.5, every step exact."""
    callback = GNSCallback(schedule="linear", min_batch_size=1, max_batch_size=4, lr_batch_power=0.5)
    trainer, auditor = run(tmp_path, callback, num_train_epochs=2)
    trainer.train()
    assert auditor.max_relative_error < 1e-5
    sizes = [len(step) for step in auditor.steps]
    assert max(sizes) > 1
    factor = trainer.lr_scheduler.lr_lambdas[0]
    before = [sum(sizes[:k]) for k in range(len(sizes))]
    expected = [1e-3 * factor(s) * size**0.5 for s, size in zip(before, sizes, strict=True)]
    assert auditor.learning_rates == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="lr_batch_power must be in"):
        GNSCallback(schedule="linear", min_batch_size=1, max_batch_size=4, lr_batch_power=2.0)
