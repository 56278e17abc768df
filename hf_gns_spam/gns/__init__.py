"""Gradient noise scale: the estimator (and, next, the Trainer callback that drives the batch size)."""

from hf_gns_spam.gns.estimator import GradientNoiseScale, unbiased_estimates

__all__ = ["GradientNoiseScale", "unbiased_estimates"]
