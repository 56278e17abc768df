"""The ``hf-gns-spam`` command line answers ``--help`` and the errors its command line decides (values out of their
range included) without importing torch (it would take seconds): each case runs in a fresh Python whose import of
torch fails; and ``import
hf_gns_spam``, which the console script runs first, imports neither torch nor transformers, yet registers the
optim names whichever of the two is imported first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.support.paths import REPO_ROOT

# Runs the command line as the console script does (``main``) or as torchrun and accelerate do (``python -m
# hf_gns_spam.cli``), with torch's import failing; its last line of stdout says how it ended and what it imported.
NO_TORCH = textwrap.dedent(
    """
    import json, runpy, sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError(f"this test forbids importing {name}")
            return None

    sys.meta_path.insert(0, NoTorch())
    entry, arguments = sys.argv[1], json.loads(sys.argv[2])
    try:
        if entry == "main":
            from hf_gns_spam.cli import main

            code = main(arguments)
        else:
            sys.argv = ["hf_gns_spam.cli", *arguments]
            runpy.run_module("hf_gns_spam.cli", run_name="__main__", alter_sys=True)
            code = None
    except SystemExit as exit_:
        code = exit_.code
    heavy = sorted(m for m in ("torch", "transformers", "bitsandbytes", "matplotlib") if m in sys.modules)
    print(json.dumps({"code": code or 0, "imported": heavy}))
    """
)


def without_torch(arguments: list[str], entry: str = "main") -> tuple[int, list[str], str, str]:
    """(exit status, the heavy modules imported, stdout without the last line, stderr)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, entry, json.dumps(arguments)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=environment,
        check=False,
    )
    *output, last = result.stdout.splitlines() or [""]
    assert last.startswith("{"), f"the command line did not return: {result.stderr[-3000:]}"
    ended = json.loads(last)
    return ended["code"], ended["imported"], "\n".join(output), result.stderr


@pytest.mark.parametrize("entry", ["main", "python -m"])
@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--help"], "{plot,launch}"),
        (["launch", "--help"], "hf-gns-spam launch [options] SCRIPT [args]"),
        (["plot", "--help"], "RUN_DIR"),
    ],
    ids=["hf-gns-spam", "launch", "plot"],
)
def test_help_answers_without_torch(arguments, expected, entry):
    code, imported, stdout, _ = without_torch(arguments, entry)
    assert (code, imported) == (0, [])
    assert expected in stdout


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["launch", "--gns-sched", "linear", "train.py"], "unknown option --gns-sched (did you mean --gns-schedule?)"),
        (["launch", "--no-gns", "--gns-schedule", "gns", "train.py"], "--no-gns adds no GNSCallback"),
        (["launch", "--min-batch-size", "8", "train.py"], "--min-batch-size applies to --gns-schedule linear or gns"),
        (["launch", "--gns-validate-every", "x", "train.py"], "invalid int value: 'x'"),
        (["launch", "--no-gns"], "missing SCRIPT"),
        (["launch", "--gns-schedule", "linear", "no_such_script.py"], "SCRIPT no_such_script.py: no such file"),
        (["launch", "-m", "no_such_package.module"], "no module named 'no_such_package.module'"),
        (["plot"], "the following arguments are required: RUN_DIR"),
        # values out of their range: GNSCallback's own checks (hf_gns_spam.gns.arguments), in the launcher's terms
        (["launch", "--gns-ema-decay", "1.5", "train.py"], "--gns-ema-decay must be in [0, 1), got 1.5"),
        (["launch", "--gns-schedule", "linear", "--min-batch-size", "16", "--max-batch-size", "8", "train.py"],
         "--max-batch-size 8 < --min-batch-size 16"),
        (["launch", "--gns-schedule", "gns", "--gns-lr-batch-power", "-0.5", "train.py"],
         "--gns-lr-batch-power must be in [0, 1] (0.5: square-root scaling), got -0.5"),
        (["launch", "--gns-verify-interval", "0", "train.py"],
         "--gns-verify-interval must be an int >= 1 (optimizer steps), got 0"),
        (["launch", "--gns-validate-every", "0", "train.py"], "--gns-validate-every must be None (off) or an int >= 1"),
        (["launch", "--gns-schedule", "gns", "--min-batch-size", "1", "train.py"],
         "--gns-schedule 'gns' needs --min-batch-size >= 2"),
        (["launch", "--gns-schedule", "gns", "--min-batch-size", "4", "--gns-max-growth", "1", "train.py"],
         "--gns-max-growth must be in (1, inf), got 1.0"),
        (["launch", "--gns-schedule", "gns", "--min-batch-size", "4", "--gns-update-interval", "0", "train.py"],
         "--gns-update-interval must be an int >= 1 (optimizer steps), got 0"),
    ],
    ids=["unknown", "contradiction", "not-this-schedule", "not-a-number", "no-script", "missing-script",
         "missing-module", "plot-no-run", "ema-decay", "max-below-min", "lr-batch-power", "verify-interval",
         "validate-every", "gns-min-batch", "max-growth", "update-interval"],
)  # fmt: skip
def test_command_line_errors_answer_without_torch(arguments, expected):
    code, imported, _, stderr = without_torch(arguments)
    assert (code, imported) == (2, [])
    assert expected in stderr


def run_python(code: str) -> str:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=environment,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_is_light_and_registers_the_optim_names_when_transformers_loads():
    output = run_python(
        """
        import sys
        import hf_gns_spam
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
        from transformers import HfArgumentParser, TrainingArguments
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--optim", "stable_spam_8bit", "--output_dir", "out", "--use_cpu", "true"]
        )
        print(args.optim.value)
        from transformers import Trainer, trainer_optimizer  # the handlers: when the Trainer's module is executed
        print(sorted(name.value for name in trainer_optimizer._OPTIMIZER_HANDLERS if name.startswith("stable_spam")))
        print(hf_gns_spam.optim.StableSPAM is hf_gns_spam.StableSPAM)  # a subpackage, imported on first use too
        """
    )
    assert output.splitlines() == [
        "[]",
        "stable_spam_8bit",
        "['stable_spam', 'stable_spam_4bit', 'stable_spam_8bit']",
        "True",
    ]


def test_the_optim_names_are_registered_with_a_transformers_imported_before():
    output = run_python(
        """
        import transformers
        from transformers import TrainingArguments, trainer
        import hf_gns_spam
        print(TrainingArguments(output_dir="out", optim="stable_spam", use_cpu=True).optim.value)
        print(sorted(name.value for name in trainer._OPTIMIZER_HANDLERS if name.startswith("stable_spam")))
        from hf_gns_spam import GNSCallback, StableSPAM, patch_model
        print(GNSCallback.__module__, StableSPAM.__module__, patch_model.__module__)
        """
    )
    assert output.splitlines() == [
        "stable_spam",
        "['stable_spam', 'stable_spam_4bit', 'stable_spam_8bit']",
        "hf_gns_spam.gns.callback hf_gns_spam.optim.stable_spam hf_gns_spam.patching",
    ]


def test_the_readme_options_table_is_made_from_gns_config():
    """README.md's table of GNSCallback's options is what scripts/options_table.py makes from GNSConfig now (run
    it with --write after changing an option)."""
    import importlib.util

    path = REPO_ROOT / "scripts" / "options_table.py"
    spec = importlib.util.spec_from_file_location("options_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.options_table() in module.README.read_text()
