"""What ``GNSCallback`` keeps in a checkpoint, and how a run that resumes from it checks it against itself.

The Trainer writes the callback's state into ``trainer_state.json`` (``stateful_callbacks["GNSCallback"]``)::

    {"args": {<every GNSConfig option>},
     "run": {"processes": P, "per_device_train_batch_size": b},
     "attributes": {"controller_state": {...}, "estimator_state": {...}, "samples": ..., ...}}

On resume, before anything of it is used:

* :func:`check_saved_state`: every value has the type and range it was written with (a whole number of
  examples, finite EMAs, a position in the Trainer's loop); otherwise :class:`~hf_gns_spam.errors.CheckpointError`
  naming the file and the key. Keys that older versions did not write (``run``, the groups' and the whole
  model's estimates, ``samples_from_start``, ``nonfinite_grad_steps``) may be missing; any other missing key is
  damage.
* :func:`check_run_shape`: the processes and the per-device batch are the checkpoint's. The saved position counts
  micro-batches of P × b examples in the Trainer's epoch, whose order also depends on P; another shape is refused,
  naming it (the way out: resume with the saved shape, or start a new run from the checkpoint's weights).
* :func:`changed_options`: each option the resuming run passes differently. The schedule and ``min_batch_size`` fix
  the reference batch the run's budget and position are counted in, so a change is refused; so is a
  ``max_batch_size`` below the batch in force (the batch never decreases). Every other change applies from the
  resume point, said in one warning that lists old and new values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hf_gns_spam.errors import CheckpointError
from hf_gns_spam.gns.arguments import NORM_GROUPS, GNSConfig
from hf_gns_spam.gns.estimator import HYPERPARAMETERS, GradientNoiseScale
from hf_gns_spam.gns.schedule import follows_gns

__all__ = ["RunShape", "changed_options", "check_resume", "check_run_shape", "check_saved_state"]

logger = logging.getLogger(__name__)

# options a resumed run cannot change: they fix the reference batch its budget and position are counted in
FIXED_OPTIONS = ("schedule", "min_batch_size")
_COUNTS = ("samples", "last_batch_size", "last_accumulation", "steps_since_verified")
_LATER_COUNTS = ("nonfinite_grad_steps",)  # counts older checkpoints lack
_POSITION = {"accumulation": 1, "epoch": -1, "position": 0, "fetch": 0, "last_fetch": 0}  # key -> its least value
_ESTIMATES = ("estimator_state", "total_estimator_state", "total_no_embeddings_estimator_state")
_ESTIMATOR_FIELDS = tuple(name for name in GradientNoiseScale.__dataclass_fields__ if name not in HYPERPARAMETERS)


@dataclass(frozen=True)
class RunShape:
    """How a run splits its batch: processes × per-device micro-batch = the examples of one accumulation step."""

    processes: int
    per_device_train_batch_size: int

    @classmethod
    def of(cls, args: Any) -> RunShape:
        """The shape of a run with these ``TrainingArguments``."""
        return cls(args.world_size, args.per_device_train_batch_size)

    @property
    def unit(self) -> int:
        return self.processes * self.per_device_train_batch_size

    def as_dict(self) -> dict[str, int]:
        return {"processes": self.processes, "per_device_train_batch_size": self.per_device_train_batch_size}


def check_resume(saved: Any, config: GNSConfig, run: RunShape, where: str) -> list[str]:
    """Everything a run with ``config`` and ``run`` checks before resuming from GNSCallback's ``saved`` state
    (written in ``where``): the state itself, the run shape, the options; returns the changes that apply."""
    check_saved_state(saved, where)
    check_run_shape(saved, run, where)
    attributes = saved["attributes"]
    if "group_estimator_states" not in attributes and follows_gns(config.schedule) and config.gns_signal != "all":
        logger.warning(
            "GNSCallback: the checkpoint was saved before the norm groups existed; its batch followed the GNS of "
            "every patched norm (gns_signal='all'). From here on it follows gns_signal=%r, whose estimate starts "
            "afresh (pass gns_signal='all' to keep the old signal).",
            config.gns_signal,
        )
    batch_in_force = attributes["controller_state"]["accumulation"] * run.unit
    return changed_options(saved["args"], config, batch_in_force, where)


def _damaged(where: str, key: str, value: Any, expected: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: GNSCallback's saved {key} is {value!r}, not {expected}: the checkpoint is damaged. Resume from "
        "another checkpoint, or delete stateful_callbacks['GNSCallback'] from that file to resume without the "
        "callback's state (its estimates restart, and with a schedule the batch restarts at min_batch_size)."
    )


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_saved_state(saved: Any, where: str) -> None:
    """Raise :class:`CheckpointError` naming ``where`` (the checkpoint's ``trainer_state.json``) and the key for the
    first value of GNSCallback's saved state that is missing, of the wrong type or out of range."""
    if not isinstance(saved, Mapping):
        raise _damaged(where, "state", saved, "a mapping")
    for key in ("args", "attributes"):
        if not isinstance(saved.get(key), Mapping):
            raise _damaged(where, key, saved.get(key), "a mapping")
    options = {name: value for name, value in saved["args"].items() if name in GNSConfig.__dataclass_fields__}
    try:
        GNSConfig(**options)
    except (TypeError, ValueError) as error:
        raise _damaged(where, "args", saved["args"], f"valid options ({error})") from error
    attributes = saved["attributes"]
    position = attributes.get("controller_state")
    if not isinstance(position, Mapping):
        raise _damaged(where, "attributes.controller_state", position, "the position in the Trainer's loop")
    for key, least in _POSITION.items():
        if not _whole(position.get(key), least):
            raise _damaged(where, f"attributes.controller_state.{key}", position.get(key), f"a whole number >= {least}")
    for key in (*_COUNTS, *(key for key in _LATER_COUNTS if key in attributes)):
        if not _whole(attributes.get(key), 0):
            raise _damaged(where, f"attributes.{key}", attributes.get(key), "a whole number >= 0")
    tokens = attributes.get("tokens_per_example")
    if not _number(tokens) or not (math.isnan(tokens) or 0 <= tokens < math.inf):
        raise _damaged(where, "attributes.tokens_per_example", tokens, "a number >= 0 (nan before any label token)")
    if not isinstance(attributes.get("samples_from_start", True), bool):
        raise _damaged(where, "attributes.samples_from_start", attributes["samples_from_start"], "true or false")
    estimates = {key: attributes.get(key) for key in _ESTIMATES if key in attributes or key == "estimator_state"}
    groups = attributes.get("group_estimator_states") or {}
    if not isinstance(groups, Mapping) or not set(groups) <= set(NORM_GROUPS):
        raise _damaged(where, "attributes.group_estimator_states", groups, f"estimates of the groups {NORM_GROUPS}")
    estimates.update({f"group_estimator_states.{group}": state for group, state in groups.items()})
    for key, state in estimates.items():
        if state is None and key != "estimator_state":  # an older checkpoint's whole-model estimate: none yet
            continue
        if not isinstance(state, Mapping):
            raise _damaged(where, f"attributes.{key}", state, "an estimator's state")
        for field in _ESTIMATOR_FIELDS:
            value = state.get(field)
            ema = field.endswith("_ema")
            if not (math.isfinite(value) if ema and _number(value) else _whole(value, 0)):
                expected = "a finite number" if ema else "a whole number >= 0"
                raise _damaged(where, f"attributes.{key}.{field}", value, expected)
    run = saved.get("run")
    if run is not None and not (
        isinstance(run, Mapping) and all(_whole(run.get(k), 1) for k in RunShape(1, 1).as_dict())
    ):
        raise _damaged(where, "run", run, "the processes and per-device batch it was saved with")


def check_run_shape(saved: Mapping[str, Any], current: RunShape, where: str) -> None:
    """Refuse to resume with other processes or another per-device batch than the checkpoint was saved with."""
    run = saved.get("run")
    if run is None:  # written before the run shape was kept
        return
    for name, old in run.items():
        new = getattr(current, name)
        if new != old:
            flag = "the number of processes (torchrun --nproc_per_node)" if name == "processes" else name
            raise CheckpointError(
                f"{where} was saved with {name}={old}, and this run has {name}={new}: GNSCallback's saved position "
                "counts micro-batches of processes x per_device_train_batch_size examples in the Trainer's epoch, "
                f"whose order depends on the processes too, so it cannot be resumed with another {flag}. Resume with "
                f"{name}={old}, or start a new run from the checkpoint's weights (load the model from its directory "
                "and train without resume_from_checkpoint)."
            )


def changed_options(saved_args: Mapping[str, Any], config: GNSConfig, batch_in_force: int, where: str) -> list[str]:
    """The options ``config`` changes from the checkpoint's, as ``"name old -> new"``, all of which apply from the
    resume point; raise :class:`CheckpointError` for a change that cannot (module docstring). ``batch_in_force``:
    the examples of the checkpoint's next optimizer step (all processes)."""
    changes = []
    for name, new in config.as_dict().items():
        if name not in saved_args:  # an option added after the checkpoint was written: its default applied
            continue
        old = saved_args[name]
        if old == new or (isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new)):
            continue
        scheduled = config.schedule is not None or saved_args.get("schedule") is not None
        if name in FIXED_OPTIONS and scheduled:
            raise CheckpointError(
                f"{where} was saved with GNSCallback({name}={old!r}), and this run passes {name}={new!r}: the "
                "schedule and min_batch_size fix the reference batch that the run's budget in data and its position "
                f"are counted in. Resume with {name}={old!r}, or start a new run from the checkpoint's weights "
                "(load the model from its directory and train without resume_from_checkpoint)."
            )
        if name == "max_batch_size" and config.schedule is not None and new < batch_in_force:
            raise CheckpointError(
                f"{where} was saved with GNSCallback(max_batch_size={old}) and a batch of {batch_in_force} examples "
                f"in force; this run passes max_batch_size={new}, below it, and the batch never decreases. Pass "
                f"max_batch_size >= {batch_in_force}."
            )
        changes.append(f"{name} {old!r} -> {new!r}")
    return changes
