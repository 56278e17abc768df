"""hf_gns_spam.plotting: the data axis (tokens, else examples: GNSCallback's logged count, or reconstructed from the
logged batch sizes), its label and shared unit, readable log-axis ticks, and the steps and data each overlaid run
needs to reach the first run's final held-out loss. Synthetic trainer_state.json files, and real Trainer runs whose
batch grows."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hf_gns_spam.plotting import (
    compact_count,
    data_axis_label,
    data_values,
    examples_seen,
    first_crossing,
    load_run,
    plain_number,
    plot_figure,
    saving_text,
    shared_data_unit,
)


def write_run(folder: Path, log_history: list[dict], **state) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": log_history, **state}))
    return folder


def training_log(batches: list[int], log_every: int = 1, tokens_per_example: int | None = None) -> list[dict]:
    """One training record every ``log_every`` steps, ``batch_size`` the logged step's batch (GNSCallback's)."""
    records, examples = [], 0
    for step, batch in enumerate(batches, start=1):
        examples += batch
        if step % log_every == 0:
            record = {"step": step, "loss": 5.0 - step / 100, "gns": 4.0 + step / 10, "batch_size": batch}
            if tokens_per_example is not None:
                record["num_input_tokens_seen"] = tokens_per_example * examples
            records.append(record)
    return records


def test_examples_hold_the_logged_batch_until_the_next_record():
    records = [{"step": 2, "batch_size": 4}, {"step": 4, "batch_size": 8}, {"step": 7, "batch_size": 16}]
    # batches 4 4 | 8 8 | 16 16 16 | 16 16: each record's since the previous record, the last one's after it
    assert examples_seen(records, list(range(1, 10))) == [4, 8, 16, 24, 40, 56, 72, 88, 104]
    assert examples_seen(records, [3, 9], fixed_batch_size=6) == [18, 54]


def test_logged_examples_seen_are_exact_where_the_batch_changed_between_records():
    """GNSCallback's examples_seen (E at each record's step) is used where logged; a record without it continues
    from the previous record at its own batch; steps between records count back from the following one."""
    batches = [2, 2, 2, 4, 4, 8, 8, 8]  # the batch grew after steps 3 and 5, between the records (every 2 steps)
    truth = [sum(batches[:step]) for step in range(1, 9)]
    records = [
        {"step": step, "batch_size": batches[step - 1], "examples_seen": truth[step - 1]} for step in (2, 4, 6, 8)
    ]
    old = [{k: v for k, v in record.items() if k != "examples_seen"} for record in records]
    assert examples_seen(old, [2, 4, 6, 8]) == [4, 12, 28, 44]  # the reconstruction alone: each batch held too long
    assert examples_seen(records, [2, 4, 6, 8]) == [4, 10, 22, 38] == truth[1::2]
    assert examples_seen(records, [1, 3, 5, 7, 9]) == [2, 6, 14, 30, 46]  # between records, and after the last
    # nan at step 4 (a run resumed from a checkpoint without the callback's state), none at step 6 (an older log)
    mixed = [records[0], {**records[1], "examples_seen": float("nan")}, old[2], records[3]]
    assert examples_seen(mixed, [2, 4, 6, 8]) == [4, 4 + 2 * 4, 4 + 2 * 4 + 2 * 8, 38]
    # counting back from a following record at its (larger) batch stops at the previous record's count
    jump = [{"step": 2, "batch_size": 2, "examples_seen": 4}, {"step": 6, "batch_size": 8, "examples_seen": 18}]
    assert examples_seen(jump, [3, 5, 6]) == [4, 10, 18]


def test_a_run_without_token_counts_is_drawn_against_examples(tmp_path):
    batches = [4] * 4 + [8] * 4 + [16] * 4
    run = load_run("gns", write_run(tmp_path / "gns", training_log(batches)))
    assert not run.counts_tokens and run.logs_batch_sizes
    unit = shared_data_unit([run])
    assert unit == "examples" and data_axis_label([run], unit) == "examples seen"
    cumulative = [sum(batches[:step]) for step in range(1, 13)]
    assert data_values(run, unit, run.records) == cumulative == [4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112]

    figure = plot_figure({"gns": tmp_path / "gns"})
    data_axis, steps_axis, gns_axis, batch_axis = figure.axes
    assert data_axis.get_xlabel() == gns_axis.get_xlabel() == batch_axis.get_xlabel() == "examples seen"
    assert data_axis.get_title() == "Loss against examples"
    assert list(data_axis.get_lines()[0].get_xdata()) == cumulative  # the training loss against examples
    assert list(steps_axis.get_lines()[0].get_xdata()) == list(range(1, 13))


def test_runs_with_different_batch_growth_line_up_in_examples(tmp_path):
    fixed = load_run("fixed", write_run(tmp_path / "fixed", training_log([4] * 22)))
    # the batch grows right after logged steps (2 and 4), so the logged batch sizes give the examples exactly
    growing_batches = [4, 4, 8, 8, 16, 16, 16, 16]
    growing = load_run("gns", write_run(tmp_path / "gns", training_log(growing_batches, log_every=2)))
    unit = shared_data_unit([fixed, growing])
    assert unit == "examples"
    growing_x = data_values(growing, unit, growing.records)
    assert growing_x == [sum(growing_batches[:step]) for step in (2, 4, 6, 8)] == [8, 24, 56, 88]
    # the same data at different optimizer steps: the growing run's steps 2, 4, 6, 8 are the fixed run's 2, 6, 14, 22
    fixed_x = data_values(fixed, unit, fixed.records)
    assert [r["step"] for r, x in zip(fixed.records, fixed_x, strict=True) if x in growing_x] == [2, 6, 14, 22]


def test_runs_that_do_not_all_count_tokens_share_examples(tmp_path):
    with_tokens = load_run("tokens", write_run(tmp_path / "a", training_log([4] * 3, tokens_per_example=32)))
    without = load_run("no tokens", write_run(tmp_path / "b", training_log([8] * 3)))
    assert shared_data_unit([with_tokens]) == "tokens"
    assert data_values(with_tokens, "tokens", with_tokens.records) == [128, 256, 384]
    unit = shared_data_unit([with_tokens, without])
    assert unit == "examples"  # never tokens for one run and examples for the other on one axis
    assert data_values(with_tokens, unit, with_tokens.records) == [4, 8, 12]
    assert data_axis_label([with_tokens, without], unit) == "examples seen (no token count: no tokens)"
    figure = plot_figure({"tokens": tmp_path / "a", "no tokens": tmp_path / "b"})
    assert figure.axes[0].get_xlabel() == "examples seen (no token count: no tokens)"
    assert list(figure.axes[0].get_lines()[0].get_xdata()) == [4, 8, 12]


def test_without_batch_sizes_the_trainer_arguments_give_the_batch(tmp_path):
    import torch
    from transformers import TrainingArguments

    records = [{"step": step, "loss": 5.0 - step / 10} for step in (2, 4, 6)]
    folder = write_run(tmp_path / "plain", records, train_batch_size=3)
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, gradient_accumulation_steps=5, use_cpu=True
    )
    torch.save(arguments, folder / "training_args.bin")  # what Trainer.save_model writes
    run = load_run("plain", folder)
    assert run.fixed_batch_size == 15 and shared_data_unit([run]) == "examples"
    assert data_values(run, "examples", run.records) == [30, 60, 90]
    assert data_axis_label([run], "examples") == "examples seen (fixed batch from the Trainer's arguments: plain)"

    unknown = load_run("unknown", write_run(tmp_path / "unknown", records))  # no training_args.bin
    assert unknown.fixed_batch_size is None and shared_data_unit([run, unknown]) == "steps"
    assert data_axis_label([run, unknown], "steps") == "optimizer steps (no token count or batch size: unknown)"


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.05, "0.05"), (2.0, "2"), (5.6, "5.6"), (20.0, "20"), (2.5, "2.5"), (1500.0, "1,500"), (0.0, "0")],
)
def test_plain_numbers(value, text):
    assert plain_number(value) == text


def test_compact_counts():
    assert [compact_count(x) for x in (374, 25_000, 1_230_000, 2.5e9)] == ["374", "25k", "1.23M", "2.5G"]


def gns_tick_labels(folder: Path) -> tuple[list[str], list[str]]:
    figure = plot_figure({"run": folder})
    figure.draw_without_rendering()
    gns_axis = figure.axes[2]
    low, high = gns_axis.get_ylim()
    major = [t.get_text() for t in gns_axis.yaxis.get_majorticklabels() if low <= t.get_position()[1] <= high]
    return major, [t.get_text() for t in gns_axis.yaxis.get_minorticklabels() if t.get_text()]


def test_gns_ticks_are_plain_numbers_within_a_decade_and_across_decades(tmp_path):
    records = training_log([4] * 30)
    for step, record in enumerate(records):
        record["gns"] = 5.2 + 0.02 * step  # 5.2 .. 5.78: no power of ten in range
    major, minor = gns_tick_labels(write_run(tmp_path / "narrow", records))
    assert len(major) >= 2 and all(re.fullmatch(r"\d+(\.\d+)?", label) for label in major), major
    assert minor == []

    for step, record in enumerate(records):
        record["gns"] = 0.5 * 1.35**step  # 0.5 .. 3,000
    major, minor = gns_tick_labels(write_run(tmp_path / "wide", records))
    assert {"1", "10", "100", "1,000"} <= set(major) and minor == []
    assert all(re.fullmatch(r"[\d,]+(\.\d+)?", label) for label in major), major


def test_the_gns_panel_draws_the_all_norm_and_the_block_estimates_where_logged(tmp_path):
    """gns (all norms) solid and gns/block (what the "gns" schedule follows by default) dashed, each only where the
    run logged it; a run without gns/block gets no dashed line."""
    records = training_log([4] * 10)
    for step, record in enumerate(records):
        record["gns"], record["gns/block"] = 2.0 + step, (10.0 + step if step >= 3 else math.nan)
    older = training_log([4] * 10)
    for step, record in enumerate(older):
        record["gns"] = 3.0 + step
    figure = plot_figure({"new": write_run(tmp_path / "new", records), "old": write_run(tmp_path / "old", older)})
    lines = {line.get_label(): line for line in figure.axes[2].get_lines()}
    assert set(lines) == {"new: gns (all norms)", "new: gns/block", "old: gns (all norms)"}
    assert list(lines["new: gns/block"].get_ydata()) == [10.0 + step for step in range(3, 10)]
    assert lines["new: gns/block"].get_linestyle() == "--" and lines["new: gns (all norms)"].get_linestyle() == "-"


def evaluated_run(folder: Path, batch: int, eval_steps: list[int], eval_losses: list[float]) -> Path:
    steps = max(eval_steps)
    log = training_log([batch] * steps, log_every=5)
    log += [{"step": s, "eval_loss": loss} for s, loss in zip(eval_steps, eval_losses, strict=True)]
    return write_run(folder, log)


def test_saving_text_for_a_baseline_overlay(tmp_path):
    runs = {
        "gns": evaluated_run(tmp_path / "gns", 16, [10, 20, 30], [5.0, 4.5, 4.0]),
        "fixed batch 4": evaluated_run(tmp_path / "fixed", 4, [20, 40, 60, 80], [5.0, 4.6, 4.2, 3.8]),
        "never": evaluated_run(tmp_path / "never", 4, [20, 40], [5.0, 4.4]),
    }
    loaded = [load_run(label, folder) for label, folder in runs.items()]
    # by hand: target 4.0, the gns run's last; gns reaches it at step 30 (30 x 16 = 480 examples); the fixed batch
    # between its evaluations at 60 (4.2) and 80 (3.8): 60 + 20 x 0.2 / 0.4 = 70 steps, 280 examples;
    # 30 / 70 - 1 = -57.1% steps, 480 / 280 - 1 = +71.4% examples
    assert first_crossing([60, 80], [4.2, 3.8], 4.0) == 70
    assert saving_text(loaded, "examples") == (
        "to gns's final held-out loss 4.000: gns 30 steps, 480 examples\n"
        "fixed batch 4: 70 steps, 280 examples (gns: -57.1% steps, +71.4% examples)\n"
        "never: not reached in 40 steps (lowest held-out loss 4.400)"
    )
    figure = plot_figure(runs)
    assert saving_text(loaded, "examples") in [text.get_text() for text in figure.texts]
    assert saving_text(loaded[:1], "examples") == ""  # one run: nothing to compare with


def test_no_saving_text_without_held_out_evaluations(tmp_path):
    runs = [load_run(name, write_run(tmp_path / name, training_log([4] * 10))) for name in ("a", "b")]
    assert saving_text(runs, "examples") == ""
    assert plot_figure({"a": tmp_path / "a", "b": tmp_path / "b"}).texts == []


@pytest.mark.slow
@pytest.mark.parametrize("interval", [4, 3], ids=["decisions-at-records", "decisions-between-records"])
def test_a_growing_batch_without_token_counts_from_a_real_trainer(tmp_path, interval):
    """The examples axis of a real run (GNSCallback's "gns" schedule deciding every ``interval`` steps, a record
    every 2, tokens not counted) equals the examples GNSCallback itself consumed by each logged step: its logged
    ``examples_seen``. The reconstruction from ``batch_size`` alone (runs logged before ``examples_seen``) is exact
    too where the batch changes right after logged steps (every 4), and not where it changes between them (every 3:
    the batch of step 4, after the decision at step 3, is taken for step 3 as well)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_gns_spam import GNSCallback, patch_model
    from tests.support.tiny_llama import counting_dataset, tiny_llama

    class ExamplesPerStep(TrainerCallback):
        def __init__(self, gns: GNSCallback):
            self.gns, self.samples = gns, {}

        def on_step_end(self, args, state, control, **kwargs):
            self.samples[state.global_step] = self.gns.samples

    model = tiny_llama()
    patch_model(model)
    gns = GNSCallback(  # batches 2, 4, 8: each divides the 64 examples, so no epoch ends on a shorter step
        schedule="gns",
        min_batch_size=2,
        max_batch_size=8,
        warmup_steps=interval,
        update_interval=interval,
        gns_multiplier=50,
    )
    spy = ExamplesPerStep(gns)
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        num_train_epochs=2,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=counting_dataset(64), callbacks=[gns, spy])
    trainer.train()
    trainer.save_state()

    run = load_run("gns", tmp_path / "run")
    assert not run.counts_tokens and shared_data_unit([run]) == "examples"
    assert {r["batch_size"] for r in run.records} == {2, 4, 8}  # the batch grew
    steps = [r["step"] for r in run.records]
    counted = [spy.samples[step] for step in steps]
    assert [r["examples_seen"] for r in run.records] == counted
    assert data_values(run, "examples", run.records) == counted
    reconstructed = examples_seen([{k: v for k, v in r.items() if k != "examples_seen"} for r in run.records], steps)
    assert (reconstructed == counted) == (interval == 4), (reconstructed, counted)
