"""hf-gns-spam: gradient noise scale from normalization layers, and Stable-SPAM, for the Hugging Face Trainer.

Importing the package registers ``optim="stable_spam"`` with ``transformers.TrainingArguments``. On a transformers
whose internals differ, the import still succeeds with a warning (``StableSPAM`` stays usable through
``Trainer(optimizer_cls_and_kwargs=...)``). It also silences two third-party messages every CPU run printed
(:mod:`hf_gns_spam.integrations.known_warnings`), exactly those.
"""

# ruff: noqa: E402  (the filters are installed before the imports below load transformers' Trainer)

import warnings

from hf_gns_spam.integrations.known_warnings import silence_known_warnings

# Before anything imports transformers' Trainer, which imports peft, which imports bitsandbytes: bitsandbytes logs
# the message silenced here while it is imported (hf_gns_spam/integrations/known_warnings.py).
silence_known_warnings()

from hf_gns_spam.gns import GNSCallback
from hf_gns_spam.integrations.bitsandbytes_cpu import CPURepackingError
from hf_gns_spam.integrations.trainer_optimizer import TrainerIntegrationError, register_trainer_optimizers
from hf_gns_spam.optim import StableSPAM
from hf_gns_spam.patching import PatchReport, patch_model, unpatch_model
from hf_gns_spam.stats import PerExampleStats, per_example_grad_stats, reset_per_example_grad_stats

__version__ = "0.1.0.dev0"

__all__ = [
    "CPURepackingError",
    "GNSCallback",
    "PatchReport",
    "PerExampleStats",
    "StableSPAM",
    "TrainerIntegrationError",
    "__version__",
    "patch_model",
    "per_example_grad_stats",
    "reset_per_example_grad_stats",
    "unpatch_model",
]

try:
    register_trainer_optimizers()
except TrainerIntegrationError as error:
    warnings.warn(str(error), stacklevel=2)
