"""The hyperparameters of :class:`~hf_gns_spam.StableSPAM`: their valid ranges and their text form.

One table serves two callers: the optimizer's constructor (every value is checked, a value out of range is a
``ValueError`` naming the parameter and its range) and the Trainer integration, which receives
``TrainingArguments.optim_args`` as ``"key=value,key=value"`` strings and turns them into typed values here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hf_gns_spam.kernels.step_contract import STATE_FORMATS


@dataclass(frozen=True)
class Hyperparameter:
    """One constructor keyword: how to read it from text and which values are valid."""

    name: str
    valid_range: str  # said in the error message
    parse_text: Callable[[str], Any]
    is_valid: Callable[[Any], bool]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_unit_interval(value: Any) -> bool:
    """0 <= value < 1, the range of an exponential-moving-average decay."""
    return _is_real(value) and 0.0 <= value < 1.0


def _parse_betas(text: str) -> tuple[float, float]:
    parts = text.strip("()[]").split(":")
    if len(parts) != 2:
        raise ValueError("write betas as beta1:beta2, e.g. betas=0.9:0.95")
    return float(parts[0]), float(parts[1])


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


HYPERPARAMETERS: dict[str, Hyperparameter] = {
    spec.name: spec
    for spec in (
        Hyperparameter("lr", "a finite float >= 0", float, lambda v: _is_real(v) and v >= 0),
        Hyperparameter(
            "betas",
            "two floats in [0, 1), written beta1:beta2 in optim_args",
            _parse_betas,
            lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_in_unit_interval(b) for b in v),
        ),
        Hyperparameter("eps", "a finite float >= 0", float, lambda v: _is_real(v) and v >= 0),
        Hyperparameter("weight_decay", "a finite float >= 0", float, lambda v: _is_real(v) and v >= 0),
        Hyperparameter(
            "gamma1",
            "a float in [0, 1), or -1 to use betas[0]",
            float,
            lambda v: _in_unit_interval(v) or (_is_real(v) and v == -1),
        ),
        Hyperparameter("gamma2", "a float in [0, 1)", float, _in_unit_interval),
        Hyperparameter("gamma3", "a float in [0, 1)", float, _in_unit_interval),
        Hyperparameter(
            "reset_interval",
            "an integer >= 0 (0 disables the momentum reset)",
            int,
            lambda v: _is_int(v) and v >= 0,
        ),
        Hyperparameter(
            "total_steps",
            "None or an integer >= 1",
            _parse_optional_int,
            lambda v: v is None or (_is_int(v) and v >= 1),
        ),
        Hyperparameter("eta_min", "a float in [0, 1]", float, lambda v: _is_real(v) and 0.0 <= v <= 1.0),
        Hyperparameter("mode", "'clean' or 'faithful'", str, lambda v: v in ("clean", "faithful")),
        Hyperparameter(
            "state_bits",
            "one of " + ", ".join(map(str, STATE_FORMATS)),
            int,
            lambda v: _is_int(v) and v in STATE_FORMATS,
        ),
    )
}


def check_hyperparameter(name: str, value: Any) -> Any:
    """Return ``value`` (betas as a tuple) if it is valid for ``name``, else raise ``ValueError``."""
    spec = HYPERPARAMETERS[name]
    if not spec.is_valid(value):
        raise ValueError(f"StableSPAM: invalid {name}={value!r}; {name} must be {spec.valid_range}.")
    return tuple(value) if name == "betas" else value


def parse_hyperparameters_text(options: dict[str, str], *, allowed: set[str]) -> dict[str, Any]:
    """Convert ``{"gamma1": "0.85", "mode": "faithful"}`` into typed, validated keyword arguments.

    ``allowed`` is the set of keys the caller accepts; any other key is a ``ValueError`` that lists the valid ones.
    """
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"StableSPAM: unknown optim_args key(s) {unknown}; valid keys are {sorted(allowed)}.")
    typed: dict[str, Any] = {}
    for name, text in options.items():
        spec = HYPERPARAMETERS[name]
        try:
            value = spec.parse_text(text)
        except ValueError as error:
            raise ValueError(
                f"StableSPAM: cannot read optim_args {name}={text!r}; {name} must be {spec.valid_range} ({error})."
            ) from None
        typed[name] = check_hyperparameter(name, value)
    return typed
