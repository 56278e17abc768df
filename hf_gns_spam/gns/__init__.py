"""Gradient noise scale: the estimator and the Trainer callback."""

from hf_gns_spam.gns.callback import GNSCallback
from hf_gns_spam.gns.estimator import GradientNoiseScale, unbiased_estimates

__all__ = ["GNSCallback", "GradientNoiseScale", "unbiased_estimates"]
