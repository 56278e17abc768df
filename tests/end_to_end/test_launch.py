"""``hf-gns-spam launch``: unmodified scripts (a plain HfArgumentParser + Trainer script, TRL's own SFT script) run
with the optim names registered, every Trainer's model patched and a GNSCallback attached; python's conventions for
the script; errors that name the option and the fix."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_gns_spam import GNSCallback, patch_model
from hf_gns_spam.cli import main as cli_main
from hf_gns_spam.integrations.known_warnings import (
    BITSANDBYTES_KERNELS_MESSAGE,
    KERNELS_OFFLINE_TRUST_MESSAGE,
    PIN_MEMORY_MESSAGE,
)
from hf_gns_spam.launch import LaunchOptionError, LaunchOptions, TrainerLauncher
from hf_gns_spam.patching import is_patched
from tests.support import model_zoo
from tests.support.paths import TEST_SCRIPTS
from tests.support.processes import run_offline, run_torchrun
from tests.support.tiny_llama import counting_dataset

SCRIPTS = TEST_SCRIPTS
PLAIN_SCRIPT = SCRIPTS / "plain_trainer.py"
CONSOLE_SCRIPT = Path(sys.executable).parent / "hf-gns-spam"
STABLE_SPAM_KEYS = {"gamma1", "gamma2", "gamma3", "reset_interval", "mode", "state_bits"}


def patched_norms(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_patched(module)]


def gns_callbacks(trainer: Trainer) -> list[GNSCallback]:
    return [c for c in trainer.callback_handler.callbacks if isinstance(c, GNSCallback)]


def training_arguments(tmp_path: Path, **overrides) -> TrainingArguments:
    settings = {"per_device_train_batch_size": 2, "report_to": "none", "use_cpu": True, "disable_tqdm": True}
    return TrainingArguments(output_dir=str(tmp_path), **{**settings, **overrides})


# ---------------------------------------------------------------------------------------------- the Trainer hooks
def test_every_trainer_gets_a_patched_model_and_its_own_gns_callback_reported_once(tmp_path, capsys, llama_factory):
    original_init = Trainer.__dict__["__init__"]

    class ScriptTrainer(Trainer):  # a subclass with its own __init__, as TRL's trainers have
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    model = llama_factory()
    options = LaunchOptions(schedule="linear", gns_values={"max_batch_size": 8})
    with TrainerLauncher(options).installed():
        first = Trainer(model=model, args=training_arguments(tmp_path))
        second = ScriptTrainer(model=model, args=training_arguments(tmp_path))
    assert Trainer.__dict__["__init__"] is original_init  # unwrapped again
    assert len(patched_norms(model)) == 5
    (a,), (b,) = gns_callbacks(first), gns_callbacks(second)
    assert a is not b
    assert (a.schedule, a.min_batch_size, a.max_batch_size) == ("linear", 2, 8)  # micro-batch 2 x 1 process x 1
    # GNSCallback's own defaults (one set: the launcher's are CALLBACK_DEFAULTS), warmup_steps included though only
    # "gns" reads it
    assert (a.lr_batch_power, a.ema_decay, a.warmup_steps, a.gns_signal) == (0.5, 0.99, 0.1, "block")
    err = capsys.readouterr().err
    assert err.count("hf-gns-spam launch: patch_model: patched 5 normalization module(s)") == 1
    assert err.count("GNSCallback(schedule='linear', min_batch_size=2, max_batch_size=8,") == 1


def test_models_from_model_init_and_inside_peft_are_patched(tmp_path, llama_factory):
    from peft import LoraConfig, get_peft_model

    with TrainerLauncher(LaunchOptions()).installed():
        # no parameter: a model_init with one gets the hyperparameter-search trial
        trainer = Trainer(model_init=lambda: llama_factory(), args=training_arguments(tmp_path))
        assert len(patched_norms(trainer.model)) == 5
        assert len(patched_norms(trainer.call_model_init())) == 5  # train() makes a new model from model_init
        peft_model = get_peft_model(llama_factory(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        Trainer(model=peft_model, args=training_arguments(tmp_path))
    assert "base_model.model.model.layers.0.input_layernorm" in patched_norms(peft_model)
    assert len(patched_norms(peft_model)) == 5


def test_the_scripts_own_patch_and_gns_callback_are_the_ones_used(tmp_path, capsys, llama_factory):
    model = llama_factory()
    patch_model(model, include="model.norm")
    theirs = GNSCallback()
    with TrainerLauncher(LaunchOptions(schedule="linear")).installed():
        trainer = Trainer(model=model, args=training_arguments(tmp_path), callbacks=[theirs])
        later = Trainer(model=llama_factory(), args=training_arguments(tmp_path))
        later.add_callback(theirs)  # added after construction: it replaces the launcher's
    assert patched_norms(model) == ["model.norm"]
    assert gns_callbacks(trainer) == [theirs] and gns_callbacks(later) == [theirs]
    err = capsys.readouterr().err
    assert "the script patched the model itself: left as it is" in err
    assert "its own GNSCallback: the launcher adds none" in err
    assert "the script adds its own GNSCallback: it replaces the launcher's" in err


@pytest.mark.parametrize(
    ("options", "overrides", "expected"),
    [
        (LaunchOptions(schedule="linear", gns_values={"min_batch_size": 3}), {},
         ["--min-batch-size 3 must be a positive multiple of", "the script's --per_device_train_batch_size"]),
        (LaunchOptions(schedule="gns"), {"per_device_train_batch_size": 1},
         ["--gns-schedule 'gns' needs --min-batch-size >= 2", "--min-batch-size defaults to", "= 1)"]),
        (LaunchOptions(patch=False), {}, ["no patched normalization layer", "drop --no-patch, or add --no-gns"]),
    ],
    ids=["min-batch-not-a-multiple", "gns-needs-two-examples", "no-patch"],
)  # fmt: skip
def test_options_that_do_not_fit_the_trainer_name_the_option(tmp_path, llama_factory, options, overrides, expected):
    with TrainerLauncher(options).installed(), pytest.raises(LaunchOptionError) as error:
        Trainer(model=llama_factory(), args=training_arguments(tmp_path, **overrides))
    for text in expected:
        assert text in str(error.value)


# ---------------------------------------------------------------------------------------------- the command line
PROBE = """
import json, sys
record = {"name": __name__, "argv": sys.argv, "path0": sys.path[0], "file": __file__}
open(sys.argv[1], "w").write(json.dumps(record))
"""


def test_a_script_runs_as_python_runs_it(tmp_path):
    script = tmp_path / "folder" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    out = tmp_path / "record.json"
    argv, path = list(sys.argv), list(sys.path)
    arguments = [str(out), "--flag", "value", "--", "--gns-schedule", "-m", "x"]  # all the script's, verbatim
    assert cli_main(["launch", "--no-gns", str(script), *arguments]) == 0
    record = json.loads(out.read_text())
    assert record == {"name": "__main__", "argv": [str(script), *arguments], "file": str(script),
                      "path0": os.path.realpath(script.parent)}  # fmt: skip
    assert (sys.argv, sys.path) == (argv, path)  # restored


def test_a_module_runs_as_python_dash_m_runs_it(tmp_path, monkeypatch):
    (tmp_path / "probe_module.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)  # python -m finds modules in the current folder
    out = tmp_path / "record.json"
    assert cli_main(["launch", "--no-patch", "--no-gns", "-m", "probe_module", str(out), "--x"]) == 0
    record = json.loads(out.read_text())
    assert record["name"] == "__main__" and record["path0"] == os.getcwd()
    assert record["argv"] == [str(tmp_path / "probe_module.py"), str(out), "--x"]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--gns-sched", "linear", "train.py"], "unknown option --gns-sched (did you mean --gns-schedule?)"),
        (["--optim", "stable_spam", "train.py"], "come before SCRIPT and the script's own after it"),
        (["--no-gns"], "missing SCRIPT"),
        (["-m"], "-m needs a MODULE"),
        (["--no-gns", "--gns-schedule", "gns", "train.py"], "--no-gns adds no GNSCallback, so --gns-schedule"),
        (["--no-patch", "--patch-exclude", "*.norm", "train.py"], "--no-patch patches nothing"),
        (["--min-batch-size", "8", "train.py"], "--min-batch-size applies to --gns-schedule linear or gns"),
        (["--gns-schedule", "linear", "--gns-warmup-steps", "5", "train.py"],
         "--gns-warmup-steps applies to --gns-schedule gns (this run's is linear)"),
        (["--gns-schedule", "linear", "--min-batch-size", "16", "--max-batch-size", "8", "train.py"],
         "--max-batch-size 8 < --min-batch-size 16"),
        (["--gns-ema-decay", "1.5", "train.py"], "--gns-ema-decay must be in [0, 1), got 1.5"),
        (["--gns-validate-every", "x", "train.py"], "argument --gns-validate-every: invalid int value: 'x'"),
    ],
)  # fmt: skip
def test_option_errors_name_the_option_and_exit_2(arguments, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["launch", *arguments])
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err


def test_a_missing_script_or_module_exits_2(tmp_path, capsys):
    assert cli_main(["launch", str(tmp_path / "nope.py")]) == 2
    assert f"SCRIPT {tmp_path / 'nope.py'}: no such file" in capsys.readouterr().err
    assert cli_main(["launch", "-m", "no_such_package.module"]) == 2
    assert "-m no_such_package.module: no module named 'no_such_package.module'" in capsys.readouterr().err


def test_a_launcher_option_after_the_script_gets_a_hint_when_the_script_rejects_it(tmp_path, capsys):
    script = tmp_path / "strict.py"
    script.write_text("import argparse\nargparse.ArgumentParser().parse_args()\n")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["launch", "--no-gns", str(script), "--gns-schedule", "linear"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --gns-schedule linear" in err  # the script's own message, then the hint
    assert "note: the script got --gns-schedule, which the launcher takes before SCRIPT" in err


MARKER = """
import pathlib, sys
pathlib.Path(sys.argv[1]).write_text("the script ran")
"""
LINEAR_6 = ["--gns-schedule", "linear", "--min-batch-size", "6"]


@pytest.fixture
def one_process(monkeypatch):
    """No launcher's process count in the environment."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("options", "script_args", "environment", "fits"),
    [
        (LINEAR_6, ["--per_device_train_batch_size", "4"], {}, False),
        (LINEAR_6, ["--per_device_train_batch_size=4"], {}, False),
        (LINEAR_6, ["--per-device-train-batch-size", "4"], {}, False),
        (LINEAR_6, ["--per_device_train_batch_size", "4", "--per_device_train_batch_size", "3"], {}, True),  # last
        (LINEAR_6, ["--per_device_train_batch_size", "2"], {}, True),
        (LINEAR_6, ["--per_device_train_batch_size", "2"], {"WORLD_SIZE": "2"}, False),  # 2 x 2 processes
        (LINEAR_6, ["--per_device_train_batch_size", "4"], {"PMI_SIZE": "2"}, True),  # processes: unknown yet
        (LINEAR_6, [], {}, True),  # not named: checked when the script builds its Trainer
        (LINEAR_6, ["--", "--per_device_train_batch_size", "4"], {}, True),  # after --: not an option
        (LINEAR_6, ["--help", "--per_device_train_batch_size", "4"], {}, True),  # the script's help
        (["--gns-schedule", "gns"], ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"], {},
         False),  # the minimum defaults to 1 x 1 process x 1, and gns needs 2
        (["--gns-schedule", "gns"], ["--per_device_train_batch_size", "1"], {}, True),  # accumulation not named
        (["--gns-schedule", "gns"], ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps=2"], {},
         True),
        (["--no-gns"], ["--per_device_train_batch_size", "4"], {}, True),
    ],
)  # fmt: skip
def test_batch_bounds_are_checked_against_the_scripts_arguments_before_it_runs(
    tmp_path, capsys, one_process, monkeypatch, options, script_args, environment, fits
):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    script, marker = tmp_path / "marks.py", tmp_path / "ran"
    script.write_text(MARKER)
    code = cli_main(["launch", *options, str(script), str(marker), *script_args])
    err = capsys.readouterr().err
    assert (code, marker.exists()) == ((0, True) if fits else (2, False)), err
    if not fits:
        assert err.startswith("hf-gns-spam launch: error: --")


