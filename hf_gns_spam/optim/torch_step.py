"""The torch path of the Stable-SPAM step on one tensor: AdaClip, AdaGN, MoRet and Adam as torch operations
(formulas, and why there is no host synchronisation, in :mod:`hf_gns_spam.optim.stable_spam`).

Every function works in place on a scratch buffer ``work`` of the parameter's shape in the compute dtype
(``torch.promote_types(param.dtype, torch.float32)``) and on 0-dim tensors; every choice that depends on a tensor
value is a ``torch.where``. The optimizer composes them (``stable_spam._update_tensor`` for a plain tensor, the
sharded step for a DTensor shard, whose max|g| and ‖g̃‖ are reduced across ranks in between), and it loads and
stores Adam's moments around :func:`adam_update` in the state's format.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from hf_gns_spam.kernels.step_contract import (
    CLIP_MAX_EMA,
    NONFINITE_GRAD_STEPS,
    NORM_EMA,
    NORM_SQ_EMA,
    StepHyperparameters,
)

__all__ = [
    "Clip",
    "adaclip",
    "adagn",
    "adam_update",
    "bias_correction",
    "clip_into",
    "finite_abs",
    "masked_abs_max",
    "stat_dtype",
]

#: ‖g̃‖ is computed as s·‖g̃/s‖, s = 2^(E − clamp(E, −_SCALE_RANGE, _SCALE_RANGE)) (see stable_spam's docstring).
_SCALE_RANGE = 40


def bias_correction(decay: float, steps: int) -> float:
    """1 − decay^steps, the usual EMA bias correction."""
    return 1.0 - decay**steps


def stat_dtype(device: torch.device) -> torch.dtype:
    """dtype of the per-tensor statistics: float64 (any finite float32 gradient's n² fits), float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def _constant(value: float, compute_dtype: torch.dtype) -> float:
    """A hyperparameter constant of the statistics' updates: rounded to float32 for float32-compute tensors (what the
    Triton kernel receives), exact for float64 ones."""
    if compute_dtype == torch.float64:
        return value
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass(frozen=True)
class Clip:
    """AdaClip's outcome for one tensor (0-dim tensors): the threshold T̂ (compute dtype) and the factors that turn
    g into g̃/s, ``(T̂/max|g|)/s`` for clipped entries and ``1/s`` for the others; s in the statistics' dtype."""

    threshold: torch.Tensor
    spike_factor: torch.Tensor
    inv_scale: torch.Tensor
    scale: torch.Tensor


def _power_of_two_scale(clipped_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/s, s), float32 powers of two, s = 2^(E − clamp(E, −40, 40)) with E the binary exponent of the finite
    float32 ``clipped_max`` >= 0 (0 and subnormals count as E = −127); as the Triton kernel computes it."""
    exponent = (clipped_max.view(torch.int32) >> 23) - 127
    shift = exponent - exponent.clamp(-_SCALE_RANGE, _SCALE_RANGE)
    return ((127 - shift) << 23).view(torch.float32), ((127 + shift) << 23).view(torch.float32)


def finite_abs(grad: torch.Tensor, work: torch.Tensor) -> None:
    """``work = |g|`` with the non-finite entries of g as 0."""
    torch.abs(grad, out=work)
    work.nan_to_num_(nan=0.0, posinf=0.0)


def masked_abs_max(grad: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``work = |g|`` with the non-finite entries as 0; returns (max |g| over all entries, NaN/inf when one is not
    finite; max |g| over the finite ones), both 0-dim (0 for an empty tensor)."""
    torch.abs(grad, out=work)
    if work.numel() == 0:
        zero = work.new_zeros(())
        return zero, zero
    raw_max = work.amax()
    work.nan_to_num_(nan=0.0, posinf=0.0)
    return raw_max, work.amax()


def adaclip(
    state: dict[str, Any],
    hp: StepHyperparameters,
    stat_step: int,
    grad_max: torch.Tensor,
    nonfinite: torch.Tensor,
    one: torch.Tensor,
) -> Clip:
    """Count a non-finite gradient, update AdaClip's EMA T with max|g| (of the finite entries) and return the clip
    factors (the scale s for float32 compute only; float64 tensors are not scaled)."""
    state[NONFINITE_GRAD_STEPS].add_(nonfinite)
    compute_dtype = one.dtype
    clip_max_ema = state[CLIP_MAX_EMA]
    clip_max_ema.lerp_(grad_max.to(clip_max_ema.dtype), _constant(1.0 - hp.gamma3, compute_dtype))
    threshold = clip_max_ema / _constant(bias_correction(hp.gamma3, stat_step), compute_dtype)
    # threshold/max|g| is inf or nan only when max|g| = 0, and then no entry exceeds the threshold
    ratio = (threshold / grad_max.to(threshold.dtype)).to(compute_dtype)
    threshold = threshold.to(compute_dtype)
    if compute_dtype != torch.float32:
        return Clip(threshold, ratio, one, one.to(clip_max_ema.dtype))
    inv_scale, scale = _power_of_two_scale(torch.minimum(grad_max, threshold))
    return Clip(threshold, ratio * inv_scale, inv_scale, scale.to(clip_max_ema.dtype))


def clip_into(grad: torch.Tensor, work: torch.Tensor, spikes: torch.Tensor, clip: Clip) -> None:
    """``work = g̃/s`` from ``work = |g|`` (non-finite entries 0, as :func:`finite_abs` leaves it): entries above
    T̂ times (T̂/max|g|)/s, the others times 1/s, non-finite ones 0."""
    torch.gt(work, clip.threshold, out=spikes)
    torch.where(spikes, clip.spike_factor, clip.inv_scale, out=work)
    work.mul_(grad)
    work.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def adagn(
    state: dict[str, Any],
    work: torch.Tensor,
    hp: StepHyperparameters,
    stat_step: int,
    scaled_norm: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """AdaGN from ``work = g̃/s`` and ``scaled_norm = ‖g̃‖/s`` (compute dtype): updates μ and ν in the state, turns
    ``work`` into ĝ and returns whether the norm is non-zero (a 0-dim bool, what clean mode's skip reads).

    μ ← γ1·μ + (1−γ1)·n,  ν ← γ2·ν + (1−γ2)·n²,  ĝ = g̃/n · μ̂/(√ν̂ + ε) = (g̃/s) · c/(n/s).
    """
    compute_dtype = work.dtype
    norm_ema, norm_sq_ema = state[NORM_EMA], state[NORM_SQ_EMA]
    scaled_norm_stat = scaled_norm.to(norm_ema.dtype)
    norm = scaled_norm_stat * scale
    has_norm = scaled_norm > 0
    weight1 = _constant(1.0 - hp.gamma1, compute_dtype)
    weight2 = _constant(1.0 - hp.gamma2, compute_dtype)
    if hp.faithful:
        norm_ema.lerp_(norm, weight1)
        norm_sq_ema.lerp_(norm.square(), weight2)
    else:  # clean: a zero-norm tensor is skipped, its statistics stay (an EMA weight of 0)
        active = has_norm.to(norm_ema.dtype)
        norm_ema.lerp_(norm, active * weight1)
        norm_sq_ema.lerp_(norm.square(), active * weight2)
    norm_sq_ema_hat_sqrt = (norm_sq_ema / _constant(bias_correction(hp.gamma2, stat_step), compute_dtype)).sqrt_()
    adagn_scale = (norm_ema / _constant(bias_correction(hp.gamma1, stat_step), compute_dtype)).div_(
        norm_sq_ema_hat_sqrt.add_(_constant(hp.eps, compute_dtype))
    )
    factor = torch.where(has_norm, adagn_scale.div_(torch.where(has_norm, scaled_norm_stat, 1.0)), 1.0)
    work.mul_(factor.to(compute_dtype))
    return has_norm


def adam_update(
    param: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    work: torch.Tensor,
    hp: StepHyperparameters,
    adam_step: int,
    has_norm: torch.Tensor,
    one: torch.Tensor,
) -> None:
    """Weight decay, MoRet and Adam from ``work = ĝ`` on the moments ``m``, ``v`` (compute dtype, updated in place;
    ``work`` is overwritten with the denominator):

    ``m ← β1·m + (1−β1)·ĝ``, ``v ← β2·v + (1−β2)·ĝ²``, ``W ← W − lr/bc1 · m/(√v/√bc2 + ε)``, computed as
    ``W ← W − (lr·√bc2/bc1) · m/(√v + ε·√bc2)``. Clean mode zeroes m and v before the update of a reset step and
    leaves a zero-norm tensor (``has_norm`` false) as it is; faithful mode zeroes them after it.
    """
    if hp.weight_decay != 0:
        param.mul_(1.0 - hp.lr * hp.weight_decay)
    if hp.is_reset_step and not hp.faithful:
        m.zero_()
        v.zero_()
    sqrt_bc2 = math.sqrt(bias_correction(hp.beta2, adam_step))
    if hp.faithful:
        m.lerp_(work, 1.0 - hp.beta1)
        v.mul_(hp.beta2)
        denominator_eps: float | torch.Tensor = hp.eps * sqrt_bc2
    else:  # a skipped tensor keeps m and v (ĝ is 0: EMA weight 0, decay 1) and gets an infinite denominator
        active = has_norm.to(work.dtype)
        m.lerp_(work, active * (1.0 - hp.beta1))
        v.mul_(torch.where(has_norm, one * hp.beta2, one))
        denominator_eps = torch.where(has_norm, one * (hp.eps * sqrt_bc2), math.inf)
    v.addcmul_(work, work, value=1.0 - hp.beta2)
    torch.sqrt(v, out=work)
    work.add_(denominator_eps)
    param.addcdiv_(m, work, value=-hp.lr * sqrt_bc2 / bias_correction(hp.beta1, adam_step))
    if hp.is_reset_step and hp.faithful:  # the official reset step used the old moments; zero them now
        m.zero_()
        v.zero_()
