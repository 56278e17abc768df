"""Gradient noise scale: the estimator and the Trainer callback."""

from hf_gns_spam.gns.callback import GNSCallback
from hf_gns_spam.gns.estimator import GradientNoiseScale, effective_batch_size, unbiased_estimates

__all__ = ["GNSCallback", "GradientNoiseScale", "effective_batch_size", "unbiased_estimates"]
