"""The main job (examples/pretrain_clm.py) end to end at a tiny size, and the plot command line.

The end-to-end runs use the smallest settings that still test what they claim, and one thread per process
(``ONE_THREAD``): on a busy machine a tiny model's operations wait on their OpenMP threads far longer than they
compute (10x slower at load 5 on 2 cores), with the same results. No subprocess has a timeout: a slow machine must
not fail a test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from hf_gns_spam.cli import main as cli_main
from hf_gns_spam.gns.arguments import GNSConfig
from hf_gns_spam.integrations.known_warnings import (
    BITSANDBYTES_KERNELS_MESSAGE,
    KERNELS_OFFLINE_TRUST_MESSAGE,
    PIN_MEMORY_MESSAGE,
)
from hf_gns_spam.launch import GNS_OPTIONS
from tests.support.paths import REPO_ROOT
from tests.support.processes import run_torchrun

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# the third-party messages every offline CPU run printed, which a first contact must not show
KNOWN_MESSAGES = (BITSANDBYTES_KERNELS_MESSAGE, KERNELS_OFFLINE_TRUST_MESSAGE, PIN_MEMORY_MESSAGE)
# how the main job announces its scheduled run at the tests' size (micro-batch 4), with the default GNS settings
SCHEDULED_RUN = "GNS schedule (batch 4 to 16, 0.75 × GNS of the block norms, learning rate × (B/4)^0.5)"


@pytest.mark.slow
def test_pretrain_clm_writes_model_metrics_and_plot(tmp_path):
    """The main job's code path (scripts/main_job.sh: both runs, the evaluations, checkpoints, metrics.json, the
    plot) with its defaults apart from the sizes of the model and the data."""
    output_dir = tmp_path / "run"
    command = [
        sys.executable, str(REPO_ROOT / "examples" / "pretrain_clm.py"),
        "--output_dir", str(output_dir), "--max_corpus_bytes", "60000", "--vocab_size", "512",
        "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "64",
        "--block_size", "32", "--per_device_train_batch_size", "4", "--max_batch_size", "16",
        "--gns_warmup_steps", "4", "--gns_update_interval", "2", "--logging_steps", "2", "--disable_tqdm", "true",
        "--max_eval_examples", "32",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO_ROOT, env={**ONE_THREAD, "HF_HUB_OFFLINE": "1"}, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert not [message for message in KNOWN_MESSAGES if message in result.stderr + result.stdout]
    baseline_dir = output_dir / "baseline_fixed_batch"
    announcements = [  # each run announced as it starts, its result as it ends, in order
        f"run 1/2: {SCHEDULED_RUN} → {output_dir}\n",
        "run 1/2 done in ",
        f"run 2/2: fixed batch 4 baseline → {baseline_dir}\n",
        "run 2/2 done in ",
        f"model, metrics.json and gns_plot.png written to {output_dir}\n",
    ]
    positions = [result.stdout.find(line) for line in announcements]
    assert -1 not in positions and positions == sorted(positions), result.stdout[-4000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["final_train_loss"] < metrics["first_train_loss"] - 0.5  # the loss falls
    assert math.isfinite(metrics["eval_perplexity"]) and metrics["eval_perplexity"] == pytest.approx(
        math.exp(metrics["eval_loss"])
    )
    assert metrics["patched_norms"] == 5 and metrics["train_tokens"] > 0
    assert 0 < metrics["eval_accuracy"] < 1  # next-token accuracy through evaluate (a shipped module offline)
    history = metrics["history"]
    assert len(history) >= 5 and all(h["num_input_tokens_seen"] > 0 for h in history)
    assert any(h["gns"] is not None and math.isfinite(h["gns"]) for h in history)
    assert history[0]["batch_size"] == 4 and max(h["batch_size"] for h in history) > 4  # the batch grew
    assert (output_dir / "gns_plot.png").stat().st_size > 10_000

    # the fixed-batch baseline: same seed, data and budget, batch 4 throughout, its own output folder
    baseline = metrics["baseline"]
    assert {h["batch_size"] for h in baseline["history"]} <= {4, 1, 2, 3}  # 4, and an epoch's shorter last step
    assert baseline["train_tokens"] == metrics["train_tokens"]  # the same budget
    assert baseline["optimizer_steps"] > metrics["optimizer_steps"]
    assert baseline["first_train_loss"] == pytest.approx(metrics["first_train_loss"], rel=1e-6)  # same start
    assert (baseline_dir / "trainer_state.json").exists()
    for run in (metrics, baseline):  # held-out evaluations at 12 points evenly spaced in data, then the final one
        assert len(run["evaluations"]) == 13
    # each run's folder: its checkpoints at the evaluation points, the latest one kept (the 12th point is the last
    # step), and its own complete metrics.json
    for run, folder in ((metrics, output_dir), (baseline, baseline_dir)):
        assert [p.name for p in folder.glob("checkpoint-*")] == [f"checkpoint-{run['optimizer_steps']}"]
        assert (folder / f"checkpoint-{run['optimizer_steps']}" / "trainer_state.json").exists()
    assert metrics["complete"] and baseline["complete"]
    assert json.loads((baseline_dir / "metrics.json").read_text()) == json.loads(json.dumps(baseline))
    comparison = metrics["comparison"]
    assert comparison["target_loss"] == metrics["eval_loss"] and comparison["run_steps"] <= metrics["optimizer_steps"]
    if comparison["baseline_steps"] is not None:
        assert comparison["steps_saved"] == pytest.approx(1 - comparison["run_steps"] / comparison["baseline_steps"])
    assert (output_dir / "model.safetensors").exists() and (output_dir / "tokenizer.json").exists()

    # the console script draws the same figure from the run's trainer_state.json
    assert cli_main(["plot", str(output_dir), "--output", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 10_000
    both = ["plot", str(output_dir), str(baseline_dir), "--output", str(tmp_path / "both.png")]
    assert cli_main(both) == 0 and (tmp_path / "both.png").stat().st_size > 10_000

    # QLoRA on the model just trained (a local model): bitsandbytes 4-bit base weights, LoRA, stable_spam
    qlora_dir = tmp_path / "qlora"
    command = [
        sys.executable, str(REPO_ROOT / "examples" / "finetune_qlora.py"), "--model_name_or_path", str(output_dir),
        "--output_dir", str(qlora_dir), "--max_corpus_bytes", "60000", "--block_size", "32",
        "--per_device_train_batch_size", "4", "--max_steps", "4", "--logging_steps", "1", "--schedule", "none",
        "--max_eval_examples", "8", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO_ROOT, env={**ONE_THREAD, "HF_HUB_OFFLINE": "1"}, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # bitsandbytes is imported here: on a CPU with AVX512-BF16 it and kernels log two of the known messages
    assert not [message for message in KNOWN_MESSAGES if message in result.stderr + result.stdout]
    qlora_metrics = json.loads((qlora_dir / "metrics.json").read_text())
    assert len(qlora_metrics["history"]) == 4 and math.isfinite(qlora_metrics["final_train_loss"])
    assert qlora_metrics["patched_norms"] == 5 and 0 < qlora_metrics["trainable_parameters"] < 20_000
    assert 0.0 < qlora_metrics["eval_accuracy"] < 1.0  # next-token accuracy (hf_gns_spam.metrics, evaluate)
    assert (qlora_dir / "adapter_model.safetensors").exists()


def test_plot_command_reports_a_missing_run(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path)]) == 1
    assert "no trainer_state.json" in capsys.readouterr().err


def test_plot_command_overlays_runs_under_their_folder_names(tmp_path):
    from hf_gns_spam.cli import run_labels

    for name, batch in (("gns", 16), ("fixed", 8)):
        records = [
            {"step": k, "loss": 5 - k / 10, "num_input_tokens_seen": 100 * k * batch, "gns": 2.0, "batch_size": batch}
            for k in range(1, 6)
        ] + [{"step": 5, "eval_loss": 4.6, "num_input_tokens_seen": 500 * batch}]
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"log_history": records}))
    assert cli_main(["plot", str(tmp_path / "gns"), str(tmp_path / "fixed")]) == 0
    assert (tmp_path / "gns" / "gns_plot.png").stat().st_size > 10_000  # by default next to the first run's state
    assert run_labels([str(tmp_path / "gns"), str(tmp_path / "fixed")]) == {
        "gns": str(tmp_path / "gns"),
        "fixed": str(tmp_path / "fixed"),
    }
    twice = [str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")]
    assert list(run_labels(twice)) == twice  # the same folder name: the paths


@pytest.mark.slow
def test_walkthrough_notebook_runs_top_to_bottom(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO_ROOT / "notebooks" / "walkthrough.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=None,  # no limit per cell: a slow machine must not fail the test
        startup_timeout=3600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "patched 5 normalization module(s)" in printed  # what the notebook printed was read
    assert not [message for message in KNOWN_MESSAGES if message in printed]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot was drawn
    assert (tmp_path / "notebook_run" / "gns_plot.png").exists()


@pytest.mark.slow
def test_main_job_script_under_torchrun_two_processes(tmp_path):
    """accelerate launch cannot start several CPU processes without MPI (it falls back to one), so the suite runs
    the main job's script the way torchrun users do: 2 processes, gloo."""
    output_dir = tmp_path / "ddp"
    arguments = [
        str(REPO_ROOT / "examples" / "pretrain_clm.py"),
        "--output_dir", str(output_dir), "--max_corpus_bytes", "60000", "--vocab_size", "512",
        "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "64",
        "--block_size", "32", "--per_device_train_batch_size", "4", "--max_batch_size", "32",
        "--gns_warmup_steps", "4", "--gns_update_interval", "2", "--logging_steps", "2", "--disable_tqdm", "true",
        "--use_cpu", "true", "--ddp_backend", "gloo", "--baseline", "none", "--quantize", "int4",
        "--quantize_group_size", "16", "--eval_points", "2", "--max_eval_examples", "16",
    ]  # fmt: skip
    result = run_torchrun(arguments, outputs=output_dir, cwd=REPO_ROOT)
    assert result.stdout.count("written to") == 1  # one process writes the outputs
    assert result.stdout.count("run 1/1: GNS schedule") == 1 and result.stdout.count("run 1/1 done") == 1
    metrics = json.loads((output_dir / "metrics.json").read_text())
    sizes = [h["batch_size"] for h in metrics["history"]]
    assert sizes[0] == 8 and max(sizes) > 8  # 2 processes x 4 examples to start with, then the batch grew
    assert metrics["final_train_loss"] < metrics["first_train_loss"]
    assert metrics["quantized_layers"] == 14 and "baseline" not in metrics  # 7 projections x 2 layers, W4A4


