"""Resuming a GNSCallback run is never silently wrong: the saved state is checked against the run that loads it.

One run (24 rows, 2 epochs, a linear schedule from 1 to 4 examples, a checkpoint every 5 steps) is resumed from
its step 10, where the batch has grown to 2: with changed options (applied from there with a warning listing old
and new values, every example of each epoch still trained exactly once; or refused naming the option and both
values), with ``restore_callback_states_from_checkpoint=True``, with another run shape, and from damaged copies of
the checkpoint (each an error naming ``trainer_state.json`` and the key; a truncated file, which ``Trainer.train``
reads before any callback event, is named too).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter

import pytest

from hf_gns_spam import GNSCallback
from hf_gns_spam.errors import CheckpointError
from tests.support import model_zoo
from tests.support.processes import torchrun
from tests.support.schedule_runs import rows, run

pytestmark = pytest.mark.slow

CHECKPOINT_STEP = 10  # steps 9-16 are of 2 examples


def schedule(**changes) -> GNSCallback:
    return GNSCallback(**{"schedule": "linear", "min_batch_size": 1, "max_batch_size": 4, **changes})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """(the checkpoint directory of step 10, the rows each optimizer step of the first run trained)."""
    directory = tmp_path_factory.mktemp("first")
    trainer, auditor = run(directory, schedule(), num_train_epochs=2, save_strategy="steps", save_steps=5)
    trainer.train()
    checkpoint = directory / "out" / f"checkpoint-{CHECKPOINT_STEP}"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["GNSCallback"]
    assert saved["attributes"]["controller_state"]["accumulation"] == 2
    assert saved["run"] == {"processes": 1, "per_device_train_batch_size": 1}
    return checkpoint, [rows(step) for step in auditor.steps]


def resume(tmp_path, checkpoint, callback: GNSCallback, **overrides):
    trainer, auditor = run(tmp_path, callback, model=model_zoo.build("llama", seed=5), num_train_epochs=2, **overrides)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer, auditor


def assert_every_example_once_per_epoch(first_steps, auditor) -> None:
    """The first run's steps up to the checkpoint and the resumed run's steps train every row once per epoch."""
    trained = [row for step in first_steps[:CHECKPOINT_STEP] for row in step]
    trained += [row for step in auditor.steps for row in rows(step)]
    counts = Counter(trained)
    assert len(counts) == 24 and set(counts.values()) == {2}, counts


@pytest.mark.parametrize("restore", [False, True], ids=["user-instance", "restore_callback_states"])
def test_a_lower_max_batch_size_applies_from_the_resume_point(first_run, tmp_path, caplog, restore):
    """max_batch_size 4 -> 2 (the batch in force is 2): a warning names the change, no step is larger than 2, and
    every row is trained once per epoch; with restore_callback_states_from_checkpoint=True too (transformers would
    otherwise rebuild the callback from the saved options and train at batch 4)."""
    checkpoint, first_steps = first_run
    callback = schedule(max_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="hf_gns_spam.gns.callback"):
        trainer, auditor = resume(tmp_path, checkpoint, callback, restore_callback_states_from_checkpoint=restore)
    assert "trainer_state.json" in caplog.text and "max_batch_size 4 -> 2" in caplog.text
    assert callback in trainer.callback_handler.callbacks  # the user's instance, with the user's options
    sizes = [r["batch_size"] for r in trainer.state.log_history if "batch_size" in r and r["step"] > CHECKPOINT_STEP]
    assert sizes and set(sizes) == {2}
    assert_every_example_once_per_epoch(first_steps, auditor)
    assert callback.samples == 48


def test_a_changed_ema_decay_applies_to_the_restored_estimates(first_run, tmp_path, caplog):
    checkpoint, first_steps = first_run
    callback = schedule(ema_decay=0.5)
    with caplog.at_level(logging.WARNING, logger="hf_gns_spam.gns.callback"):
        _, auditor = resume(tmp_path, checkpoint, callback)
    assert "ema_decay 0.99 -> 0.5" in caplog.text
    estimator = callback.estimates.estimator
    assert estimator.ema_decay == 0.5 and estimator.updates + estimator.skipped == 24  # batch 1 steps: skipped
    assert_every_example_once_per_epoch(first_steps, auditor)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_batch_size": 1}, r"max_batch_size=1, below it, and the batch never decreases"),
        (
            {"min_batch_size": 2, "max_batch_size": 4},
            r"GNSCallback\(min_batch_size=1\), and this run passes min_batch_size=2",
        ),
        (
            {"schedule": "gns", "min_batch_size": 2},
            r"GNSCallback\(schedule='linear'\), and this run passes schedule='gns'",
        ),
    ],
    ids=["max-below-the-batch", "min_batch_size", "schedule"],
)
def test_a_change_that_cannot_apply_is_refused_before_any_step(first_run, tmp_path, changes, message):
    checkpoint, _ = first_run
    with pytest.raises(CheckpointError, match=message) as raised:
        resume(tmp_path, checkpoint, schedule(**changes))
    assert str(checkpoint / "trainer_state.json") in str(raised.value)


def edited_copy(tmp_path, checkpoint, edit) -> str:
    """A copy of the checkpoint whose trainer_state.json ``edit(state)`` changed (or replaced, if it returns str)."""
    copy = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy)
    path = copy / "trainer_state.json"
    state = json.loads(path.read_text())
    edited = edit(state)
    path.write_text(edited if isinstance(edited, str) else json.dumps(state))
    return copy


def gns_attributes(state: dict) -> dict:
    return state["stateful_callbacks"]["GNSCallback"]["attributes"]


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda s: gns_attributes(s).update(controller_state=None), "attributes.controller_state"),
        (lambda s: gns_attributes(s)["controller_state"].update(accumulation=0), "controller_state.accumulation"),
        (lambda s: gns_attributes(s)["estimator_state"].update(grad_sq_ema=math.nan), "estimator_state.grad_sq_ema"),
        (lambda s: gns_attributes(s).update(samples="48"), "attributes.samples"),
        (lambda s: gns_attributes(s).pop("samples"), "attributes.samples"),
        (lambda s: gns_attributes(s)["group_estimator_states"]["block"].pop("updates"), "block.updates"),
        (lambda s: s["stateful_callbacks"]["GNSCallback"].update(run={"processes": 0}), "run"),
    ],
    ids=["position-null", "accumulation-0", "nan-estimate", "string", "missing-key", "group-field", "run-shape"],
)
def test_a_damaged_callback_state_names_the_file_and_the_key(first_run, tmp_path, edit, key):
    checkpoint, _ = first_run
    damaged = edited_copy(tmp_path, checkpoint, edit)
    with pytest.raises(CheckpointError, match="damaged") as raised:
        resume(tmp_path, damaged, schedule())
    assert str(damaged / "trainer_state.json") in str(raised.value) and key in str(raised.value)


@pytest.mark.parametrize("how", ["path", "last-in-output-dir"])
def test_a_truncated_trainer_state_names_the_file_and_the_other_checkpoints(first_run, tmp_path, how):
    """Cut short as an interrupted save leaves it; resumed by its path or as the last checkpoint of output_dir."""
    checkpoint, _ = first_run
    output_dir = tmp_path / "out"  # run()'s output_dir
    shutil.copytree(checkpoint.parent / "checkpoint-5", output_dir / "checkpoint-5")
    damaged = edited_copy(output_dir, checkpoint, lambda state: json.dumps(state)[:500])
    trainer, _ = run(tmp_path, schedule(), num_train_epochs=2)
    with pytest.raises(CheckpointError, match="is not valid JSON") as raised:
        trainer.train(resume_from_checkpoint=str(damaged) if how == "path" else True)
    message = str(raised.value)
    assert str(damaged / "trainer_state.json") in message and "beside it: checkpoint-5)" in message


def test_a_trainer_state_that_is_not_an_object_names_the_file(first_run, tmp_path):
    checkpoint, _ = first_run
    damaged = edited_copy(tmp_path, checkpoint, lambda state: "[]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object") as raised:
        resume(tmp_path, damaged, schedule())
    assert str(damaged / "trainer_state.json") in str(raised.value)


@pytest.mark.parametrize("restore", [False, True], ids=["user-instance", "restore_callback_states"])
def test_damaged_saved_options_name_the_file(first_run, tmp_path, restore):
    """Saved options out of range: refused by the callback's own check, or (restore_callback_states_from_checkpoint)
    when transformers rebuilds the callback from them; either way naming trainer_state.json."""
    checkpoint, _ = first_run
    damaged = edited_copy(
        tmp_path, checkpoint, lambda s: s["stateful_callbacks"]["GNSCallback"]["args"].update(ema_decay=2.0)
    )
    with pytest.raises(CheckpointError, match=r"ema_decay must be in \[0, 1\)") as raised:
        resume(tmp_path, damaged, schedule(), restore_callback_states_from_checkpoint=restore)
    assert str(damaged / "trainer_state.json") in str(raised.value)


@pytest.mark.parametrize(
    ("saved_run", "named"),
    [
        ({"processes": 2, "per_device_train_batch_size": 1}, "processes=2, and this run has processes=1"),
        ({"processes": 1, "per_device_train_batch_size": 2}, "per_device_train_batch_size=2, and this run has"),
    ],
    ids=["world-size", "per-device-batch"],
)
def test_another_run_shape_is_refused_naming_it(first_run, tmp_path, saved_run, named):
    """A checkpoint saved with 2 processes (or a per-device batch of 2) resumed by 1 process with a per-device batch
    of 1: the saved position counts other micro-batches, so the resume stops before any step, naming the shape."""
    checkpoint, _ = first_run
    other = edited_copy(tmp_path, checkpoint, lambda s: s["stateful_callbacks"]["GNSCallback"].update(run=saved_run))
    with pytest.raises(CheckpointError, match=named):
        resume(tmp_path, other, schedule())


def test_a_two_process_checkpoint_resumed_by_one_process_is_refused_naming_the_world_size(tmp_path):
    """A real 2-process DDP run (torchrun, gloo) saves a checkpoint; one process resuming it, with the same options
    and per-device batch, stops before any step, naming the processes."""
    torchrun(tmp_path, "linear", "save")
    checkpoint = tmp_path / "trainer" / "checkpoint-3"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["GNSCallback"]
    assert saved["run"] == {"processes": 2, "per_device_train_batch_size": 2}
    callback = GNSCallback(schedule="linear", min_batch_size=4, max_batch_size=12, warmup_steps=2, update_interval=2)
    with pytest.raises(CheckpointError, match="processes=2, and this run has processes=1") as raised:
        resume(tmp_path / "one", checkpoint, callback, per_device_train_batch_size=2, max_grad_norm=0.0)
    assert "torchrun --nproc_per_node" in str(raised.value)
