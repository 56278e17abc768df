"""Stable-SPAM (Huang et al. 2025, "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam").

Adam preceded by two per-tensor gradient filters and followed by a periodic momentum reset. For each parameter
tensor W with gradient g at global step t (per step, in this order):

1. decoupled weight decay ``W ← W·(1 − lr·weight_decay)``;
2. AdaClip (γ3): ``T ← γ3·T + (1−γ3)·max|g|``, threshold ``T̂ = T / (1 − γ3^k)``; every entry with
   ``|g_i| > T̂`` becomes ``g_i · T̂ / max|g|``;
3. AdaGN (γ1, γ2) on the clipped gradient g̃ with norm ``n = ‖g̃‖₂``: ``μ ← γ1'·μ + (1−γ1')·n``,
   ``ν ← γ2·ν + (1−γ2)·n²``, ``ĝ = g̃ / n · (μ / (1 − γ1'^k)) / (√(ν / (1 − γ2^k)) + ε)``;
4. MoRet: every ``reset_interval`` (ΔT) global steps the Adam moments are zeroed and Adam's step restarts at 1;
5. Adam on ĝ with ``β1' = β1·s(t)``: ``m ← β1'·m + (1−β1')·ĝ``, ``v ← β2·v + (1−β2)·ĝ²``,
   ``W ← W − lr/(1 − β1'^k) · m / (√v / √(1 − β2^k) + ε)``.

``s(t)`` is 1 unless ``total_steps=T`` is given, in which case it is a cosine from 1 down to ``eta_min`` that
multiplies β1 and γ1 (``γ1' = γ1·s(t)``); it never touches the learning rate.

Two behaviours (``mode``), documented in ``reference/stable_spam.md`` §4 and §6:

``"clean"`` (default) follows the paper's formulas. The AdaClip and AdaGN bias corrections use the global step t;
at a reset step the moments are zeroed *before* the update, so the reset step is a fresh first Adam step; a tensor
whose clipped gradient norm is 0 is skipped (its AdaGN statistics, moments and value stay as they are; weight decay
still applies). ``s(t) = eta_min + (1 − eta_min)·(1 + cos(π·min(t, T)/T))/2``. Without ``total_steps`` this equals
pytorch-optimizer ≥ 4.0's ``StableSPAM`` to rounding.

``"faithful"`` reproduces the official code (TianjinYellow/StableSPAM), whose behaviour produced the paper's numbers:
each tensor has its own counter k, used by all three bias corrections and set back to 1 at a reset; the reset step
still updates with the old moments (with step-1 bias corrections) and the zeroed moments take effect from the next
step; a zero-norm gradient is not rescaled but still enters the Adam moments; and
``s(t) = eta_min + (1 − eta_min)·(1 + cos(π·t/(T + 1)))/2``, periodic past T as in the official code.

The step has no host synchronisation: the per-tensor max|g|, ‖g̃‖ and the AdaClip/AdaGN statistics stay 0-dim
tensors on the parameter's device, and every choice that depends on a tensor value (clip an entry or not, zero norm
or not) is a ``torch.where``. Tensors are processed one after another through one scratch buffer the size of the
largest tensor, so a step allocates no per-tensor temporaries (on CPU it runs at about the speed of torch's foreach
AdamW; see ``benchmarks/optimizer_step.py``). On CUDA, tensors go through the fused Triton step of
:mod:`hf_gns_spam.kernels.stable_spam_step` instead (three launches per tensor; 8/4-bit moments are dequantized,
updated and requantized inside the update kernel); float64 and non-contiguous tensors stay on the torch path.
"""

from __future__ import annotations

import importlib.util
import math
import types
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from hf_gns_spam.optim.hyperparameters import HYPERPARAMETERS, check_hyperparameter
from hf_gns_spam.optim.quantized_state import MIN_QUANTIZED_NUMEL, dequantize, moment_format, quantize

__all__ = ["StableSPAM", "momentum_decay_factor"]

# Per-tensor statistics kept as 0-dim tensors in each parameter's state.
_CLIP_MAX_EMA = "clip_max_ema"  # T, AdaClip's EMA of max|g|
_NORM_EMA = "norm_ema"  # μ, AdaGN's EMA of ‖g̃‖
_NORM_SQ_EMA = "norm_sq_ema"  # ν, AdaGN's EMA of ‖g̃‖²


