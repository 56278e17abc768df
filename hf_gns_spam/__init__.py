"""hf-gns-spam: gradient noise scale from normalization layers, and Stable-SPAM, for the Hugging Face Trainer.

Importing the package registers ``optim="stable_spam"`` (``stable_spam_8bit``, ``stable_spam_4bit``) with
``transformers.TrainingArguments`` and ``HfArgumentParser``, whether transformers is imported before or after it. On
a transformers whose internals differ, the import still succeeds with a warning (``StableSPAM`` stays usable through
``Trainer(optimizer_cls_and_kwargs=...)``). It also silences the few third-party messages every CPU run printed
(:mod:`hf_gns_spam.integrations.known_warnings`), exactly those.

The import is light: it imports neither torch nor transformers, so that ``hf-gns-spam --help`` and the launcher's
option errors answer at once (the console script imports this package first). Three parts make that so:

* the public names (``GNSCallback``, ``patch_model``, ``StableSPAM``, ...) are imported from their modules on first
  use, by the module ``__getattr__`` of PEP 562 (``from hf_gns_spam import X`` included), and so are the
  subpackages (``hf_gns_spam.metrics.causal_lm_accuracy`` after ``import hf_gns_spam``);
* the optimizer names are registered right after transformers executes the module each part changes, or at once
  for a module already imported (:mod:`hf_gns_spam.integrations.trainer_optimizer` says how); registering eagerly
  would mean importing transformers here, seconds for every ``import hf_gns_spam``;
* the filters of the known messages are installed here, eagerly: they import only ``logging`` and ``warnings``, and
  one of them must be in place before bitsandbytes is imported (transformers imports peft, which imports it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_gns_spam.integrations.known_warnings import silence_known_warnings
from hf_gns_spam.integrations.trainer_optimizer import register_trainer_optimizers_on_import
from hf_gns_spam.lazy_import import lazy_attributes

__version__ = "0.1.0.dev0"

# public name -> the module it is imported from on first use
_LAZY_NAMES = {
    "CPURepackingError": "hf_gns_spam.integrations.bitsandbytes_cpu",
    "GNSCallback": "hf_gns_spam.gns",
    "PatchReport": "hf_gns_spam.patching",
    "PerExampleStats": "hf_gns_spam.stats",
    "StableSPAM": "hf_gns_spam.optim",
    "TrainerIntegrationError": "hf_gns_spam.integrations.trainer_optimizer",
    "patch_model": "hf_gns_spam.patching",
    "per_example_grad_stats": "hf_gns_spam.stats",
    "reset_per_example_grad_stats": "hf_gns_spam.stats",
    "unpatch_model": "hf_gns_spam.patching",
}

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

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports these
    from hf_gns_spam.gns import GNSCallback
    from hf_gns_spam.integrations.bitsandbytes_cpu import CPURepackingError
    from hf_gns_spam.integrations.trainer_optimizer import TrainerIntegrationError
    from hf_gns_spam.optim import StableSPAM
    from hf_gns_spam.patching import PatchReport, patch_model, unpatch_model
    from hf_gns_spam.stats import PerExampleStats, per_example_grad_stats, reset_per_example_grad_stats


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY_NAMES)


# Before transformers imports peft, which imports bitsandbytes: bitsandbytes logs one of the messages silenced here
# while it is imported (hf_gns_spam/integrations/known_warnings.py).
silence_known_warnings()
register_trainer_optimizers_on_import()
