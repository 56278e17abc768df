"""Make ``TrainingArguments(optim="stable_spam")`` work with an unmodified ``transformers.Trainer``.

transformers 5 validates ``optim`` against the closed enum ``OptimizerNames`` in ``TrainingArguments.__post_init__``
and dispatches through the module-private dict ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` (see
``reference/hf_trainer.md`` §1). Registration therefore (a) adds a real member to ``OptimizerNames``, so that
``TrainingArguments``, ``HfArgumentParser`` choices, ``set_optimizer`` and pickling all accept the name, and (b) puts a
handler into that dict. Both are private internals: :func:`register_trainer_optimizers` checks that they look as
expected and raises :class:`TrainerIntegrationError` otherwise, never silently doing nothing.

``import hf_gns_spam`` does not import transformers (that takes seconds, and ``hf-gns-spam --help`` should not):
:func:`register_trainer_optimizers_on_import` does each part right after the transformers module it changes has
been executed, (a) after ``transformers.training_args`` (where ``OptimizerNames`` is defined; ``TrainingArguments``
and ``HfArgumentParser`` read it from there), (b) after ``transformers.trainer`` (which imports
``transformers.trainer_optimizer`` and takes the dict from it), or at once for a module already imported. The
import system has no post-import hook, so a :data:`sys.meta_path` finder (:class:`_AfterImport`) gives those two
modules a loader that runs the registration after the module's own code; the module keeps its own loader. Where the
internals differ, the :class:`TrainerIntegrationError` becomes a warning at that import (the transformers import
itself succeeds, and ``StableSPAM`` stays usable through ``Trainer(optimizer_cls_and_kwargs=...)``). Registering on
the first use of one of the package's names instead would miss the documented use, ``import hf_gns_spam`` and then
only transformers' ``TrainingArguments(optim="stable_spam")``.

With the handlers, (c) ``Trainer._load_optimizer_and_scheduler`` is wrapped so that resuming a StableSPAM run from a
checkpoint without its optimizer or scheduler state, or with a state StableSPAM refuses, is an error that names the
file (:func:`_check_resumed_states`), and (d) ``Trainer.log`` so that a StableSPAM run's training records carry
``nonfinite_grad_steps`` (:func:`_log_nonfinite_steps`); both pass through for other optimizers.

The handler builds :class:`~hf_gns_spam.StableSPAM` on the Trainer's own parameter groups (no weight decay on biases
and norms), with ``lr``, ``betas`` and ``eps`` from ``learning_rate``, ``adam_beta1``/``adam_beta2`` and
``adam_epsilon``, and every other constructor keyword from ``optim_args``. It imports the optimizer (and torch) when
the Trainer builds its optimizer.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.abc
import importlib.machinery
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hf_gns_spam.errors import TRANSFORMERS_CHECKED, TRANSFORMERS_REQUIREMENT, CheckpointError, TrainerIntegrationError
from hf_gns_spam.kernels.step_contract import STATE_FORMATS

if TYPE_CHECKING:
    from hf_gns_spam.optim.stable_spam import StableSPAM

__all__ = [
    "TRAINER_OPTIMIZER_NAMES",
    "TrainerIntegrationError",
    "register_trainer_optimizers",
    "register_trainer_optimizers_on_import",
]

# optim name -> keyword arguments it fixes: one per state format that has a Trainer name (the state-format table,
# which imports no torch: this module is imported by ``import hf_gns_spam``)
TRAINER_OPTIMIZER_NAMES: dict[str, dict[str, Any]] = {
    fmt.trainer_name: fmt.trainer_fixed_kwargs for fmt in STATE_FORMATS.values() if fmt.trainer_name is not None
}


def _unsupported(what: str) -> TrainerIntegrationError:
    import transformers

    return TrainerIntegrationError(
        f"hf_gns_spam cannot register optim='stable_spam' with transformers {transformers.__version__}: {what}. "
        f"This release supports {TRANSFORMERS_REQUIREMENT} (checked with {TRANSFORMERS_CHECKED}). Install a "
        f"supported version (pip install '{TRANSFORMERS_REQUIREMENT}'), or bypass the name registry: "
        "Trainer(..., optimizer_cls_and_kwargs=(hf_gns_spam.StableSPAM, {'lr': ...}))."
    )


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to a ``(str, Enum)`` class as a real member (iteration, lookup, pickling)."""
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)  # read by Python >= 3.12
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses to rebind members
    return member