def test_the_check_before_the_script_runs_says_what_the_trainers_construction_says(
    tmp_path, capsys, one_process, llama_factory
):
    script, marker = tmp_path / "marks.py", tmp_path / "ran"
    script.write_text(MARKER)
    assert cli_main(["launch", *LINEAR_6, str(script), str(marker), "--per_device_train_batch_size", "4"]) == 2
    assert not marker.exists()
    launcher = TrainerLauncher(LaunchOptions(schedule="linear", gns_values={"min_batch_size": 6}))
    with launcher.installed(), pytest.raises(LaunchOptionError) as at_construction:
        Trainer(model=llama_factory(), args=training_arguments(tmp_path, per_device_train_batch_size=4))
    message = str(at_construction.value)
    assert "--min-batch-size 6 must be a positive multiple of the script's --per_device_train_batch_size" in message
    assert capsys.readouterr().err == f"hf-gns-spam launch: error: {message}\n"


# ---------------------------------------------------------------------------------------------- end to end
def logged_steps(trainer_state: Path) -> list[dict]:
    return [r for r in json.loads(trainer_state.read_text())["log_history"] if "loss" in r]


def latest_checkpoint(output_dir: Path) -> Path:
    return max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def optimizer_hyperparameters(output_dir: Path) -> dict:
    return torch.load(latest_checkpoint(output_dir) / "optimizer.pt", weights_only=True)["param_groups"][0]


