"""The end of a run with a batch schedule is the Trainer's own: the final checkpoint, evaluation and progress bar,
in a Trainer and through ``hf-gns-spam launch``, for ``max_steps`` and (fractional) ``num_train_epochs`` budgets;
the Trainer's printed step count explained once. Each case is compared with the same run without a schedule."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from hf_gns_spam import GNSCallback, patch_model
from hf_gns_spam.gns.accumulation import AccumulationError
from tests.support import model_zoo
from tests.support.data import padded_dataset
from tests.support.paths import TEST_SCRIPTS
from tests.support.processes import run_offline, run_torchrun

EXPLANATION = "with a batch schedule the run's length is a budget in data"
PLAIN_SCRIPT = TEST_SCRIPTS / "plain_trainer.py"
# 24 examples, one per micro-batch, from 2 a step (12 steps an epoch at the fixed batch): budget -> its examples
BUDGETS = {
    "max_steps": ({"max_steps": 10}, 20),  # stops inside the first epoch
    "fractional_epochs": ({"num_train_epochs": 1.5}, 36),  # 18 steps of 2
    "two_epochs": ({"num_train_epochs": 2}, 48),  # the schedule's stop is the end of an epoch
}


class BarRecorder(TrainerCallback):
    """The progress bar's total at the start of every optimizer step, and its count and total when training ends
    (the ProgressCallback comes after every other callback, so it has not closed the bar yet)."""

    def __init__(self) -> None:
        self.progress: ProgressCallback | None = None
        self.totals: list[int] = []
        self.end: tuple[int, int] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.totals.append(self.progress.training_bar.total)

    def on_train_end(self, args, state, control, **kwargs):
        self.end = (self.progress.training_bar.n, self.progress.training_bar.total)


def train(
    output_dir: Path,
    schedule: str | None,
    resume_from: str | None = None,
    others: tuple[TrainerCallback, ...] = (),
    **overrides,
) -> tuple[Trainer, GNSCallback, BarRecorder]:
    """A tiny LLaMA on 24 examples, one a micro-batch: a fixed batch of 2 (schedule None), or a schedule from 2 to 8
    ("gns" grows by the cap at every decision, from step 2 on)."""
    model = model_zoo.build("llama")
    patch_model(model)
    if schedule is None:
        callback = GNSCallback()
    else:
        callback = GNSCallback(
            schedule, min_batch_size=2, max_batch_size=8, warmup_steps=2, update_interval=2, gns_multiplier=1e6
        )
    settings = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,  # the fixed batch; a schedule sets its own from min_batch_size
        "learning_rate": 1e-3,
        "optim": "stable_spam",
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1000,  # more than the run: only the Trainer's end-of-training save
        "eval_strategy": "steps",
        "eval_steps": 1000,  # likewise the evaluation
        "seed": 0,
        "use_cpu": True,
        "disable_tqdm": False,  # the progress bar is under test
    }
    settings.update(overrides)
    recorder = BarRecorder()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=padded_dataset(size=24),
        eval_dataset=padded_dataset(size=4, seed=1),
        callbacks=[callback, recorder, *others],
    )
    recorder.progress = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback))
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, callback, recorder


def checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("checkpoint-*"))


def explanations(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "hf_gns_spam.gns.callback" and EXPLANATION in r.getMessage()]


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS, ids=list(BUDGETS))
@pytest.mark.parametrize("schedule", [None, "linear", "gns"], ids=["fixed", "linear", "gns"])
def test_the_run_ends_as_the_trainer_ends_it(tmp_path, caplog, schedule, budget):
    overrides, examples = BUDGETS[budget]
    trainer, callback, bar = train(tmp_path / "out", schedule, **overrides)
    state = trainer.state
    last = state.global_step
    assert callback.samples == examples  # the same data as the fixed batch
    sizes = [r["batch_size"] for r in state.log_history if "loss" in r]
    assert len(sizes) == last and sum(sizes) == examples
    if schedule is not None:
        assert max(sizes) > 2 and last < examples // 2  # the batch grew: fewer steps than the fixed batch's
    # the Trainer's own end of training: the save of save_strategy="steps", the evaluation of eval_strategy="steps"
    assert state.max_steps == last
    assert checkpoints(tmp_path / "out") == [f"checkpoint-{last}"]
    assert [r["step"] for r in state.log_history if "eval_loss" in r] == [last]
    # the progress bar ends full, at the steps taken
    assert bar.end == (last, last)
    if schedule == "linear":  # known in advance: the total never moved
        assert bar.totals == [last] * last
    elif schedule == "gns":  # the batch as it is: the total moves only when the batch grows, and only down
        assert bar.totals == sorted(bar.totals, reverse=True) and bar.totals[-1] == last
        for step in range(1, last):
            assert bar.totals[step] == bar.totals[step - 1] or sizes[step] > sizes[step - 1], (bar.totals, sizes)
    assert len(explanations(caplog)) == (0 if schedule is None else 1)


@pytest.mark.slow
@pytest.mark.parametrize("save_strategy", ["no", "epoch", "best"])
@pytest.mark.parametrize("schedule", [None, "linear", "gns"], ids=["fixed", "linear", "gns"])
def test_each_save_strategy_saves_at_the_end_as_the_trainer_does(tmp_path, schedule, save_strategy):
    """``max_steps`` ends the run inside an epoch: "epoch" saves at the epoch's end the stop leads to, "best" saves
    after the final evaluation (the first, so the best), "no" saves nothing."""
    extra = {"metric_for_best_model": "loss"} if save_strategy == "best" else {}
    trainer, _, _ = train(tmp_path / "out", schedule, max_steps=10, save_strategy=save_strategy, **extra)
    last = trainer.state.global_step
    assert checkpoints(tmp_path / "out") == ([] if save_strategy == "no" else [f"checkpoint-{last}"])


@pytest.mark.slow
def test_a_resumed_run_ends_as_the_trainer_ends_it(tmp_path, caplog):
    straight, _, _ = train(tmp_path / "straight", "linear", num_train_epochs=2)
    train(tmp_path / "out", "linear", num_train_epochs=2, save_steps=5)
    resumed, callback, bar = train(
        tmp_path / "out", "linear", resume_from=str(tmp_path / "out" / "checkpoint-5"), num_train_epochs=2, save_steps=5
    )
    last = resumed.state.global_step
    assert last == straight.state.global_step and callback.samples == 48
    assert f"checkpoint-{last}" in checkpoints(tmp_path / "out") and last % 5
    assert bar.end == (last, last) and set(bar.totals) == {last}
    assert len(explanations(caplog)) == 3  # once a train() call


class LowersMaxSteps(TrainerCallback):
    """Sets state.max_steps to the step being counted, after GNSCallback set it: the Trainer would stop there."""

    def on_optimizer_step(self, args, state, control, **kwargs):
        state.max_steps = state.global_step + 1


def test_a_foreign_max_steps_is_a_loud_error(tmp_path):
    with pytest.raises(AccumulationError, match=r"state\.max_steps is 1 where the batch schedule's budget ends later"):
        train(tmp_path / "out", "linear", others=(LowersMaxSteps(),), max_steps=10)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_the_launcher_saves_the_final_checkpoint_of_a_scheduled_run(tmp_path, processes):
    """The report: ``--max_steps`` without a schedule saves its last step; with ``--gns-schedule gns`` the run ended
    in fewer steps and saved nothing. The explanation is logged by the main process only."""
    out = tmp_path / "run"
    arguments = ["-m", "hf_gns_spam.cli", "launch",
                 "--gns-schedule", "gns", "--max-batch-size", str(8 * processes), "--gns-warmup-steps", "2",
                 "--gns-update-interval", "2", "--gns-multiplier", "1e6",
                 str(PLAIN_SCRIPT), "--output_dir", str(out), "--optim", "stable_spam", "--learning_rate", "1e-3",
                 "--per_device_train_batch_size", "2", "--max_steps", "12", "--save_strategy", "steps",
                 "--save_steps", "1000", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
                 "--disable_tqdm", "true", *(["--ddp_backend", "gloo"] if processes > 1 else [])]  # fmt: skip
    if processes > 1:
        result = run_torchrun(arguments, outputs=out, processes=processes, cwd=tmp_path)
    else:
        result = run_offline([sys.executable, *arguments], tmp_path)
    state = json.loads((out / "trainer_state.json").read_text())
    sizes = [r["batch_size"] for r in state["log_history"] if "loss" in r]
    last = state["global_step"]
    assert sum(sizes) == 12 * 2 * processes and max(sizes) > 2 * processes and last < 12  # same data, fewer steps
    assert state["max_steps"] == last
    assert checkpoints(out) == [f"checkpoint-{last}"]
    assert result.stderr.count(EXPLANATION) == 1
