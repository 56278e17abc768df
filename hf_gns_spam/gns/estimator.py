"""The gradient noise scale estimator (McCandlish et al. 2018, App. A.1, with a small batch of one example), for
examples with unequal weights in the loss.

Model. The B examples of an optimizer step have per-example gradients g_b (the gradient of each example's own
loss), i.i.d. with mean G and covariance Σ. The step's loss weights example b by a fixed a_b ≥ 0 (1/B for a mean
over examples, n_b/N for a mean over label tokens with n_b label tokens in example b, and any multiple of these
when a Trainer sums micro-batch means), so its gradient is G_B = Σ_b a_b g_b. The weights must not depend on the
gradients (they may depend on lengths, padding, the micro-batch an example landed in). With A = Σ_b a_b, the
normalised gradient Ĝ = G_B / A is a weighted mean of the g_b and

    E‖Ĝ‖² = |G|² + tr Σ / B_eff,       B_eff = A² / Σ_b a_b²       (the effective batch; 1 < B_eff ≤ B).

Per step the estimator takes

    small = (1/B)·Σ_b ‖g_b‖²     the mean squared norm of the per-example gradients  (E = |G|² + tr Σ)
    big   = ‖Ĝ‖² = ‖G_B‖² / A²

(only E[small] enters the estimates: any other fixed-weight mean of the ‖g_b‖² also does, e.g. the a_b²-weighted
Σ_b ‖a_b g_b‖² / Σ_b a_b², which needs only each example's contribution a_b g_b to the gradient)

and gives unbiased estimates of the squared true gradient |G|² and of the trace of the per-example covariance:

    |G|²  ≈ (B_eff·big − small) / (B_eff − 1)
    tr Σ  ≈ (small − big) / (1 − 1/B_eff)

With equal weights B_eff = B and these are the usual formulas (B·big − small)/(B − 1) and (small − big)/(1 − 1/B).
An example with a_b = 0 carries no information: leave it out of B and of the sums.

Each estimate is noisy (|G|² is often negative per step when B ≪ GNS), so both are smoothed with their own
exponential moving average (decay d), bias-corrected for the zero start, and the gradient noise scale is the ratio

    GNS = EMA(tr Σ) / EMA(|G|²)        (in examples; × tokens per example for tokens)

Outliers. One step with a loss spike (small and big ~1000× the usual) would otherwise dominate the EMAs for hundreds
of steps. After ``outlier_warmup`` updates, each step's inputs are clipped against what the current estimates
predict for them, with the threshold τ = ``outlier_threshold``:

    small ← min(small, τ·(g⁺ + s⁺)),      big ← min(big, τ·(g⁺ + s⁺ / B_eff))

where g⁺ = max(EMA(|G|²), 0) and s⁺ = max(EMA(tr Σ), 0) are the bias-corrected EMAs before the step (a bound that
is not positive does not clip). The bounds are τ × the expected small and big of this step's B_eff, so a step whose
small and big are both clipped enters the EMAs as exactly τ × the current estimates (|G|² = τ·g⁺, tr Σ = τ·s⁺):
while both EMAs are positive it leaves their ratio, the GNS, unchanged, whatever the step's weights. Without
outliers the inputs fluctuate around their expectations and rarely reach τ× them, so the estimates stay unbiased;
a genuine rise is followed at up to (τ − 1)·(1 − d) per step (9% with the defaults) while it is clipped.
``outlier_threshold=inf`` turns clipping off. Clipped steps are counted (``clipped``).

Staleness. Steps with a non-finite input (fp16 overflow, a NaN loss), or that the owner records with
:meth:`GradientNoiseScale.skip`, leave the EMAs unchanged and are counted (``skipped``, ``consecutive_skips``);
:attr:`GradientNoiseScale.is_current` is False while the latest step was skipped, so a dead run does not look
healthy. ``state_dict()`` holds the state that must survive a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["GradientNoiseScale", "StepWeights", "effective_batch_size", "unbiased_estimates"]

# constructor arguments that are settings, not state (left out of state_dict())
HYPERPARAMETERS = ("ema_decay", "outlier_threshold", "outlier_warmup")


def effective_batch_size(weight_sum: float, weight_sq_sum: float) -> float:
    """B_eff = A² / Σ_b a_b² from A = Σ_b a_b and Σ_b a_b² (B for equal weights; invariant to scaling the weights)."""
    if not weight_sq_sum > 0:
        raise ValueError(f"the sum of squared example weights must be positive, got {weight_sq_sum}")
    return weight_sum**2 / weight_sq_sum


def _check_effective_batch(effective_batch: float) -> None:
    if not 1.0 < effective_batch < math.inf:
        raise ValueError(
            f"the gradient noise scale needs an effective batch B_eff = (Σ a_b)² / Σ a_b² in (1, inf) "
            f"(more than one example with weight), got {effective_batch}"
        )


def unbiased_estimates(small: float, big: float, effective_batch: float) -> tuple[float, float]:
    """(|G|², tr Σ) from one step's small and big squared norms and its effective batch B_eff (finite, > 1)."""
    _check_effective_batch(effective_batch)
    grad_sq = (effective_batch * big - small) / (effective_batch - 1.0)
    trace_sigma = (small - big) / (1.0 - 1.0 / effective_batch)
    return grad_sq, trace_sigma


