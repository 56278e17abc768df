"""``hf-gns-spam launch``: run an unmodified training script with GNS-aware norms, Stable-SPAM and a GNSCallback.

    hf-gns-spam launch [options] SCRIPT [script args]       # as `python SCRIPT [script args]` would
    hf-gns-spam launch [options] -m MODULE [module args]    # as `python -m MODULE [module args]` would
    torchrun --nproc_per_node 4 -m hf_gns_spam.cli launch [options] SCRIPT [script args]
    accelerate launch -m hf_gns_spam.cli launch [options] SCRIPT [script args]

In the process the script runs in (torchrun and accelerate start the launcher as they would start the script):

1. ``hf_gns_spam`` is imported before the script imports transformers: ``--optim stable_spam`` (``stable_spam_8bit``,
   ``stable_spam_4bit``) and ``--optim_args`` parse, and the known third-party messages of an offline CPU run are
   silenced (:mod:`hf_gns_spam.integrations.known_warnings`).
2. ``transformers.Trainer`` is wrapped at the class level (:class:`TrainerLauncher`), so that its subclasses, TRL's
   trainers among them, are covered, whether they are given a model or load it themselves from a name (TRL's
   ``SFTTrainer(model="...")`` calls ``Trainer.__init__`` with the loaded, possibly peft-wrapped, model):

   * the model each Trainer is built with, or gets from ``model_init``, is patched with
     :func:`~hf_gns_spam.patch_model` before ``Trainer.__init__`` runs (``--no-patch``: not; a model the script
     patched itself is left as it is), and the patch report is printed once, by the main process, on stderr;
   * a :class:`~hf_gns_spam.GNSCallback` built from the options is added to each Trainer (``--no-gns``: not), unless
     the script gives the Trainer its own, which is then the one used (and one the script adds later with
     ``add_callback`` replaces the launcher's). Its defaults are GNSCallback's, which ``examples/pretrain_clm.py``
     uses too (:data:`GNS_OPTIONS`), and ``--min-batch-size`` = per_device_train_batch_size × processes ×
     gradient_accumulation_steps of the script's ``TrainingArguments``, ``--max-batch-size`` = 8 × that.
3. The script runs with :mod:`runpy` as python runs it: ``__name__ == "__main__"``, ``sys.argv == [SCRIPT,
   *script args]``, ``sys.path[0]`` the script's folder (the current folder for ``-m``). When it returns, a
   ``torch.distributed`` process group it created (the Trainer's, under torchrun or accelerate) is destroyed before
   the process exits: a gloo group left to the interpreter's shutdown can abort the process ("terminate called
   without an active exception") after a successful run.

Errors in the launcher's own options (an unknown option before SCRIPT, a missing script, options that contradict
each other or the script's ``TrainingArguments``) name the option and the fix, and exit with status 2. Everything
after SCRIPT belongs to the script; a launcher option put there by mistake gets a hint when the script's argument
parser rejects it. The errors that the command line decides answer at once, without importing torch (the console
script imports this module and the package, which import neither; torch, transformers and the GNS are imported
where they are used): a malformed command line (an unknown option, a value that is not a number), a missing script
or module, contradicting options, a value out of its range (``--gns-ema-decay 1.5``, ``--max-batch-size`` below
``--min-batch-size``): those are :class:`~hf_gns_spam.GNSCallback`'s own checks, which
:class:`hf_gns_spam.gns.arguments.GNSConfig` makes for both without importing torch.

Whether the schedule's batch bounds fit the script's ``TrainingArguments`` is checked twice by one function,
:func:`_checked_callback`: before the script runs, against the values its command line gives
(``--per_device_train_batch_size``, ``--gradient_accumulation_steps`` where the bounds default from it, each as
``--name value`` or ``--name=value``, with dashes or underscores, the last one given, as the script's
``HfArgumentParser`` reads them) and the processes of ``WORLD_SIZE`` (:func:`script_batch_arguments`), so that a
misfit is reported before the script loads its data and builds its model; and when a Trainer is built, against its
``TrainingArguments``, for a script whose command line does not name them (it sets them in code or in a config
file).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib.util
import os
import re
import runpy
import sys
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from hf_gns_spam.errors import LaunchOptionError
from hf_gns_spam.gns.arguments import GNSConfig

if TYPE_CHECKING:
    from torch import nn

    from hf_gns_spam.gns import GNSCallback

__all__ = [
    "DESCRIPTION",
    "EPILOG",
    "GNS_OPTIONS",
    "USAGE",
    "GNSOption",
    "LaunchOptionError",
    "LaunchOptions",
    "ScriptBatchArguments",
    "TrainerLauncher",
    "add_arguments",
    "main",
    "run",
    "script_batch_arguments",
]

_PREFIX = "hf-gns-spam launch"
USAGE = "hf-gns-spam launch [options] SCRIPT [args]  |  hf-gns-spam launch [options] -m MODULE [args]"
DESCRIPTION = """Run an unmodified training script as python would, with hf_gns_spam imported (--optim stable_spam
works), the model of every Trainer patched with patch_model and a GNSCallback added to it."""
EPILOG = """examples:
  hf-gns-spam launch run_clm.py --model_name_or_path gpt2 --optim stable_spam --output_dir out
  hf-gns-spam launch --gns-schedule gns --max-batch-size 256 run_clm.py ...
  hf-gns-spam launch --no-gns -m trl.scripts.sft --optim stable_spam_8bit ...
  torchrun --nproc_per_node 4 -m hf_gns_spam.cli launch --gns-schedule linear run_clm.py ...
  accelerate launch -m hf_gns_spam.cli launch run_clm.py ..."""


@dataclasses.dataclass(frozen=True)
class GNSOption:
    """One launcher option that sets the :class:`~hf_gns_spam.GNSCallback` parameter of the same meaning."""

    flag: str
    parameter: str  # GNSCallback's keyword
    type: Callable[[str], Any]
    default: Any
    schedules: tuple[str | None, ...]  # the schedules it applies to
    help: str


# Made from GNSConfig's fields (their flag, parser, schedules, default and help): the argument parser, the checks that
# options fit the schedule, and the translation of GNSCallback's messages into option names all read this table.
GNS_OPTIONS = tuple(
    GNSOption(field.metadata["flag"], field.name, field.metadata["parse"], field.default, field.metadata["schedules"],
              field.metadata["help"])
    for field in dataclasses.fields(GNSConfig)
    if field.name != "schedule"  # --gns-schedule, with its choices, below
)  # fmt: skip
_SCHEDULE_FLAG = "--gns-schedule"
# checked without a schedule; the others are checked by GNSCallback's batch schedule, which needs both bounds
_CHECKED_WITHOUT_SCHEDULE = ("lr_batch_power", "ema_decay", "verify_interval", "validate_every", "gns_signal")
_OPTION_OF_PARAMETER = {"schedule": _SCHEDULE_FLAG, **{o.parameter: o.flag for o in GNS_OPTIONS}}


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """What the launcher does to every Trainer (see the module's docstring); ``gns_values`` by GNSCallback keyword,
    only those set on the command line (the others take :data:`GNS_OPTIONS`' defaults)."""

    patch: bool = True
    patch_include: tuple[str, ...] | None = None
    patch_exclude: tuple[str, ...] | None = None
    gns: bool = True
    schedule: str | None = None
    gns_values: dict[str, Any] = dataclasses.field(default_factory=dict)

    def callback_kwargs(self, args: Any = None) -> dict[str, Any]:
        """GNSCallback's keyword arguments for a Trainer with TrainingArguments ``args``.

        Without ``args``, a batch bound that defaults from them is None (the maximum is known when the minimum is
        given)."""
        kwargs: dict[str, Any] = {"schedule": self.schedule} if self.schedule else {}
        for option in GNS_OPTIONS:
            if self.schedule in option.schedules:
                kwargs[option.parameter] = self.gns_values.get(option.parameter, option.default)
        if self.schedule:
            if kwargs["min_batch_size"] is None and args is not None:
                unit = args.per_device_train_batch_size * args.world_size
                kwargs["min_batch_size"] = unit * args.gradient_accumulation_steps
            if kwargs["max_batch_size"] is None and kwargs["min_batch_size"] is not None:
                kwargs["max_batch_size"] = 8 * kwargs["min_batch_size"]
        return kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher's options, for ``hf-gns-spam launch --help``; :func:`main` parses the command line with it."""
    patching = parser.add_argument_group("patching the model of every Trainer")
    patching.add_argument("--no-patch", action="store_true", help="do not patch (the script patches, or no GNS)")
    for flag, what in (("--patch-include", "patch only the norms"), ("--patch-exclude", "leave alone the norms")):
        patching.add_argument(
            flag, action="append", metavar="GLOB", help=f"{what} whose module name matches (repeatable)"
        )
    gns = parser.add_argument_group("the GNSCallback added to every Trainer")
    gns.add_argument("--no-gns", action="store_true", help="add no GNSCallback")
    gns.add_argument(
        _SCHEDULE_FLAG,
        choices=("none", "linear", "gns"),
        help="batch-size schedule; default none: measure and log the GNS, leave the batch alone",
    )
    for option in GNS_OPTIONS:
        default = "" if option.default is None else f" (default {option.default})"
        metavar = "N" if option.type is int else "X"
        gns.add_argument(
            option.flag, dest=option.parameter, type=option.type, metavar=metavar, help=option.help + default
        )
    parser.add_argument("-m", dest="module", metavar="MODULE", help="run a module, as python -m (ends the options)")
    parser.add_argument("script", nargs="?", metavar="SCRIPT", help="the training script (ends the options)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, metavar="...", help="the script's own arguments")


def _split_command_line(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[list[str], str | None, bool, list[str]]:
    """(launcher options, SCRIPT or MODULE, whether it is a module, the script's arguments, verbatim).

    The first word that is not a launcher option or its value is SCRIPT, as with python; ``-m MODULE`` ends the
    options too. Everything after belongs to the script, untouched (argparse alone would drop a ``--`` there).
    """
    actions = parser._option_string_actions  # argparse has no public lookup of an option string
    position = 0
    while position < len(argv):
        word = argv[position]
        if word == "-m" or (word.startswith("-m") and not word.startswith("--")):
            module = word[2:] or (argv[position + 1] if position + 1 < len(argv) else None)
            if not module:
                parser.error("-m needs a MODULE: hf-gns-spam launch [options] -m MODULE [args]")
            return argv[:position], module, True, argv[position + (1 if word[2:] else 2) :]
        if word == "--":  # ends the options, as for python
            rest = argv[position + 1 :]
            return argv[:position], rest[0] if rest else None, False, rest[1:]
        if not word.startswith("-") or word == "-":
            return argv[:position], word, False, argv[position + 1 :]
        name = word.split("=", 1)[0]
        if name not in actions:
            close = difflib.get_close_matches(name, [s for s in actions if s.startswith("--")], n=1)
            parser.error(
                f"unknown option {name}{f' (did you mean {close[0]}?)' if close else ''}. The launcher's options "
                "(hf-gns-spam launch --help) come before SCRIPT and the script's own after it: "
                f"hf-gns-spam launch [options] SCRIPT {word} ..."
            )
        position += 1 if actions[name].nargs == 0 or "=" in word else 2
    return argv, None, False, []


def _options_from(namespace: argparse.Namespace) -> LaunchOptions:
    """The checked options; LaunchOptionError names each option that is out of place and the fix."""
    given = {o.parameter: getattr(namespace, o.parameter) for o in GNS_OPTIONS}
    given = {parameter: value for parameter, value in given.items() if value is not None}
    flags = [_OPTION_OF_PARAMETER[p] for p in given] + ([_SCHEDULE_FLAG] if namespace.gns_schedule else [])
    if namespace.no_gns and flags:
        raise LaunchOptionError(
            f"--no-gns adds no GNSCallback, so {', '.join(flags)} would do nothing: drop --no-gns, or drop them"
        )
    if namespace.no_patch and (namespace.patch_include or namespace.patch_exclude):
        raise LaunchOptionError("--no-patch patches nothing: drop it, or drop --patch-include/--patch-exclude")
    schedule = None if namespace.gns_schedule in (None, "none") else namespace.gns_schedule
    for option in GNS_OPTIONS:
        if option.parameter in given and schedule not in option.schedules:
            wanted = " or ".join(s for s in option.schedules if s)
            raise LaunchOptionError(
                f"{option.flag} applies to --gns-schedule {wanted} (this run's is {schedule or 'none'}): add "
                f"--gns-schedule {option.schedules[-1]}, or drop {option.flag}"
            )
    options = LaunchOptions(
        patch=not namespace.no_patch,
        patch_include=tuple(namespace.patch_include) if namespace.patch_include else None,
        patch_exclude=tuple(namespace.patch_exclude) if namespace.patch_exclude else None,
        gns=not namespace.no_gns,
        schedule=schedule,
        gns_values=given,
    )
    if given:  # their ranges, now, as far as they do not depend on the script's TrainingArguments (the defaults fit)
        kwargs = options.callback_kwargs()
        if schedule and kwargs["min_batch_size"] is None:  # the schedule is checked against the TrainingArguments
            kwargs = {k: v for k, v in kwargs.items() if k in _CHECKED_WITHOUT_SCHEDULE}
        with _in_launcher_terms():
            GNSConfig(**kwargs)  # GNSCallback's checks, without torch
    return options


def _launcher_terms(message: str) -> str:
    """A GNSCallback message with its keywords replaced by the launcher's options (``min_batch_size=6`` becomes
    ``--min-batch-size 6``) and the script's TrainingArguments named as its flags."""
    for parameter, flag in sorted(_OPTION_OF_PARAMETER.items(), key=lambda item: -len(item[0])):
        message = re.sub(rf"(?<![\w-]){parameter}(=?)", lambda m, f=flag: f + (" " if m.group(1) else ""), message)
    return message.replace("per_device_train_batch_size", "the script's --per_device_train_batch_size")


@contextlib.contextmanager
def _in_launcher_terms(context: str = "") -> Iterator[None]:
    """Re-raise GNSCallback's ValueErrors as LaunchOptionError in the launcher's terms."""
    try:
        yield
    except ValueError as error:
        if isinstance(error, LaunchOptionError):
            raise
        raise LaunchOptionError(_launcher_terms(str(error)) + context) from error


def _checked_callback(options: LaunchOptions, args: Any) -> tuple[GNSCallback, dict[str, Any]]:
    """The GNSCallback the options give a Trainer with TrainingArguments ``args``, and its keyword arguments, checked
    against ``args`` as the Trainer's construction checks it (LaunchOptionError, in the launcher's terms).

    ``args`` is read for ``per_device_train_batch_size``, ``world_size`` and ``gradient_accumulation_steps`` only:
    a Trainer's TrainingArguments (:class:`TrainerLauncher`), or the values the script's command line gives them,
    before it runs (:class:`ScriptBatchArguments`); one check, one message, at both points.
    """
    from transformers import TrainerControl, TrainerState

    from hf_gns_spam.gns import GNSCallback

    kwargs = options.callback_kwargs(args)
    defaults = (
        f" (--min-batch-size defaults to the script's --per_device_train_batch_size x processes x "
        f"--gradient_accumulation_steps = {kwargs['min_batch_size']})"
        if options.schedule and "min_batch_size" not in options.gns_values
        else ""
    )
    with _in_launcher_terms(defaults):
        callback = GNSCallback(**kwargs)
        # the checks GNSCallback makes when a Trainer is built, which add_callback skips
        callback.on_init_end(args, TrainerState(), TrainerControl())
    return callback, kwargs


@dataclasses.dataclass(frozen=True)
class ScriptBatchArguments:
    """The TrainingArguments values the batch bounds are checked against, as the script's command line and the
    environment give them before it runs (read as TrainingArguments by :func:`_checked_callback`)."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int | None  # None: not on the command line (not read when --min-batch-size is)
    world_size: int


_SCRIPT_BATCH_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps")
# the process counts accelerate reads where WORLD_SIZE is not set (an MPI launcher's)
_MPI_WORLD_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def script_batch_arguments(script_args: list[str]) -> ScriptBatchArguments | None:
    """The script's ``per_device_train_batch_size`` and ``gradient_accumulation_steps`` as its ``HfArgumentParser``
    reads them from ``script_args`` (``--name value`` or ``--name=value``, ``--name-with-dashes`` too, the last one
    given, nothing after ``--``), and the processes from the environment.

    None where that is not known before the script runs, or not wanted: its command line does not name the batch
    size (the script sets it in code or in a config file), a value is not an integer (the script's parser reports
    it), an MPI launcher's process count is set without ``WORLD_SIZE`` (which torchrun, accelerate and deepspeed
    set), or it asks the script for its ``--help``.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("-h", "--help", action="store_true")
    for name in _SCRIPT_BATCH_FIELDS:
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name)
    try:
        named = vars(parser.parse_known_args(script_args)[0])
        values = {name: None if named[name] is None else int(named[name]) for name in _SCRIPT_BATCH_FIELDS}
    except (argparse.ArgumentError, ValueError):  # a flag without its value, or not an integer
        return None
    world_size = _launched_processes()
    if named["help"] or values["per_device_train_batch_size"] is None or world_size is None:
        return None
    return ScriptBatchArguments(**values, world_size=world_size)


def _launched_processes() -> int | None:
    """The processes a Trainer will count, from the environment: ``WORLD_SIZE``, which torchrun, accelerate and
    deepspeed set; 1 where no launcher set one; None (unknown) where it is not a number, or where only an MPI
    launcher's count is set (accelerate may count those processes)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]) if os.environ["WORLD_SIZE"].isdigit() else None
    return None if any(name in os.environ for name in _MPI_WORLD_SIZES) else 1


def _check_script_arguments(options: LaunchOptions, script_args: list[str]) -> None:
    """Check the schedule's batch bounds against the script's command line, before it runs (module docstring);
    nothing to check without a schedule, and nothing here where the command line does not give what is needed."""
    if not (options.gns and options.schedule):
        return
    args = script_batch_arguments(script_args)
    defaults_from_accumulation = "min_batch_size" not in options.gns_values
    if args is None or (defaults_from_accumulation and args.gradient_accumulation_steps is None):
        return
    _checked_callback(options, args)


class TrainerLauncher:
    """While :meth:`installed`: patch every Trainer's model and add a GNSCallback to every Trainer (module docstring).

    Through :func:`~hf_gns_spam.integrations.trainer_loop.trainer_construction_hooks`: patch the model a Trainer is
    given (and each model ``model_init`` makes), then add the callback; a GNSCallback the script adds replaces the
    launcher's.
    """

    def __init__(self, options: LaunchOptions) -> None:
        self.options = options
        self._patched_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._callbacks: weakref.WeakSet[GNSCallback] = weakref.WeakSet()
        self._announced: set[str] = set()
        self._unannounced: list[str | None] = []  # from a Trainer's __init__ before it can tell the main process

    @contextlib.contextmanager
    def installed(self) -> Iterator[TrainerLauncher]:
        from hf_gns_spam.integrations.trainer_loop import trainer_construction_hooks  # imports torch: not before

        with trainer_construction_hooks(self._on_model, self._after_init, self._on_add_callback):
            yield self

    # ------------------------------------------------------------------------------------------ the model
    def _prepare_model(self, model: Any) -> str | None:
        """Patch ``model`` unless told not to or already done; returns what to announce."""
        from torch import nn

        from hf_gns_spam.patching import is_patched, patch_model

        if not self.options.patch or not isinstance(model, nn.Module) or model in self._patched_models:
            return None
        self._patched_models.add(model)
        if any(is_patched(module) for module in model.modules()):
            return "the script patched the model itself: left as it is"
        report = patch_model(model, include=self.options.patch_include, exclude=self.options.patch_exclude)
        return f"patch_model: {report}"

    def _announce(self, trainer: Any, message: str | None) -> None:
        """Print ``message`` on stderr once per process, from the main process only."""
        if message is None or message in self._announced or not trainer.is_world_process_zero():
            return
        self._announced.add(message)
        print(f"{_PREFIX}: {message}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------ the callback
    def _add_gns_callback(self, trainer: Any) -> str | None:
        """Add a GNSCallback from the options to ``trainer`` (checked now against its model and arguments)."""
        from hf_gns_spam.gns import GNSCallback
        from hf_gns_spam.patching import is_patched

        if not self.options.gns:
            return None
        if any(isinstance(c, GNSCallback) for c in trainer.callback_handler.callbacks):
            return "the script gives the Trainer its own GNSCallback: the launcher adds none, its GNS options unused"
        if not any(is_patched(module) for module in trainer.model.modules()):
            fix = (
                "drop --no-patch, or add --no-gns"
                if not self.options.patch
                else "the patch report lists why; add --no-gns, or change --patch-include/--patch-exclude"
            )
            raise LaunchOptionError(
                f"the Trainer's model has no patched normalization layer, and GNSCallback measures those: {fix}"
            )
        callback, kwargs = _checked_callback(self.options, trainer.args)
        self._callbacks.add(callback)
        trainer.add_callback(callback)
        return f"GNSCallback({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) added to the Trainer"

    # ------------------------------------------------------------------------------------------ the hooks
    def _on_model(self, trainer: Any, model: Any) -> None:
        """A model the Trainer is given or ``model_init`` made: patched before the Trainer builds anything from it
        (announced once the Trainer knows whether it is the main process)."""
        message = self._prepare_model(model)
        if hasattr(trainer, "args"):
            self._announce(trainer, message)
        else:
            self._unannounced.append(message)

    def _after_init(self, trainer: Any) -> None:
        messages, self._unannounced = self._unannounced, []
        for message in (*messages, self._prepare_model(trainer.model), self._add_gns_callback(trainer)):
            self._announce(trainer, message)

    def _on_add_callback(self, trainer: Any, callback: Any) -> None:
        """A GNSCallback the script adds replaces the launcher's (a Trainer can have one)."""
        from hf_gns_spam.gns import GNSCallback

        kind = callback if isinstance(callback, type) else type(callback)
        if issubclass(kind, GNSCallback) and callback not in self._callbacks:
            for ours in [c for c in trainer.callback_handler.callbacks if c in self._callbacks]:
                trainer.callback_handler.remove_callback(ours)
                self._announce(trainer, "the script adds its own GNSCallback: it replaces the launcher's")


def _misplaced_options(parser: argparse.ArgumentParser, script_args: list[str]) -> list[str]:
    """Launcher options among the script's arguments (put after SCRIPT by mistake)."""
    ours = {s for s in parser._option_string_actions if s.startswith("--") and s != "--help"}
    return [word.split("=", 1)[0] for word in script_args if word.split("=", 1)[0] in ours]


def _check_target(target: str, as_module: bool) -> None:
    """A missing script or module is a LaunchOptionError (checked with the script's sys.path in place)."""
    if not as_module:
        if not os.path.exists(target):
            raise LaunchOptionError(f"SCRIPT {target}: no such file")
        return
    try:
        found = importlib.util.find_spec(target) is not None
    except ImportError:  # a missing parent package
        found = False
    if not found:
        raise LaunchOptionError(f"-m {target}: no module named {target!r} here or in {sys.prefix}")


def _print_misplaced_hint(misplaced: list[str], target: str) -> None:
    print(
        f"{_PREFIX}: note: the script got {', '.join(misplaced)}, which the launcher takes before SCRIPT: "
        f"hf-gns-spam launch {' '.join(misplaced)} ... {target} ...",
        file=sys.stderr,
    )


def run(options: LaunchOptions, target: str, script_args: list[str], as_module: bool = False) -> None:
    """Run ``target`` (a path, or a module name with ``as_module``) as python would, with the Trainer wrapped.

    Raises:
        LaunchOptionError: the script or module does not exist, or the options do not fit the script's
            TrainingArguments: those its command line gives, before it runs, or, while a Trainer is built, its own.
    """
    saved_argv, saved_path = sys.argv, sys.path[:]
    sys.argv = [target, *script_args]  # run_module puts the module's file in sys.argv[0], as python -m does
    if as_module:
        sys.path[0] = os.getcwd()
    elif os.path.isfile(target):  # run_path puts a folder or zip file with a __main__.py there itself
        sys.path[0] = os.path.dirname(os.path.realpath(target))
    try:
        _check_target(target, as_module)
        _check_script_arguments(options, script_args)
        with _destroying_a_new_process_group(), TrainerLauncher(options).installed():
            if as_module:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


@contextlib.contextmanager
def _destroying_a_new_process_group() -> Iterator[None]:
    """Destroy the torch.distributed process group the script created, once it has returned (module docstring)."""
    import torch.distributed

    def initialized() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    before = initialized()
    yield
    if not before and initialized():
        torch.distributed.destroy_process_group()


def main(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """``hf-gns-spam launch`` with the arguments after ``launch``; ``parser`` has :func:`add_arguments`."""
    option_words, target, as_module, script_args = _split_command_line(parser, argv)
    namespace = parser.parse_args(option_words)
    if target is None:
        parser.error("missing SCRIPT: hf-gns-spam launch [options] SCRIPT [args] (or -m MODULE [args])")
    try:
        options = _options_from(namespace)
    except LaunchOptionError as error:
        parser.error(str(error))
    try:
        run(options, target, script_args, as_module)
    except LaunchOptionError as error:  # no such script, or the options do not fit a Trainer the script builds
        print(f"{_PREFIX}: error: {error}", file=sys.stderr)
        return 2
    except (Exception, SystemExit) as failure:
        misplaced = _misplaced_options(parser, script_args)
        if not misplaced or (isinstance(failure, SystemExit) and failure.code in (0, None)):
            raise
        if isinstance(failure, SystemExit):  # the script's argument parser printed why: the hint goes below it
            _print_misplaced_hint(misplaced, target)
            raise
        traceback.print_exc()  # as python reports the script's error, with the hint below it
        _print_misplaced_hint(misplaced, target)
        return 1
    return 0