def momentum_decay_factor(step: int, total_steps: int | None, eta_min: float, mode: str) -> float:
    """The cosine factor s(t) that multiplies β1 and γ1 (1.0 when ``total_steps`` is None).

    clean:    s(t) = eta_min + (1 − eta_min)·(1 + cos(π·min(t, T)/T)) / 2      (reaches eta_min at T, stays there)
    faithful: s(t) = eta_min + (1 − eta_min)·(1 + cos(π·t/(T + 1))) / 2        (the official closed form, periodic)
    """
    if total_steps is None:
        return 1.0
    if mode == "clean":
        phase = math.pi * min(step, total_steps) / total_steps
    else:
        phase = math.pi * step / (total_steps + 1)
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(phase)) / 2.0


def _bias_correction(decay: float, steps: int) -> float:
    """1 − decay^steps, the usual EMA bias correction."""
    return 1.0 - decay**steps


class StableSPAM(torch.optim.Optimizer):
    """Stable-SPAM: AdaClip + AdaGN + momentum reset + Adam (see the module docstring for the formulas).

    Args:
        params: parameters or parameter groups. Any group may override any keyword below.
        lr: learning rate.
        betas: Adam's (β1, β2). β1 is multiplied by s(t) when ``total_steps`` is set.
        eps: added to the AdaGN denominator and to Adam's denominator.
        weight_decay: decoupled (AdamW-style) weight decay, applied first.
        gamma1: AdaGN decay of the EMA of ‖g‖ (γ1); -1 means "use betas[0]", as in the official code.
        gamma2: AdaGN decay of the EMA of ‖g‖² (γ2).
        gamma3: AdaClip decay of the EMA of max|g| (γ3, called ``theta`` elsewhere).
        reset_interval: ΔT, the momentum-reset period in optimizer steps; 0 disables MoRet.
        total_steps: T for the cosine factor s(t) on β1 and γ1; None disables it.
        eta_min: the floor of s(t).
        mode: ``"clean"`` (paper formulas, pytorch-optimizer ≥ 4.0) or ``"faithful"`` (the official code).
        state_bits: storage of Adam's moments: 32 (float32; float64 for float64 parameters), 16 (bfloat16), or 8
            and 4 (blockwise-quantized in bitsandbytes' formats, :mod:`hf_gns_spam.optim.quantized_state`;
            tensors under 4096 elements stay float32). The update itself always runs in float32.

    Paper settings: 4-bit runs ``gamma1=0.7, gamma2=0.9, gamma3=0.999, reset_interval=1000``; BF16 runs
    ``gamma1=0.85, gamma2=0.99999, gamma3=0.999, reset_interval=1000``.

    The statistics are per parameter tensor. Under DeepSpeed ZeRO or FSDP1 flat parameters the optimizer sees
    flattened shards, so "per tensor" silently becomes "per shard"; use DDP or FSDP2.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        reset_interval: int = 1000,
        total_steps: int | None = None,
        eta_min: float = 0.5,
        mode: str = "clean",
        state_bits: int = 32,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "gamma1": gamma1,
            "gamma2": gamma2,
            "gamma3": gamma3,
            "reset_interval": reset_interval,
            "total_steps": total_steps,
            "eta_min": eta_min,
            "mode": mode,
            "state_bits": state_bits,
        }
        for name, value in defaults.items():
            defaults[name] = check_hyperparameter(name, value)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating every hyperparameter it sets or inherits; its step count starts at 0."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name in HYPERPARAMETERS:
            group[name] = check_hyperparameter(name, group[name])
        for param in group["params"]:
            if torch.is_complex(param):
                raise ValueError("StableSPAM does not support complex parameters; view them as real pairs.")
        group.setdefault("step", 0)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state's tensors (moments, quantization scales, per-tensor statistics)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if torch.is_tensor(v))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping the saved dtype of every state tensor.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the parameter's dtype, which would
        turn float32 moments of a bfloat16 parameter into bfloat16 (and lose the bit-identical resume).
        """
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value):
                    self.state[param][key] = value.detach().to(device=param.device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] += 1
            by_device_and_dtype: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("StableSPAM does not support sparse gradients.")
                by_device_and_dtype[(param.device, param.dtype)].append(param)
            for params in by_device_and_dtype.values():
                self._step_tensors(group, params)
        return loss

    def _init_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[param]
        if _CLIP_MAX_EMA not in state:
            compute_dtype = torch.promote_types(param.dtype, torch.float32)
            bits = group["state_bits"]
            if bits in (8, 4) and param.numel() >= MIN_QUANTIZED_NUMEL:
                zeros = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
                state["quantized_bits"] = bits
                for key, second_moment in (("exp_avg", False), ("exp_avg_sq", True)):
                    state[f"{key}_q"], state[f"{key}_absmax"] = quantize(zeros, moment_format(bits, second_moment))
            else:  # bits 8/4 keep small tensors in 32 bits, as bitsandbytes does
                moment_dtype = torch.bfloat16 if bits == 16 else compute_dtype
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(param, dtype=moment_dtype, memory_format=torch.preserve_format)
            for key in (_CLIP_MAX_EMA, _NORM_EMA, _NORM_SQ_EMA):
                state[key] = torch.zeros((), dtype=compute_dtype, device=param.device)
            if group["mode"] == "faithful":
                state["step"] = 0  # the official per-tensor counter k
        return state

    def _step_tensors(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One step for parameters that share a device and a dtype, one tensor after another.

        A single scratch buffer, as large as the largest tensor, holds |g|, then the clipped gradient g̃, then ĝ,
        then Adam's denominator, so the step allocates no per-tensor temporaries.
        """
        t = group["step"]
        faithful = group["mode"] == "faithful"
        s = momentum_decay_factor(t, group["total_steps"], group["eta_min"], group["mode"])
        reset_interval = group["reset_interval"]
        hyper = _StepHyperparameters(
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            beta1=group["betas"][0] * s,
            beta2=group["betas"][1],
            gamma1=(group["betas"][0] if group["gamma1"] == -1 else group["gamma1"]) * s,
            gamma2=group["gamma2"],
            gamma3=group["gamma3"],
            eps=group["eps"],
            faithful=faithful,
            is_reset_step=reset_interval > 0 and t % reset_interval == 0,
        )
        # clean mode: bias corrections of AdaClip/AdaGN on the global step, Adam's step restarts at each reset
        clean_adam_step = t if (reset_interval == 0 or t < reset_interval) else t % reset_interval + 1

        compute_dtype = torch.promote_types(params[0].dtype, torch.float32)
        triton_step = _triton_step() if _use_triton(params[0]) else None
        scratch = spikes = one = None  # the torch path's buffers, allocated when a tensor first needs them
        for param in params:
            state = self._init_state(param, group)
            if faithful:  # the official per-tensor counter k, set back to 1 at a reset
                stat_step = state["step"] + 1
                state["step"] = adam_step = 1 if hyper.is_reset_step else stat_step
            else:
                stat_step, adam_step = t, clean_adam_step
            if triton_step is not None and triton_step.triton_update_supported(param, state):
                triton_step.triton_update_tensor(param, state, hyper, stat_step, adam_step)
                continue
            if scratch is None:
                largest = max(p.numel() for p in params)
                scratch = torch.empty(largest, dtype=compute_dtype, device=param.device)
                spikes = torch.empty(largest, dtype=torch.bool, device=param.device)
                one = torch.ones((), dtype=compute_dtype, device=param.device)
            n = param.numel()
            _update_tensor(
                param,
                state,
                scratch[:n].view(param.shape),
                spikes[:n].view(param.shape),
                hyper,
                stat_step,
                adam_step,
                one,
            )


def _use_triton(param: torch.Tensor) -> bool:
    """Whether the fused Triton step is used for this device (CUDA)."""
    return param.is_cuda


def _triton_step() -> types.ModuleType | None:
    """The fused Triton step for CUDA tensors (fp32/bf16/fp16 params; fp32, bf16, 8- or 4-bit moments), if Triton
    is installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    from hf_gns_spam.kernels import stable_spam_step

    return stable_spam_step


@dataclass(frozen=True)
class _StepHyperparameters:
    """The hyperparameters of one group at one step, with s(t) already applied to β1 and γ1."""

    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    gamma1: float
    gamma2: float
    gamma3: float
    eps: float
    faithful: bool
    is_reset_step: bool


def _update_tensor(
    param: torch.Tensor,
    state: dict[str, Any],
    work: torch.Tensor,
    spikes: torch.Tensor,
    hp: _StepHyperparameters,
    stat_step: int,
    adam_step: int,
    one: torch.Tensor,
) -> None:
    """Weight decay, AdaClip, AdaGN, MoRet and Adam for one tensor (formulas in the module docstring).

    ``work`` and ``spikes`` are scratch buffers of the parameter's shape; ``one`` is a 0-dim 1.0 in the compute
    dtype. Every value-dependent choice is a ``torch.where`` on 0-dim tensors, so nothing is read back to the host.
    """
    grad = param.grad.to(work.dtype)  # a copy only when the dtype differs; never written
    if hp.weight_decay != 0:
        param.mul_(1.0 - hp.lr * hp.weight_decay)

    # AdaClip: T ← γ3·T + (1−γ3)·max|g|;  entries with |g| > T̂ = T/(1−γ3^k) become g·T̂/max|g|.
    torch.abs(grad, out=work)
    grad_max = work.amax()
    clip_max_ema = state[_CLIP_MAX_EMA].lerp_(grad_max, 1.0 - hp.gamma3)
    threshold = clip_max_ema / _bias_correction(hp.gamma3, stat_step)
    torch.gt(work, threshold, out=spikes)
    # threshold/max|g| is inf or nan only when max|g| = 0, and then no entry exceeds the threshold
    torch.where(spikes, threshold / grad_max, one, out=work)
    work.mul_(grad)  # g̃

    # AdaGN: μ ← γ1·μ + (1−γ1)·n,  ν ← γ2·ν + (1−γ2)·n²,  ĝ = g̃/n · μ̂/(√ν̂ + ε).
    norm = torch.linalg.vector_norm(work)
    has_norm = norm > 0
    if hp.faithful:
        norm_ema = state[_NORM_EMA].lerp_(norm, 1.0 - hp.gamma1)
        norm_sq_ema = state[_NORM_SQ_EMA].lerp_(norm.square(), 1.0 - hp.gamma2)
    else:  # clean: a zero-norm tensor is skipped, its statistics stay (an EMA weight of 0)
        active = has_norm.to(work.dtype)
        norm_ema = state[_NORM_EMA].lerp_(norm, active * (1.0 - hp.gamma1))
        norm_sq_ema = state[_NORM_SQ_EMA].lerp_(norm.square(), active * (1.0 - hp.gamma2))
    norm_sq_ema_hat_sqrt = (norm_sq_ema / _bias_correction(hp.gamma2, stat_step)).sqrt_()
    adagn_scale = (norm_ema / _bias_correction(hp.gamma1, stat_step)).div_(norm_sq_ema_hat_sqrt.add_(hp.eps))
    work.mul_(torch.where(has_norm, adagn_scale.div_(torch.where(has_norm, norm, one)), one))  # ĝ

    # MoRet + Adam:  m ← β1·m + (1−β1)·ĝ,  v ← β2·v + (1−β2)·ĝ²,  W ← W − lr/bc1 · m/(√v/√bc2 + ε)
    # computed as W ← W − (lr·√bc2/bc1) · m/(√v + ε·√bc2).
    m, v = _load_moments(state, param, work.dtype)
    if hp.is_reset_step and not hp.faithful:
        m.zero_()
        v.zero_()
    sqrt_bc2 = math.sqrt(_bias_correction(hp.beta2, adam_step))
    if hp.faithful:
        m.lerp_(work, 1.0 - hp.beta1)
        v.mul_(hp.beta2)
        denominator_eps: float | torch.Tensor = hp.eps * sqrt_bc2
    else:  # a skipped tensor keeps m and v (ĝ is 0: EMA weight 0, decay 1) and gets an infinite denominator
        m.lerp_(work, active * (1.0 - hp.beta1))
        v.mul_(torch.where(has_norm, one * hp.beta2, one))
        denominator_eps = torch.where(has_norm, one * (hp.eps * sqrt_bc2), math.inf)
    v.addcmul_(work, work, value=1.0 - hp.beta2)
    torch.sqrt(v, out=work)
    work.add_(denominator_eps)
    param.addcdiv_(m, work, value=-hp.lr * sqrt_bc2 / _bias_correction(hp.beta1, adam_step))

    if hp.is_reset_step and hp.faithful:  # the official reset step used the old moments; zero them now
        m.zero_()
        v.zero_()
    _store_moments(state, m, v)


def _load_moments(state: dict[str, Any], param: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's moments in the compute dtype: the state tensors themselves when they are stored in it, else copies
    (bf16 moments cast up; 8/4-bit moments dequantized)."""
    if "exp_avg" in state:
        return state["exp_avg"].to(dtype), state["exp_avg_sq"].to(dtype)
    bits = state["quantized_bits"]
    moments = []
    for key, second_moment in (("exp_avg", False), ("exp_avg_sq", True)):
        fmt = moment_format(bits, second_moment)
        values = dequantize(state[f"{key}_q"], state[f"{key}_absmax"], fmt, param.numel())
        moments.append(values.view(param.shape).to(dtype))
    return moments[0], moments[1]


def _store_moments(state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
    """Write back moments that :func:`_load_moments` returned as copies."""
    if "exp_avg" in state:
        if m is not state["exp_avg"]:
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)
        return
    bits = state["quantized_bits"]
    for key, values, second_moment in (("exp_avg", m, False), ("exp_avg_sq", v, True)):
        indices, absmax = quantize(values, moment_format(bits, second_moment))
        state[f"{key}_q"].copy_(indices)
        state[f"{key}_absmax"].copy_(absmax)