def load_main_job():
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import pretrain_clm
    finally:
        sys.path.remove(str(REPO_ROOT / "examples"))
    return pretrain_clm


def test_comparison_interpolates_the_first_crossing():
    clm = load_main_job()
    run = [{"step": 10, "tokens": 100, "loss": 5.0}, {"step": 20, "tokens": 300, "loss": 4.0}]
    baseline = [
        {"step": 10, "tokens": 50, "loss": 5.5},
        {"step": 30, "tokens": 150, "loss": 4.5},
        {"step": 50, "tokens": 250, "loss": 3.5},
    ]
    comparison = clm.compare_to_baseline(run, baseline)
    # the baseline crosses 4.0 halfway between its 2nd and 3rd evaluations: step 40, 200 tokens
    assert comparison["baseline_steps"] == pytest.approx(40) and comparison["baseline_tokens"] == pytest.approx(200)
    assert comparison["steps_saved"] == pytest.approx(0.5) and comparison["tokens_saved"] == pytest.approx(-0.5)
    never = clm.compare_to_baseline(run, baseline[:2])
    assert never["baseline_steps"] is None and never["steps_saved"] is None


def test_main_job_refuses_an_unknown_quantization():
    clm = load_main_job()
    with pytest.raises(ValueError, match="--quantize must be one of"):
        clm.quantize_model(None, "int3", 256)
    with pytest.raises(ValueError, match="--baseline must be"):
        clm.main(["--baseline", "random", "--output_dir", "unused"])


