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

The step has no host synchronisation per tensor: per-tensor maxima and norms are computed with multi-tensor
(``torch._foreach_*``) reductions, their small per-tensor arithmetic runs on stacked vectors, and every choice that
depends on a tensor value (clip or not, zero norm or not) is a ``torch.where``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from hf_gns_spam.optim.hyperparameters import HYPERPARAMETERS, check_hyperparameter

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
        state_bits: storage of Adam's moments: 32 (float32; float64 for float64 parameters) or 16 (bfloat16).

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
        if group["state_bits"] in (8, 4):
            raise NotImplementedError(
                f"StableSPAM: state_bits={group['state_bits']} (blockwise-quantized moments) is not available yet; "
                "use state_bits=32 or state_bits=16."
            )
        for param in group["params"]:
            if torch.is_complex(param):
                raise ValueError("StableSPAM does not support complex parameters; view them as real pairs.")
        group.setdefault("step", 0)

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
        if "exp_avg" not in state:
            compute_dtype = torch.promote_types(param.dtype, torch.float32)
            moment_dtype = torch.bfloat16 if group["state_bits"] == 16 else compute_dtype
            state["exp_avg"] = torch.zeros_like(param, dtype=moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=moment_dtype, memory_format=torch.preserve_format)
            for key in (_CLIP_MAX_EMA, _NORM_EMA, _NORM_SQ_EMA):
                state[key] = torch.zeros((), dtype=compute_dtype, device=param.device)
            if group["mode"] == "faithful":
                state["step"] = 0  # the official per-tensor counter k
        return state

    def _step_tensors(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One step for parameters that share a device and a dtype."""
        t = group["step"]
        faithful = group["mode"] == "faithful"
        beta1, beta2 = group["betas"]
        gamma1 = beta1 if group["gamma1"] == -1 else group["gamma1"]
        gamma2, gamma3, eps, lr = group["gamma2"], group["gamma3"], group["eps"], group["lr"]
        s = momentum_decay_factor(t, group["total_steps"], group["eta_min"], group["mode"])
        beta1, gamma1 = beta1 * s, gamma1 * s
        reset_interval = group["reset_interval"]
        is_reset_step = reset_interval > 0 and t % reset_interval == 0

        states = [self._init_state(p, group) for p in params]
        device = params[0].device
        compute_dtype = states[0][_NORM_EMA].dtype

        # Bias-correction step counts: k for AdaClip/AdaGN, k_adam for Adam (one per tensor).
        if faithful:
            stat_steps = [state["step"] + 1 for state in states]
            adam_steps = [1 if is_reset_step else k for k in stat_steps]
            for state, k in zip(states, adam_steps, strict=True):
                state["step"] = k
        else:
            adam_step = t if (reset_interval == 0 or t < reset_interval) else t % reset_interval + 1
            stat_steps = [t] * len(params)
            adam_steps = [adam_step] * len(params)

        def per_tensor(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=compute_dtype, device=device)

        def scalar(value: float) -> torch.Tensor:  # keeps torch.where in compute_dtype (Python scalars give float32)
            return torch.tensor(value, dtype=compute_dtype, device=device)

        if group["weight_decay"] != 0:
            torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])

        grads = [p.grad.to(compute_dtype) for p in params]  # a copy only when the dtype differs; never written

        # AdaClip: per-tensor max|g| and its EMA; entries above the bias-corrected threshold are rescaled.
        grad_max = torch.stack(torch._foreach_norm(grads, math.inf))
        clip_max_ema = torch.stack([state[_CLIP_MAX_EMA] for state in states])
        clip_max_ema = gamma3 * clip_max_ema + (1.0 - gamma3) * grad_max
        threshold = clip_max_ema / per_tensor([_bias_correction(gamma3, k) for k in stat_steps])
        clip_ratio = torch.where(grad_max > 0, threshold / torch.where(grad_max > 0, grad_max, 1.0), 1.0)
        clipped = [
            torch.where(g.abs() > thr, g * ratio, g)
            for g, thr, ratio in zip(grads, threshold.unbind(), clip_ratio.unbind(), strict=True)
        ]

        # AdaGN: EMAs of the clipped norm and squared norm; rescale to unit direction × μ̂ / (√ν̂ + ε).
        norm = torch.stack(torch._foreach_norm(clipped))
        has_norm = norm > 0
        norm_ema = torch.stack([state[_NORM_EMA] for state in states])
        norm_sq_ema = torch.stack([state[_NORM_SQ_EMA] for state in states])
        new_norm_ema = gamma1 * norm_ema + (1.0 - gamma1) * norm
        new_norm_sq_ema = gamma2 * norm_sq_ema + (1.0 - gamma2) * norm.square()
        if not faithful:  # clean: a zero-norm tensor leaves its statistics untouched
            new_norm_ema = torch.where(has_norm, new_norm_ema, norm_ema)
            new_norm_sq_ema = torch.where(has_norm, new_norm_sq_ema, norm_sq_ema)
        norm_ema_hat = new_norm_ema / per_tensor([_bias_correction(gamma1, k) for k in stat_steps])
        norm_sq_ema_hat = new_norm_sq_ema / per_tensor([_bias_correction(gamma2, k) for k in stat_steps])
        adagn_scale = norm_ema_hat / (norm_sq_ema_hat.sqrt() + eps)
        grad_scale = torch.where(has_norm, adagn_scale / torch.where(has_norm, norm, 1.0), 1.0)
        torch._foreach_mul_(clipped, list(grad_scale.unbind()))
        scaled_grads = clipped

        torch._foreach_copy_([state[_CLIP_MAX_EMA] for state in states], list(clip_max_ema.unbind()))
        torch._foreach_copy_([state[_NORM_EMA] for state in states], list(new_norm_ema.unbind()))
        torch._foreach_copy_([state[_NORM_SQ_EMA] for state in states], list(new_norm_sq_ema.unbind()))

        # MoRet + Adam.
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        if is_reset_step and not faithful:
            torch._foreach_zero_(exp_avgs)
            torch._foreach_zero_(exp_avg_sqs)
        stored_low_precision = exp_avgs[0].dtype != compute_dtype
        m = [x.to(compute_dtype) for x in exp_avgs] if stored_low_precision else exp_avgs
        v = [x.to(compute_dtype) for x in exp_avg_sqs] if stored_low_precision else exp_avg_sqs

        if faithful:
            torch._foreach_lerp_(m, scaled_grads, 1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, scaled_grads, scaled_grads, 1.0 - beta2)
            denom_eps = [eps] * len(params)
        else:
            # A skipped (zero-norm) tensor keeps its moments (its scaled gradient is 0, so decay 1 keeps them)
            # and gets no update (an infinite denominator turns m / denom into 0).
            torch._foreach_mul_(m, list(torch.where(has_norm, scalar(beta1), 1.0).unbind()))
            torch._foreach_add_(m, scaled_grads, alpha=1.0 - beta1)
            torch._foreach_mul_(v, list(torch.where(has_norm, scalar(beta2), 1.0).unbind()))
            torch._foreach_addcmul_(v, scaled_grads, scaled_grads, 1.0 - beta2)
            denom_eps = list(torch.where(has_norm, scalar(eps), math.inf).unbind())

        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(_bias_correction(beta2, k)) for k in adam_steps])
        torch._foreach_add_(denom, denom_eps)
        step_sizes = [-lr / _bias_correction(beta1, k) for k in adam_steps]
        torch._foreach_addcdiv_(params, m, denom, step_sizes)

        if is_reset_step and faithful:  # the official reset step used the old moments; zero them for the next step
            torch._foreach_zero_(exp_avgs)
            torch._foreach_zero_(exp_avg_sqs)
        elif stored_low_precision:
            torch._foreach_copy_(exp_avgs, m)
            torch._foreach_copy_(exp_avg_sqs, v)
