"""Optimizers: Stable-SPAM (:mod:`.stable_spam`; its torch path :mod:`.torch_step`, sharded step :mod:`.sharded_step`,
checkpoint checks :mod:`.checkpoint`, quantized moments :mod:`.quantized_state`) and the table of its
hyperparameters (:mod:`.hyperparameters`)."""

from hf_gns_spam.optim.stable_spam import StableSPAM, momentum_decay_factor

__all__ = ["StableSPAM", "momentum_decay_factor"]
