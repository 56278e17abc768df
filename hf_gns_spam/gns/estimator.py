"""The gradient noise scale estimator (McCandlish et al. 2018, App. A.1, with a small batch of one example).

Per optimizer step, with B examples in the step:

    small = (1/B)·Σ_b ‖g_b‖²     the mean squared norm of the per-example gradients g_b (each example's own loss)
    big   = ‖G_B‖²               the squared norm of the step's gradient G_B = (1/B)·Σ_b g_b

Unbiased estimates of the squared true gradient |G|² and of the trace of the per-example covariance tr Σ:

    |G|²  ≈ (B·big − small) / (B − 1)
    tr Σ  ≈ (small − big) / (1 − 1/B)

Each estimate is noisy (|G|² is often negative per step when B ≪ GNS), so both are smoothed with their own
exponential moving average, bias-corrected for the zero start, and the gradient noise scale is the ratio

    GNS = EMA(tr Σ) / EMA(|G|²)        (in examples; × tokens per example for tokens)

Steps with a non-finite input (fp16 overflow) are skipped and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GradientNoiseScale", "unbiased_estimates"]


def unbiased_estimates(small: float, big: float, batch_size: int) -> tuple[float, float]:
    """(|G|², tr Σ) from one step's small and big squared norms; ``batch_size`` must be at least 2."""
    if batch_size < 2:
        raise ValueError(f"the gradient noise scale needs at least 2 examples per step, got {batch_size}")
    grad_sq = (batch_size * big - small) / (batch_size - 1)
    trace_sigma = (small - big) / (1.0 - 1.0 / batch_size)
    return grad_sq, trace_sigma


@dataclass
class GradientNoiseScale:
    """Online GNS from per-step (small, big, B), with separate bias-corrected EMAs of |G|² and tr Σ."""

    ema_decay: float = 0.99
    grad_sq_ema: float = 0.0
    trace_sigma_ema: float = 0.0
    updates: int = 0  # steps that entered the EMAs
    skipped: int = 0  # steps left out because an input was not finite

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def update(self, small: float, big: float, batch_size: int) -> bool:
        """Add one optimizer step; returns False (and counts it) when the step is skipped as non-finite."""
        grad_sq, trace_sigma = unbiased_estimates(small, big, batch_size)
        if not (math.isfinite(grad_sq) and math.isfinite(trace_sigma)):
            self.skipped += 1
            return False
        self.grad_sq_ema = self.ema_decay * self.grad_sq_ema + (1.0 - self.ema_decay) * grad_sq
        self.trace_sigma_ema = self.ema_decay * self.trace_sigma_ema + (1.0 - self.ema_decay) * trace_sigma
        self.updates += 1
        return True

    @property
    def _debias(self) -> float:
        return 1.0 - self.ema_decay**self.updates

    @property
    def grad_sq(self) -> float:
        """Bias-corrected EMA of |G|² (nan before the first update)."""
        return self.grad_sq_ema / self._debias if self.updates else math.nan

    @property
    def trace_sigma(self) -> float:
        """Bias-corrected EMA of tr Σ (nan before the first update)."""
        return self.trace_sigma_ema / self._debias if self.updates else math.nan

    @property
    def gns(self) -> float:
        """EMA(tr Σ) / EMA(|G|²) in examples; nan until defined, inf when the |G|² average is not positive."""
        if not self.updates:
            return math.nan
        return self.trace_sigma_ema / self.grad_sq_ema if self.grad_sq_ema > 0 else math.inf