@dataclass
class GradientNoiseScale:
    """Online GNS from per-step (small, big, B_eff): bias-corrected EMAs of |G|² and tr Σ, outlier clipping, skips.

    ``GradientNoiseScale(ema_decay=..., **estimator.state_dict())`` restores an estimator exactly (with the same
    ``outlier_threshold`` and ``outlier_warmup``).
    """

    ema_decay: float = 0.99
    outlier_threshold: float = 10.0  # τ: clip small and big to τ × their expectation under the current estimates
    outlier_warmup: int = 10  # updates before clipping starts (no reliable estimate to clip against yet)
    grad_sq_ema: float = 0.0  # EMA of the per-step |G|² estimates (not bias-corrected)
    trace_sigma_ema: float = 0.0  # EMA of the per-step tr Σ estimates (not bias-corrected)
    updates: int = 0  # steps that entered the EMAs
    skipped: int = 0  # steps left out (non-finite input, or recorded with skip())
    consecutive_skips: int = 0  # skipped steps since the latest update
    clipped: int = 0  # updates whose small or big was clipped

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.outlier_threshold > 1.0:
            raise ValueError(f"outlier_threshold must be > 1 (inf: no clipping), got {self.outlier_threshold}")
        if self.outlier_warmup < 1:
            raise ValueError(f"outlier_warmup must be >= 1 update, got {self.outlier_warmup}")

    def update(self, small: float, big: float, effective_batch: float) -> bool:
        """Add one optimizer step; returns False (and counts it as skipped) when an input is not finite.

        ``effective_batch`` is B_eff = (Σ_b a_b)² / Σ_b a_b² (see :func:`effective_batch_size`), ``big`` the squared
        norm of the gradient divided by A² = (Σ_b a_b)².
        """
        small, big, effective_batch = float(small), float(big), float(effective_batch)
        _check_effective_batch(effective_batch)
        if not (math.isfinite(small) and math.isfinite(big)):
            self.skip()
            return False
        small, big = self._clip(small, big, effective_batch)
        grad_sq, trace_sigma = unbiased_estimates(small, big, effective_batch)
        self.grad_sq_ema = self.ema_decay * self.grad_sq_ema + (1.0 - self.ema_decay) * grad_sq
        self.trace_sigma_ema = self.ema_decay * self.trace_sigma_ema + (1.0 - self.ema_decay) * trace_sigma
        self.updates += 1
        self.consecutive_skips = 0
        return True

    def skip(self) -> None:
        """Record an optimizer step without an estimate (the EMAs keep their values; ``is_current`` becomes False)."""
        self.skipped += 1
        self.consecutive_skips += 1

    def _clip(self, small: float, big: float, effective_batch: float) -> tuple[float, float]:
        """small and big clipped to τ × their expectations under the current estimates (module docstring)."""
        if self.updates < self.outlier_warmup:
            return small, big
        grad_sq, trace_sigma = max(self.grad_sq, 0.0), max(self.trace_sigma, 0.0)
        small_bound = self.outlier_threshold * (grad_sq + trace_sigma)
        big_bound = self.outlier_threshold * (grad_sq + trace_sigma / effective_batch)
        clipped_small = min(small, small_bound) if small_bound > 0 else small
        clipped_big = min(big, big_bound) if big_bound > 0 else big
        if (clipped_small, clipped_big) != (small, big):
            self.clipped += 1
        return clipped_small, clipped_big

    def state_dict(self) -> dict[str, float | int]:
        """Every field but the hyperparameters, as Python numbers (what a checkpoint must keep)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in HYPERPARAMETERS}

    @property
    def is_current(self) -> bool:
        """True when the latest step entered the estimate (False before the first update and after a skip)."""
        return self.updates > 0 and self.consecutive_skips == 0

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


@dataclass(frozen=True)
class StepWeights:
    """The example weights of one optimizer step, summed over the processes: A = Σ_b a_b and Σ_b a_b², and the
    number of processes P. They turn the step's sums over any set of parameters into the estimator's inputs
    (:mod:`hf_gns_spam.gns.estimator`):

        small = Σ_b a_b²‖g_b‖² / Σ_b a_b²      big = ‖G‖² · P² / A²      B_eff = A² / Σ_b a_b²

    (‖G‖² of the gradient each process holds, which DDP averaged over the P processes: P× it is the sum)."""

    weight_sum: float
    weight_sq_sum: float
    processes: int

    @property
    def effective_batch(self) -> float:
        """B_eff, 0 when no example had a weight."""
        return self.weight_sum**2 / self.weight_sq_sum if self.weight_sq_sum > 0 else 0.0

    def small_big(self, sum_sq: float, big: float) -> tuple[float, float]:
        """(small, big) from Σ_b a_b²‖g_b‖² and ‖G‖² of the same parameters."""
        return sum_sq / self.weight_sq_sum, big * self.processes**2 / self.weight_sum**2
