"""hf-gns-spam: gradient noise scale from normalization layers, and Stable-SPAM, for the Hugging Face Trainer.

Importing the package registers ``optim="stable_spam"`` with ``transformers.TrainingArguments``.
"""

from hf_gns_spam.integrations.trainer_optimizer import TrainerIntegrationError, register_trainer_optimizers
from hf_gns_spam.optim import StableSPAM

__version__ = "0.1.0.dev0"

__all__ = ["StableSPAM", "TrainerIntegrationError", "__version__"]

register_trainer_optimizers()
