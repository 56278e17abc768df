"""Make ``TrainingArguments(optim="stable_spam")`` work with an unmodified ``transformers.Trainer``.

transformers 5 validates ``optim`` against the closed enum ``OptimizerNames`` in ``TrainingArguments.__post_init__``
and dispatches through the module-private dict ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` (see
``reference/hf_trainer.md`` §1). Registration therefore (a) adds a real member to ``OptimizerNames``, so that
``TrainingArguments``, ``HfArgumentParser`` choices, ``set_optimizer`` and pickling all accept the name, and (b) puts a
handler into that dict. Both are private internals: :func:`register_trainer_optimizers` checks that they look as
expected and raises :class:`TrainerIntegrationError` otherwise, never silently doing nothing.

The handler builds :class:`~hf_gns_spam.StableSPAM` on the Trainer's own parameter groups (no weight decay on biases
and norms), with ``lr``, ``betas`` and ``eps`` from ``learning_rate``, ``adam_beta1``/``adam_beta2`` and
``adam_epsilon``, and every other constructor keyword from ``optim_args``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from hf_gns_spam.optim.hyperparameters import HYPERPARAMETERS, parse_hyperparameters_text
from hf_gns_spam.optim.stable_spam import StableSPAM

__all__ = ["TRAINER_OPTIMIZER_NAMES", "TrainerIntegrationError", "register_trainer_optimizers"]

# optim name -> keyword arguments it fixes
TRAINER_OPTIMIZER_NAMES: dict[str, dict[str, Any]] = {
    "stable_spam": {},
    "stable_spam_8bit": {"state_bits": 8},
    "stable_spam_4bit": {"state_bits": 4},
}

# Keys accepted in optim_args: every constructor keyword except params and lr (lr is learning_rate).
OPTIM_ARGS_KEYS = frozenset(HYPERPARAMETERS) - {"lr"}


class TrainerIntegrationError(RuntimeError):
    """The installed transformers does not have the internals the ``optim="stable_spam"`` registration needs."""


def _unsupported(what: str) -> TrainerIntegrationError:
    import transformers

    return TrainerIntegrationError(
        f"hf_gns_spam cannot register optim='stable_spam' with transformers {transformers.__version__}: {what}. "
        "This release supports transformers 5.x (tested with 5.23). Install a supported version "
        "(pip install 'transformers>=5,<6'), or bypass the name registry: "
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


def _make_handler(fixed_kwargs: dict[str, Any]):
    def stable_spam_handler(ctx: Any) -> tuple[type[StableSPAM], dict[str, Any]]:
        """``ctx`` is ``transformers.trainer_optimizer.OptimizerContext``."""
        args = ctx.args
        optim_args = parse_hyperparameters_text(dict(ctx.optim_args), allowed=set(OPTIM_ARGS_KEYS))
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


def register_trainer_optimizers() -> None:
    """Register every name in :data:`TRAINER_OPTIMIZER_NAMES` with transformers (idempotent).

    Raises:
        TrainerIntegrationError: the installed transformers lacks the internals this relies on.
    """
    try:
        from transformers import trainer as trainer_module
        from transformers import trainer_optimizer
        from transformers.training_args import OptimizerNames
    except ImportError as error:
        raise _unsupported(f"cannot import the optimizer dispatch modules ({error})") from error

    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        raise _unsupported("transformers.trainer_optimizer._OPTIMIZER_HANDLERS is missing")
    if getattr(trainer_module, "_OPTIMIZER_HANDLERS", None) is not handlers:
        raise _unsupported("Trainer no longer dispatches through trainer_optimizer._OPTIMIZER_HANDLERS")
    if not hasattr(trainer_optimizer, "OptimizerContext"):
        raise _unsupported("transformers.trainer_optimizer.OptimizerContext is missing")
    enum_internals = ("_member_map_", "_value2member_map_", "_member_names_")
    if not (issubclass(OptimizerNames, str) and all(hasattr(OptimizerNames, a) for a in enum_internals)):
        raise _unsupported("TrainingArguments.optim is no longer a str Enum (OptimizerNames)")

    for value, fixed_kwargs in TRAINER_OPTIMIZER_NAMES.items():
        member = _add_enum_member(OptimizerNames, value.upper(), value)
        handlers[member] = _make_handler(fixed_kwargs)
        if OptimizerNames(value) is not member:
            raise _unsupported(f"OptimizerNames({value!r}) does not return the added member")
