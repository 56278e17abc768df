"""Every error class of the package, and the versions of transformers it supports, in one place (imports nothing).

Each class is raised where its docstring says, always with a message that names what was observed and what to do;
they are importable from here and from the modules that raise them.
"""

from __future__ import annotations

__all__ = [
    "TRANSFORMERS_CHECKED",
    "TRANSFORMERS_REQUIREMENT",
    "AccumulationError",
    "CPURepackingError",
    "CheckpointError",
    "ExampleWeightError",
    "LaunchOptionError",
    "TrainerIntegrationError",
    "WholeModelError",
]

# the transformers versions the Trainer integrations are written for (pyproject.toml's requirement, which
# tests/unit/test_constraints.py compares with this), and those the suite has run against
TRANSFORMERS_REQUIREMENT = "transformers>=5.0,<6"
TRANSFORMERS_CHECKED = "5.23, 5.24 and 5.25"


class AccumulationError(RuntimeError):
    """The Trainer's loop did, or would do, something that is not one exact optimizer step per fetched group
    (:mod:`hf_gns_spam.gns.accumulation`, :class:`~hf_gns_spam.GNSCallback`)."""


class CPURepackingError(RuntimeError):
    """A bitsandbytes 4-bit layer is, or would be, repacked for CPU inference, which training cannot survive
    (:mod:`hf_gns_spam.integrations.bitsandbytes_cpu`)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed by this run as it is: a damaged file, or one saved with options or a run shape
    this run cannot continue (:mod:`hf_gns_spam.gns.saved_state`)."""


class ExampleWeightError(ValueError):
    """The loss is not a weighted mean of per-example losses that GNSCallback can identify
    (:mod:`hf_gns_spam.gns.example_weights`, :mod:`hf_gns_spam.gns.logit_gradients`)."""


class LaunchOptionError(ValueError):
    """The launcher's options are invalid, contradict each other, or do not fit the script's TrainingArguments
    (:mod:`hf_gns_spam.launch`)."""


class TrainerIntegrationError(RuntimeError):
    """The installed transformers does not have the Trainer internals the package reaches into
    (:mod:`hf_gns_spam.integrations`)."""


class WholeModelError(ValueError):
    """The whole-model validation (``GNSCallback(validate_every=...)``) cannot run on this model or batch
    (:mod:`hf_gns_spam.gns.whole_model`)."""