PLAIN_FLAGS = ["--optim", "stable_spam", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
               "--num_train_epochs", "2", "--logging_steps", "1", "--disable_tqdm", "true",
               "--use_cpu", "true"]  # fmt: skip


@pytest.mark.slow
def test_plain_trainer_script_through_the_console_script_reports_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    command = [str(CONSOLE_SCRIPT), "launch", "--gns-schedule", "linear", "--max-batch-size", "8",
               str(PLAIN_SCRIPT), "--output_dir", str(out), "--report_to", "tensorboard", "--save_strategy", "epoch",
               *PLAIN_FLAGS]  # fmt: skip
    result = run_offline(command, tmp_path)
    assert result.stderr.count("patch_model: patched 5 normalization module(s)") == 1
    assert set(optimizer_hyperparameters(out)) >= STABLE_SPAM_KEYS  # optim="stable_spam" parsed and used
    steps = logged_steps(out / "trainer_state.json")
    sizes = [s["batch_size"] for s in steps]
    assert sizes[0] == 2 and sizes[-1] == 8 and sizes == sorted(sizes)  # the linear ramp, 2 -> 8
    assert sum(sizes) == 2 * 64  # two epochs of the script's 64 examples
    assert not any(math.isnan(s["gns"]) for s in steps) and 0 < steps[-1]["gns"] < math.inf  # early inf: noise
    # what TensorBoard received: the same values, read back from the event files
    (run_dir,) = (out / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for key in ("gns", "batch_size"):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [s["step"] for s in steps]
        assert [e.value for e in scalars] == pytest.approx([s[key] for s in steps], rel=1e-6, nan_ok=True)
    # a clean first contact: none of the known third-party messages, no warning at all
    for message in (BITSANDBYTES_KERNELS_MESSAGE, KERNELS_OFFLINE_TRUST_MESSAGE, PIN_MEMORY_MESSAGE, "Warning"):
        assert message not in result.stderr


@pytest.mark.slow
def test_trl_sft_script_as_a_module_with_a_model_trl_loads_itself(tmp_path):
    model_dir, data_dir, out = tmp_path / "model", tmp_path / "data", tmp_path / "sft"
    model_zoo.build("llama").save_pretrained(model_dir)
    model_zoo.tokenizer().save_pretrained(model_dir)
    data_dir.mkdir()
    rows = counting_dataset(48)["input_ids"]
    lines = [json.dumps({"text": " ".join(f"t{3 + t}" for t in row[: 6 + i % 8])}) for i, row in enumerate(rows)]
    (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "hf_gns_spam.cli", "launch", "--gns-schedule", "gns", "--max-batch-size", "16",
               "--gns-warmup-steps", "2", "--gns-update-interval", "2", "-m", "trl.scripts.sft",
               "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out),
               "--optim", "stable_spam_8bit", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
               "2", "--num_train_epochs", "2", "--logging_steps", "1", "--save_strategy", "epoch", "--report_to",
               "none", "--disable_tqdm", "true", "--learning_rate", "1e-3", "--bf16", "false"]  # fmt: skip
    result = run_offline(command, tmp_path)
    assert result.stderr.count("patch_model: patched 5 normalization module(s)") == 1
    hyperparameters = optimizer_hyperparameters(out)
    assert set(hyperparameters) >= STABLE_SPAM_KEYS and hyperparameters["state_bits"] == 8
    steps = logged_steps(latest_checkpoint(out) / "trainer_state.json")
    sizes = [s["batch_size"] for s in steps]
    assert sizes[0] == 4 and max(sizes) > 4  # min: the script's micro-batch 2 x accumulation 2; then it grew
    assert not any(math.isnan(s["gns"]) for s in steps) and 0 < steps[-1]["gns"] < math.inf  # early inf: noise


@pytest.mark.slow
def test_trl_dpo_script_as_a_module_gives_a_gns_and_grows_the_batch(tmp_path):
    """DPO through TRL's own script (it loads the policy and the reference model): an example is a pair of rows, the
    GNS is logged every step and a "gns" schedule grows the batch of pairs; both epochs' pairs are all trained."""
    pytest.importorskip("trl")  # TRL's own DPO script
    from tests.support.data import preference_data

    model_dir, data_dir, out = tmp_path / "model", tmp_path / "data", tmp_path / "dpo"
    model_zoo.build("llama").save_pretrained(model_dir)
    model_zoo.tokenizer().save_pretrained(model_dir)
    data_dir.mkdir()
    pairs = preference_data(48)
    lines = [json.dumps({k: pairs[k][i] for k in ("prompt", "chosen", "rejected")}) for i in range(len(pairs))]
    (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "hf_gns_spam.cli", "launch", "--gns-schedule", "gns", "--max-batch-size", "16",
               "--gns-warmup-steps", "2", "--gns-update-interval", "2", "-m", "trl.scripts.dpo",
               "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out),
               "--optim", "stable_spam", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
               "--num_train_epochs", "2", "--logging_steps", "1", "--save_strategy", "epoch", "--report_to", "none",
               "--disable_tqdm", "true", "--learning_rate", "1e-3", "--bf16", "false",
               "--max_length", "64"]  # fmt: skip
    result = run_offline(command, tmp_path)
    assert result.stderr.count("patch_model: patched 5 normalization module(s)") >= 1
    steps = logged_steps(latest_checkpoint(out) / "trainer_state.json")
    sizes = [s["batch_size"] for s in steps]
    assert sizes[0] == 4 and max(sizes) > 4 and sizes == sorted(sizes)  # pairs: 2 per micro-batch x 2, then grew
    assert steps[-1]["examples_seen"] == sum(sizes) == 2 * 48  # every pair of both epochs, once each
    assert not any(math.isnan(s["gns/block"]) for s in steps)


@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path):
    out = tmp_path / "ddp"
    arguments = ["-m", "hf_gns_spam.cli", "launch", "--gns-schedule", "linear", "--max-batch-size", "16",
                 str(PLAIN_SCRIPT), "--output_dir", str(out), "--report_to", "none", "--save_strategy", "no",
                 "--ddp_backend", "gloo", *PLAIN_FLAGS]  # fmt: skip
    result = run_torchrun(arguments, outputs=out, cwd=tmp_path)
    assert result.stderr.count("patch_model: patched 5 normalization module(s)") == 1  # the main process only
    steps = logged_steps(out / "trainer_state.json")
    sizes = [s["batch_size"] for s in steps]
    assert sizes[0] == 4 and sizes[-1] == 16  # 2 processes x 2 examples, growing to 16
    assert sum(sizes) == 2 * 64
    assert not any(math.isnan(s["gns"]) for s in steps) and 0 < steps[-1]["gns"] < math.inf  # early inf: noise