def _field_default(args: Any, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(args) if f.name == name)


def _take_from_optim_args(args: Any, optim_args: dict[str, Any], key: str, trainer_value: Any, flags: str) -> Any:
    """Return the optim_args value for ``key`` if given, refusing a contradiction with a TrainingArguments flag."""
    if key not in optim_args:
        return trainer_value
    value = optim_args.pop(key)
    if key == "betas":
        defaults = (_field_default(args, "adam_beta1"), _field_default(args, "adam_beta2"))
    else:
        defaults = _field_default(args, "adam_epsilon")
    if trainer_value != defaults and trainer_value != value:
        raise ValueError(
            f"StableSPAM: optim_args sets {key}={value} but TrainingArguments sets {flags} to {trainer_value}; "
            "set it in one place only."
        )
    return value


def _make_handler(fixed_kwargs: dict[str, Any]) -> Callable[[Any], tuple[type[StableSPAM], dict[str, Any]]]:
    def stable_spam_handler(ctx: Any) -> tuple[type[StableSPAM], dict[str, Any]]:
        """``ctx`` is ``transformers.trainer_optimizer.OptimizerContext``."""
        from hf_gns_spam.optim.hyperparameters import HYPERPARAMETERS, parse_hyperparameters_text
        from hf_gns_spam.optim.stable_spam import StableSPAM

        args = ctx.args
        # every constructor keyword except params and lr (lr is learning_rate)
        allowed = set(HYPERPARAMETERS) - {"lr"}
        optim_args = parse_hyperparameters_text(dict(ctx.optim_args), allowed=allowed)
        for key, value in fixed_kwargs.items():
            if key in optim_args and optim_args[key] != value:
                raise ValueError(f"StableSPAM: optim={args.optim.value!r} fixes {key}={value}; optim_args sets {key}.")
        if "weight_decay" in optim_args and optim_args.pop("weight_decay") != args.weight_decay:
            raise ValueError(
                "StableSPAM: with the Trainer, weight decay comes from TrainingArguments.weight_decay (the Trainer "
                "applies it to every parameter except biases and norms); set --weight_decay instead of optim_args."
            )
        kwargs: dict[str, Any] = {
            "lr": args.learning_rate,
            "betas": _take_from_optim_args(
                args, optim_args, "betas", (args.adam_beta1, args.adam_beta2), "adam_beta1/adam_beta2"
            ),
            "eps": _take_from_optim_args(args, optim_args, "eps", args.adam_epsilon, "adam_epsilon"),
        }
        kwargs.update(optim_args)
        kwargs.update(fixed_kwargs)
        return StableSPAM, kwargs

    return stable_spam_handler


def _register_names(training_args: ModuleType) -> None:
    """(a) Add the names to ``OptimizerNames`` of the executed ``transformers.training_args`` (idempotent)."""
    optimizer_names = getattr(training_args, "OptimizerNames", None)
    enum_internals = ("_member_map_", "_value2member_map_", "_member_names_")
    if not (
        isinstance(optimizer_names, type)
        and issubclass(optimizer_names, str)
        and all(hasattr(optimizer_names, a) for a in enum_internals)
    ):
        raise _unsupported("TrainingArguments.optim is no longer a str Enum (OptimizerNames)")
    for value in TRAINER_OPTIMIZER_NAMES:
        member = _add_enum_member(optimizer_names, value.upper(), value)
        if optimizer_names(value) is not member:
            raise _unsupported(f"OptimizerNames({value!r}) does not return the added member")


