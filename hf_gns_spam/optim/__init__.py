"""Optimizers: Stable-SPAM and the table of its hyperparameters."""

from hf_gns_spam.optim.stable_spam import StableSPAM, momentum_decay_factor

__all__ = ["StableSPAM", "momentum_decay_factor"]