def test_main_job_checkpoints_at_its_evaluation_points_unless_told_otherwise():
    clm = load_main_job()
    _, _, _, job, training = clm.parse_arguments(["--output_dir", "unused"])
    assert job.save_at_eval_points and training.save_total_limit == 1
    for flags in (["--save_strategy", "steps"], ["--save_strategy=steps"]):  # the user's flags win
        _, _, _, job, training = clm.parse_arguments(["--output_dir", "unused", *flags, "--save_total_limit", "3"])
        assert not job.save_at_eval_points and training.save_strategy == "steps" and training.save_total_limit == 3
    _, _, _, job, _ = clm.parse_arguments(
        ["--output_dir", "unused", "--save_strategy", "no", "--save_at_eval_points", "true"]
    )
    assert job.save_at_eval_points
    with pytest.raises(ValueError, match="continues with --resume_from_checkpoint true"):
        clm.main(["--resume_from_checkpoint", "runs/pretrain_clm/checkpoint-5", "--output_dir", "unused"])


class Interrupted(Exception):
    """Stops the main job the way an interruption would."""


class FolderSnapshots(TrainerCallback):
    """After each checkpoint: the run folder's checkpoints and metrics.json, by folder; raises Interrupted after the
    first checkpoint of a folder whose name is ``interrupt``."""

    def __init__(self, snapshots: dict[str, list[dict]], interrupt: str | None = None):
        self.snapshots, self.interrupt = snapshots, interrupt

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir)
        metrics = folder / "metrics.json"
        self.snapshots.setdefault(folder.name, []).append(
            {
                "step": state.global_step,
                "checkpoints": sorted(p.name for p in folder.glob("checkpoint-*")),
                "metrics": json.loads(metrics.read_text()) if metrics.exists() else None,
            }
        )
        if folder.name == self.interrupt:
            raise Interrupted