def _register_handlers(trainer_module: ModuleType) -> None:
    """(b) Put the handlers into the dict the executed ``transformers.trainer`` dispatches through (idempotent)."""
    try:
        from transformers import trainer_optimizer, training_args
    except ImportError as error:
        raise _unsupported(f"cannot import the optimizer dispatch modules ({error})") from error
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        raise _unsupported("transformers.trainer_optimizer._OPTIMIZER_HANDLERS is missing")
    if getattr(trainer_module, "_OPTIMIZER_HANDLERS", None) is not handlers:
        raise _unsupported("Trainer no longer dispatches through trainer_optimizer._OPTIMIZER_HANDLERS")
    if not hasattr(trainer_optimizer, "OptimizerContext"):
        raise _unsupported("transformers.trainer_optimizer.OptimizerContext is missing")
    _register_names(training_args)  # done already when training_args was executed; a member is needed as the key
    for value, fixed_kwargs in TRAINER_OPTIMIZER_NAMES.items():
        handlers[training_args.OptimizerNames(value)] = _make_handler(fixed_kwargs)
    _check_resumed_states(trainer_module)
    _log_nonfinite_steps(trainer_module)


def _stable_spam_of(trainer: Any) -> Any:
    """The trainer's StableSPAM (inside accelerate's wrapper), or None."""
    optimizer = getattr(trainer, "optimizer", None)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return optimizer if type(optimizer).__name__ == "StableSPAM" else None


def _log_nonfinite_steps(trainer_module: ModuleType) -> None:
    """(d) Wrap ``Trainer.log`` (idempotent): a training record of a StableSPAM run gets ``nonfinite_grad_steps``,
    the optimizer steps so far with a NaN or ±inf gradient entry (counted on the device; read at the logging step,
    which reads the loss anyway), unless a GNSCallback put its own there first."""
    trainer_class = trainer_module.Trainer
    original = trainer_class.log
    if getattr(original, "_hf_gns_spam", False):
        return

    @functools.wraps(original)
    def log(trainer: Any, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        optimizer = _stable_spam_of(trainer)
        if optimizer is not None and "loss" in logs and "nonfinite_grad_steps" not in logs:
            logs = {**logs, "nonfinite_grad_steps": optimizer.nonfinite_grad_steps}
        return original(trainer, logs, *args, **kwargs)

    log._hf_gns_spam = True
    trainer_class.log = log


def _check_resumed_states(trainer_module: ModuleType) -> None:
    """(c) Wrap ``Trainer._load_optimizer_and_scheduler(checkpoint)`` (idempotent): for a StableSPAM optimizer, a
    checkpoint saved after step 0 without ``optimizer.pt`` or ``scheduler.pt`` (transformers would then go on with a
    fresh optimizer state and learning-rate schedule, silently), or whose optimizer state StableSPAM refuses (a
    layout that does not fit, non-finite values), is a :class:`CheckpointError` naming the file."""
    trainer_class = trainer_module.Trainer
    original = getattr(trainer_class, "_load_optimizer_and_scheduler", None)
    names = [getattr(trainer_module, name, None) for name in ("OPTIMIZER_NAME", "OPTIMIZER_NAME_BIN", "SCHEDULER_NAME")]
    if original is None or not all(isinstance(name, str) for name in names):
        raise _unsupported("Trainer._load_optimizer_and_scheduler or the checkpoint file names are missing")
    if getattr(original, "_hf_gns_spam", False):
        return
    optimizer_name, optimizer_bin, scheduler_name = names

    @functools.wraps(original)
    def load(trainer: Any, checkpoint: str | None) -> None:
        if checkpoint is None or _stable_spam_of(trainer) is None or trainer.is_deepspeed_enabled:
            return original(trainer, checkpoint)
        saved_optimizer = any(
            os.path.isfile(os.path.join(checkpoint, name)) for name in (optimizer_name, optimizer_bin)
        ) or any(  # FSDP's sharded optimizer folders, as the Trainer looks for them
            optimizer_bin.split(".")[0] in entry.name for entry in os.scandir(checkpoint) if entry.is_dir()
        )
        saved_scheduler = os.path.isfile(os.path.join(checkpoint, scheduler_name))
        saved = {optimizer_name: saved_optimizer, scheduler_name: saved_scheduler}
        missing = [name for name, present in saved.items() if not present]
        if missing and trainer.state.global_step > 0:
            raise CheckpointError(
                f"{checkpoint} has no {' and no '.join(missing)}, though it was saved at step "
                f"{trainer.state.global_step}: transformers would go on with a fresh StableSPAM state (moments, "
                "AdaClip and AdaGN statistics at zero) and learning-rate schedule, silently. Restore the file from "
                "the run that saved it or resume from another checkpoint; to start a fresh optimizer deliberately, "
                "load the model's weights from the checkpoint and train without resume_from_checkpoint."
            )
        try:
            return original(trainer, checkpoint)
        except ValueError as error:
            if not str(error).startswith("StableSPAM.load_state_dict"):
                raise
            raise CheckpointError(f"{os.path.join(checkpoint, optimizer_name)}: {error}") from error

    load._hf_gns_spam = True
    trainer_class._load_optimizer_and_scheduler = load


# the transformers module after whose execution each part of the registration runs
_REGISTRATION_STEPS: dict[str, Callable[[ModuleType], None]] = {
    "transformers.training_args": _register_names,
    "transformers.trainer": _register_handlers,
}


def register_trainer_optimizers() -> None:
    """Register every name in :data:`TRAINER_OPTIMIZER_NAMES` with transformers now, importing the Trainer
    (idempotent).

    Raises:
        TrainerIntegrationError: the installed transformers lacks the internals this relies on.
    """
    try:
        from transformers import trainer, training_args
    except ImportError as error:
        raise _unsupported(f"cannot import the optimizer dispatch modules ({error})") from error
    _register_names(training_args)
    _register_handlers(trainer)


def _register_or_warn(step: Callable[[ModuleType], None], module: ModuleType) -> None:
    """A registration step whose failure is a warning: the user's transformers import must not fail because of it."""
    try:
        step(module)
    except TrainerIntegrationError as error:
        warnings.warn(str(error), stacklevel=2)


class _RegisterAfterExecution(importlib.abc.Loader):
    """Wraps the loader of a module of :data:`_REGISTRATION_STEPS`: runs its step after the module's code."""

    def __init__(self, loader: importlib.abc.Loader, step: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.step = step

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # the module keeps its own loader (inspect.getsource, importlib.resources, a later reload read it)
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register_or_warn(self.step, module)


class _AfterImport(importlib.abc.MetaPathFinder):
    """First on :data:`sys.meta_path`: finds the modules of :data:`_REGISTRATION_STEPS` with the other finders and
    wraps their loaders (each execution, a reload included, registers again); declines every other module."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        step = _REGISTRATION_STEPS.get(fullname)
        if step is None:
            return None
        others = (f for f in sys.meta_path if f is not self and hasattr(f, "find_spec"))
        spec = next((s for s in (f.find_spec(fullname, path, target) for f in others) if s is not None), None)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterExecution(spec.loader, step)
        return spec


def register_trainer_optimizers_on_import() -> None:
    """Register the names with the parts of transformers already imported, and with the others right after they
    are imported (idempotent); where transformers' internals differ, warn instead (module docstring).

    Imports nothing: ``import hf_gns_spam`` calls this, so that ``TrainingArguments(optim="stable_spam")`` and
    ``--optim stable_spam`` work whether transformers is imported before or after it.
    """
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    for name, step in _REGISTRATION_STEPS.items():
        module = sys.modules.get(name)
        if module is not None:
            _register_or_warn(step, module)