def run_main_job(clm, output_dir: Path, callback: FolderSnapshots, *flags: str) -> None:
    """The main job in this process, at the smallest size, one thread, with ``callback`` in each run's Trainer."""
    original = clm.causal_lm_trainer

    def with_callback(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(clm, "causal_lm_trainer", with_callback)
            clm.main(
                [
                    "--output_dir", str(output_dir), "--max_corpus_bytes", "15000", "--vocab_size", "300",
                    "--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads", "2",
                    "--intermediate_size", "32", "--block_size", "32", "--per_device_train_batch_size", "4",
                    "--max_batch_size", "16", "--gns_warmup_steps", "2", "--gns_update_interval", "2",
                    "--logging_steps", "1", "--eval_points", "4", "--max_eval_examples", "8",
                    "--disable_tqdm", "true", *flags,
                ]
            )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def assert_same_evaluations(ours: list[dict], theirs: list[dict]) -> None:
    assert [(e["step"], e["tokens"]) for e in ours] == [(e["step"], e["tokens"]) for e in theirs]
    assert [e["loss"] for e in ours] == pytest.approx([e["loss"] for e in theirs], rel=1e-6)


@pytest.mark.slow
def test_main_job_writes_each_run_as_it_goes_and_continues_after_an_interruption(tmp_path, capsys):
    clm = load_main_job()
    whole = tmp_path / "whole"
    snapshots: dict[str, list[dict]] = {}
    run_main_job(clm, whole, FolderSnapshots(snapshots))
    final = json.loads((whole / "metrics.json").read_text())
    # each run's folder had a checkpoint and its metrics so far before the run's end: a prefix of the final ones
    for run, name in ((final, "whole"), (final["baseline"], "baseline_fixed_batch")):
        assert snapshots.get(name), f"no checkpoint saved during the run in {name}"
        first = snapshots[name][0]
        assert first["step"] < run["optimizer_steps"] and first["checkpoints"] == [f"checkpoint-{first['step']}"]
        so_far = first["metrics"]
        assert so_far is not None, f"no metrics.json in {name} at its first checkpoint"
        assert not so_far["complete"] and so_far["optimizer_steps"] == first["step"]
        assert 1 <= len(so_far["evaluations"]) < len(run["evaluations"]) - 1
        assert so_far["evaluations"] == run["evaluations"][: len(so_far["evaluations"])]
        assert 0 < len(so_far["history"]) < len(run["history"])
        # as JSON text: the records hold NaN (a GNS not yet estimated), and nan != nan
        assert json.dumps(so_far["history"]) == json.dumps(run["history"][: len(so_far["history"])])
        # the latest checkpoint only (save_total_limit 1)
        assert all(len(snapshot["checkpoints"]) == 1 for snapshot in snapshots[name])

    # an earlier job's leftovers, which a new job must not take for its own progress
    cut = tmp_path / "cut"
    (cut / "baseline_fixed_batch" / "checkpoint-999").mkdir(parents=True)
    (cut / "baseline_fixed_batch" / "metrics.json").write_text(json.dumps({"complete": True}))
    (cut / "baseline_fixed_batch" / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    interrupted: dict[str, list[dict]] = {}
    with pytest.raises(Interrupted):
        run_main_job(clm, cut, FolderSnapshots(interrupted, interrupt="baseline_fixed_batch"))
    step = interrupted["baseline_fixed_batch"][0]["step"]
    assert json.loads((cut / "metrics.json").read_text())["complete"]  # run 1 finished
    left = cut / "baseline_fixed_batch"
    assert [p.name for p in left.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert not json.loads((left / "metrics.json").read_text())["complete"]
    assert not (left / "trainer_state.json").exists()  # the plot reads the checkpoint's
    # the interrupted job plots from the baseline's checkpoint
    assert cli_main(["plot", str(cut), str(left), "--output", str(tmp_path / "cut.png")]) == 0

    # started again without --resume_from_checkpoint, the job refuses to throw the interrupted progress away
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint true") as refused:
        run_main_job(clm, cut, FolderSnapshots({}))
    assert f"{left} holds an interrupted job's progress (checkpoint-{step}, metrics.json)" in str(refused.value)
    assert [p.name for p in left.glob("checkpoint-*")] == [f"checkpoint-{step}"]

    capsys.readouterr()
    run_main_job(clm, cut, FolderSnapshots({}), "--resume_from_checkpoint", "true")
    out = capsys.readouterr().out
    assert f"run 1/2: {SCHEDULED_RUN} → {cut}: already complete" in out
    assert f"run 2/2: fixed batch 4 baseline → {left}, continuing from checkpoint-{step}\n" in out
    continued = json.loads((cut / "metrics.json").read_text())
    # the same numbers as the uninterrupted job
    assert_same_evaluations(continued["evaluations"], final["evaluations"])
    assert_same_evaluations(continued["baseline"]["evaluations"], final["baseline"]["evaluations"])
    assert continued["comparison"] == pytest.approx(final["comparison"], rel=1e-6)


def test_the_main_job_the_launcher_and_the_callback_share_one_set_of_defaults():
    """GNSCallback's keyword defaults are the launcher's options' and the main job's arguments' (issue 23: they once
    were 1 / 0 / 0.99 in the class and 2 / 0.5 / 0.95 in the launcher and the main job)."""
    clm = load_main_job()
    defaults = {field.name: field.default for field in dataclasses.fields(GNSConfig)}
    main_job = clm.GNSArguments()
    main_job_values = {
        "warmup_steps": main_job.gns_warmup_steps,
        "update_interval": main_job.gns_update_interval,
        "gns_multiplier": main_job.gns_multiplier,
        "lr_batch_power": main_job.gns_lr_batch_power,
        "ema_decay": main_job.gns_ema_decay,
        "gns_signal": main_job.gns_signal,
    }
    assert main_job_values == {name: defaults[name] for name in main_job_values}
    launcher = {option.parameter: option.default for option in GNS_OPTIONS}
    assert launcher == {name: defaults[name] for name in launcher}
    assert set(launcher) == set(defaults) - {"schedule"}  # every option but the schedule (--gns-schedule, choices)
    # the main job's callback is built with its arguments
    training = TrainingArguments(output_dir="unused", per_device_train_batch_size=8, use_cpu=True)
    callback = clm.gns_callback(main_job, training)
    assert {name: getattr(callback, name) for name in main_job_values} == main_job_values
