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

Non-finite gradient entries. A NaN or ±inf entry of a gradient is treated as 0 (in both modes, at every state
width, on both paths): it never reaches max|g|, ‖g̃‖, the AdaClip/AdaGN statistics or the Adam moments, and the
tensor's finite entries are used as usual. If every entry is non-finite the tensor has a zero gradient, which each
mode already handles (clean: skipped; faithful: moves on its momentum). We zero entries rather than skip the
tensor's step because (a) it is one ``torch.where``-style operation per entry, with no host synchronisation, whereas
a skip must gate every state write on a device value and still could not hold back faithful mode's per-tensor
counter k, a host integer; (b) one bad entry (an overflow in one position, one bad row) should not discard the
tensor's other gradients; (c) AdamW lets such an entry poison its own parameter for good, zeroing keeps even that
entry finite. Each step in which a tensor had a non-finite entry adds 1 to ``state[p]["nonfinite_grad_steps"]`` (an
int64 0-dim tensor, saved with the state dict). Reading that counter needs the host, so it is read lazily: every
:attr:`StableSPAM.nonfinite_check_interval` (100) steps; on the CPU it is read then, on CUDA the check starts a
non-blocking copy to pinned memory and reads it at a later check once it has arrived (no synchronisation; the warning
then comes one or two intervals late); other devices read it every interval. The first time a counter is non-zero
the optimizer warns (``RuntimeWarning``, once per optimizer) and training goes on.

Overflow. ‖g̃‖ is computed as ``s·‖g̃/s‖`` with s a power of two chosen from the largest |g̃| (``min(max|g|, T̂)``):
``s = 2^(E − clamp(E, −40, 40))`` for its binary exponent E, so s = 1 (no rescaling at all) whenever that
largest entry lies in [2^-40, 2^41), and ‖g̃/s‖² never overflows or vanishes otherwise (float32 compute dtype;
float64 parameters are not scaled). The statistics T, μ, ν are float64 0-dim tensors (float32 on MPS, which has no
float64), so n² of any finite float32 gradient (n < 3.4e38·√numel) is representable. The hyperparameter constants
of those updates (1 − γ, bias corrections, ε) are rounded to float32 for float32-compute tensors, as they were when
the statistics were float32. A finite spike of ~1e38 is real data to the algorithm: AdaGN then damps the tensor's
following updates until ν has decayed back (about ln(spike²/n²)/ln(1/γ2) steps, ~1600 for a 1e37× spike at γ2 =
0.9), and AdaClip's threshold stays high while T decays (γ3).

Loading a state dict (:meth:`StableSPAM.load_state_dict`): every hyperparameter of the checkpoint is validated with
the table of :mod:`hf_gns_spam.optim.hyperparameters` (an invalid one is a ``ValueError`` and nothing is loaded); a
checkpoint of another ``state_bits`` is refused with a ``ValueError`` saying how to build a matching optimizer (its
moments are not converted: a conversion would silently change the run), as is a tensor state whose layout does not
fit the parameter (another width, or another sharding); other hyperparameters that differ from this optimizer's
(``lr`` excepted: the scheduler owns it) are taken from the checkpoint, as ``torch.optim`` does, with a
``UserWarning`` that names each key, both values and the one used. Checkpoints written before the statistics were
float64 load as well (the statistics are converted, the counter starts at 0).

FSDP2 (DTensor parameters sharded with ``torch.distributed.fsdp.fully_shard``, or any DTensor whose placements are
``Shard``/``Replicate`` with at most one sharded mesh dimension): the moments live on each rank's local shard
(``param.to_local()``) and the 0-dim statistics, identical on every rank, next to them; max|g| and ‖g̃‖ are over the
whole logical tensor. A step runs in three phases over all sharded tensors of all groups: local max|g| and non-finite
flags; one ``all_reduce(MAX)`` per process group for all of them; AdaClip and the local Σ(g̃/s)² (s depends on the
global max|g| and T̂); one ``all_reduce(SUM)`` per process group; then AdaGN, MoRet and Adam. Two collectives per
step, whatever the number of tensors (the statistics cannot take fewer rounds: ‖g̃‖ depends on the clip threshold,
which depends on the global max|g|). Whether a tensor is quantized follows its global size; 8/4-bit moments are
quantized blockwise within each rank's shard, blocks starting at the shard's first element, so when a shard boundary
is not a multiple of the block (256 at 8 bits, 128 at 4) the blocks differ from a single-process run's and the
results differ from it by quantization (which elements share an absmax), not otherwise; with block-aligned
boundaries they agree to rounding. The fused Triton step serves CUDA shards (a rank with an empty shard runs the
kernels on zero elements, so all ranks compute the statistics with the same code); on the CPU the torch path runs.
:meth:`StableSPAM.state_dict` returns the sharded state as DTensors (moments sharded like the parameter, 8/4-bit
buffers one zero-padded row per shard), so ``torch.distributed.checkpoint`` and ``get/set_optimizer_state_dict``
(sharded or full) save and restore every rank's shard: with plain local tensors DCP would take them for replicated
ones and keep one rank's. 32/16-bit moments can be resharded on load; 8/4-bit ones need the same sharding.

The step has no host synchronisation: the per-tensor max|g|, ‖g̃‖ and the AdaClip/AdaGN statistics stay 0-dim
tensors on the parameter's device, and every choice that depends on a tensor value (clip an entry or not, zero norm
or not, finite or not) is a ``torch.where``. Tensors are processed one after another through one scratch buffer the
size of the largest tensor, so a step allocates no per-tensor temporaries (on CPU it runs at about the speed of
torch's foreach AdamW; see ``benchmarks/optimizer_step.py``). On CUDA, tensors go through the fused Triton step of
:mod:`hf_gns_spam.kernels.stable_spam_step` instead: three launches for all the tensors of a parameter group that
share a format (each launch reads a table of the tensors' addresses, as torch's fused optimizers do), so the host's
cost does not grow with the number of tensors; 8/4-bit moments are dequantized, updated and requantized inside the
update kernel; float64 and non-contiguous tensors stay on the torch path.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import struct
import types
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from hf_gns_spam.kernels.step_contract import (
    ABSMAX,
    EXP_AVG,
    EXP_AVG_SQ,
    INDICES,
    MOMENTS,
    QUANTIZED_BITS,
    QUANTIZED_KEYS,
    StepHyperparameters,
)
from hf_gns_spam.optim.hyperparameters import HYPERPARAMETERS, check_hyperparameter
from hf_gns_spam.optim.quantized_state import MIN_QUANTIZED_NUMEL, dequantize, moment_format, quantize

Mode = Literal["clean", "faithful"]
StateBits = Literal[32, 16, 8, 4]

__all__ = ["StableSPAM", "momentum_decay_factor"]

# Per-tensor statistics kept as 0-dim tensors in each parameter's state.
_CLIP_MAX_EMA = "clip_max_ema"  # T, AdaClip's EMA of max|g|
_NORM_EMA = "norm_ema"  # μ, AdaGN's EMA of ‖g̃‖
_NORM_SQ_EMA = "norm_sq_ema"  # ν, AdaGN's EMA of ‖g̃‖²
_STAT_KEYS = (_CLIP_MAX_EMA, _NORM_EMA, _NORM_SQ_EMA)
_NONFINITE = "nonfinite_grad_steps"  # int64: steps in which the gradient had a NaN or ±inf entry
#: ‖g̃‖ is computed as s·‖g̃/s‖, s = 2^(E − clamp(E, −_SCALE_RANGE, _SCALE_RANGE)) (see the module docstring).
_SCALE_RANGE = 40
# optim names of the Trainer integration, for the messages of load_state_dict
_TRAINER_NAMES = {32: "optim='stable_spam'", 8: "optim='stable_spam_8bit'", 4: "optim='stable_spam_4bit'"}


def momentum_decay_factor(step: int, total_steps: int | None, eta_min: float, mode: Mode) -> float:
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


def _stat_dtype(device: torch.device) -> torch.dtype:
    """dtype of the per-tensor statistics: float64 (any finite float32 gradient's n² fits), float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def _constant(value: float, compute_dtype: torch.dtype) -> float:
    """A hyperparameter constant of the statistics' updates: rounded to float32 for float32-compute tensors (what the
    Triton kernel receives), exact for float64 ones."""
    if compute_dtype == torch.float64:
        return value
    return struct.unpack("f", struct.pack("f", value))[0]


@functools.cache
def _dtensor_type() -> type | None:
    """torch's DTensor class, or None when torch.distributed is unavailable."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(tensor: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor (a view that aliases it), or the tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _shard_group(param: torch.Tensor) -> Any:
    """The process group over which a DTensor parameter's shards are spread (None when it is replicated), after
    checking that the placements are ones whose per-tensor statistics this optimizer can reduce."""
    placements = tuple(param.placements)
    if any(not (p.is_shard() or p.is_replicate()) for p in placements):
        raise RuntimeError(f"StableSPAM: DTensor parameter with placements {placements}; supported: Shard, Replicate.")
    grad_placements = tuple(param.grad.placements) if _is_dtensor(param.grad) else None
    if grad_placements != placements:
        raise RuntimeError(
            f"StableSPAM: the gradient of a DTensor parameter with placements {placements} has placements "
            f"{grad_placements}; it must be sharded like the parameter (as FSDP2 leaves it after backward)."
        )
    shard_dims = [dim for dim, p in enumerate(placements) if p.is_shard()]
    if len(shard_dims) > 1:
        raise RuntimeError(
            f"StableSPAM: DTensor parameter sharded over {len(shard_dims)} mesh dimensions {placements}; "
            "at most one is supported (FSDP2, or HSDP with (Replicate, Shard))."
        )
    return param.device_mesh.get_group(shard_dims[0]) if shard_dims else None


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

    The statistics are per parameter tensor. FSDP2 (DTensor) parameters are supported with statistics over the whole
    tensor (module docstring). Under DeepSpeed ZeRO or FSDP1 flat parameters the optimizer sees flattened shards, so
    "per tensor" silently becomes "per shard"; use DDP or FSDP2.

    Non-finite gradient entries are treated as zero and counted in ``state[p]["nonfinite_grad_steps"]``; the
    optimizer warns once when it finds a non-zero counter, looking every :attr:`nonfinite_check_interval` steps.
    """

    #: Steps between two looks at the non-finite counters (each look reads them on the host; see the module docstring).
    nonfinite_check_interval: int = 100

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
        mode: Mode = "clean",
        state_bits: StateBits = 32,
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
        self._nonfinite_warned = False
        self._steps_since_check = 0
        self._pending_checks: list[tuple[Any, torch.Tensor, list[tuple[int, int]]]] = []

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also called by ``load_state_dict`` and on unpickling (torch pickles only defaults, state and groups)."""
        super().__setstate__(state)
        self.__dict__.setdefault("_nonfinite_warned", False)
        self.__dict__.setdefault("_steps_since_check", 0)
        self.__dict__.setdefault("_pending_checks", [])

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
        """Bytes held by the optimizer state's tensors (moments, quantization scales, per-tensor statistics and
        counters); for sharded parameters, this rank's."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if torch.is_tensor(v))

    # ----------------------------------------------------------------------------------------------------------------
    # state dict
    # ----------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with the state of DTensor (FSDP2) parameters as DTensors, so that
        ``torch.distributed.checkpoint`` (and ``get_optimizer_state_dict``) save each rank's shard: the moments
        sharded like the parameter; 8/4-bit buffers as a ``[shards, length]`` tensor, one zero-padded row per shard
        (``Shard(0)`` over the sharding mesh dimension; such a state loads only with the same sharding); the 0-dim
        statistics plain (replicated: every rank holds the same values)."""
        state_dict = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in enumerate(params):
            if _is_dtensor(param) and index in state_dict["state"]:
                state_dict["state"][index] = _state_as_dtensors(param, state_dict["state"][index])
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping the saved dtype of every moment tensor (module docstring: what is checked).

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the parameter's dtype, which would
        turn float32 moments of a bfloat16 parameter into bfloat16 (and lose the bit-identical resume).

        Raises:
            ValueError: a hyperparameter of the checkpoint is out of range, its ``state_bits`` differs from this
                optimizer's, or a tensor's state does not fit its parameter; nothing is loaded then.
        """
        saved_groups = state_dict["param_groups"]
        matching = len(saved_groups) == len(self.param_groups) and all(
            len(saved["params"]) == len(group["params"])
            for saved, group in zip(saved_groups, self.param_groups, strict=True)
        )
        changes: list[str] = []
        if matching:  # otherwise torch's own check below raises its error
            changes = self._check_loaded_groups(saved_groups)
            self._check_loaded_states(state_dict)
        constructed = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, own in zip(self.param_groups, constructed, strict=True):
            for name in HYPERPARAMETERS:
                group[name] = check_hyperparameter(name, group[name]) if name in group else own[name]
            group.setdefault("step", own.get("step", 0))
        saved_ids = [pid for group in saved_groups for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved_state = state_dict["state"].get(saved_id)
            if not saved_state:
                continue
            device = _local(param).device
            state = self.state[param]
            for key, value in saved_state.items():
                if torch.is_tensor(value):
                    state[key] = _loaded_local(key, value, param, saved_state).detach().to(device=device, copy=True)
            for key in _STAT_KEYS:  # float32 statistics of earlier versions
                if key in state:
                    state[key] = state[key].to(_stat_dtype(device))
            if _CLIP_MAX_EMA in state and _NONFINITE not in state:
                state[_NONFINITE] = torch.zeros((), dtype=torch.int64, device=device)
        if changes:
            warnings.warn(
                "StableSPAM.load_state_dict: the checkpoint's hyperparameters differ from this optimizer's; the "
                "checkpoint's values are used (as torch.optim does), so changed optimizer arguments (optim_args) do "
                "not take effect on resume: "
                + "; ".join(changes)
                + ". To use other values, set them in optimizer.param_groups after loading, or start a fresh "
                "optimizer state.",
                UserWarning,
                stacklevel=2,
            )

    def _check_loaded_groups(self, saved_groups: list[dict[str, Any]]) -> list[str]:
        """Validate the checkpoint's group hyperparameters (ValueError); return the differences to report."""
        changes = []
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            for name in HYPERPARAMETERS:
                if name not in saved:
                    continue
                try:
                    check_hyperparameter(name, saved[name])
                except ValueError as error:
                    reason = str(error).removeprefix("StableSPAM: ")
                    raise ValueError(
                        f"StableSPAM.load_state_dict: parameter group {index} of the checkpoint has {reason} "
                        "Nothing was loaded."
                    ) from None
            step = saved.get("step", 0)
            if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
                raise ValueError(
                    f"StableSPAM.load_state_dict: parameter group {index} of the checkpoint has step={step!r}; "
                    "it must be an integer >= 0. Nothing was loaded."
                )
            saved_bits, bits = saved.get("state_bits", group["state_bits"]), group["state_bits"]
            if saved_bits != bits:
                raise ValueError(
                    f"StableSPAM.load_state_dict: the checkpoint's moments have state_bits={saved_bits} (parameter "
                    f"group {index}) but this optimizer was built with state_bits={bits}; moments are not converted "
                    f"between widths. To resume this checkpoint build the optimizer with state_bits={saved_bits} "
                    f"(Trainer: {_trainer_spelling(saved_bits)}); to change the width, start a fresh optimizer "
                    "state (load the model weights only)."
                )
            for name in HYPERPARAMETERS:
                if name in ("lr", "state_bits"):
                    continue
                own = group[name]
                if name not in saved:
                    changes.append(f"group {index}: {name} is not in the checkpoint, {own!r} (this optimizer) is used")
                    continue
                theirs = check_hyperparameter(name, saved[name])
                if theirs != own:
                    changes.append(f"group {index}: {name}={theirs!r} (checkpoint, used) instead of {own!r}")
        return changes

    def _check_loaded_states(self, state_dict: dict[str, Any]) -> None:
        """Refuse per-tensor states whose layout does not fit their parameter under the group's state_bits."""
        for index, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups, strict=True)):
            bits = group["state_bits"]
            for saved_id, param in zip(saved["params"], group["params"], strict=True):
                saved_state = state_dict["state"].get(saved_id)
                if not saved_state:
                    continue
                problem = _state_layout_problem(saved_state, param, bits)
                if problem is not None:
                    raise ValueError(
                        f"StableSPAM.load_state_dict: the state of parameter {saved_id} (group {index}, shape "
                        f"{tuple(param.shape)}) does not fit this optimizer with state_bits={bits}: {problem}. "
                        "Build the optimizer as the checkpoint's run did (same state_bits, same parameters, and for "
                        "sharded parameters the same sharding and world size), or start a fresh optimizer state."
                    )

    # ----------------------------------------------------------------------------------------------------------------
    # step
    # ----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sharded: list[tuple[dict[str, Any], torch.Tensor]] = []
        for group in self.param_groups:
            group["step"] += 1
            by_device_and_dtype: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("StableSPAM does not support sparse gradients.")
                if _is_dtensor(param):
                    sharded.append((group, param))
                else:
                    by_device_and_dtype[(param.device, param.dtype)].append(param)
            for params in by_device_and_dtype.values():
                self._step_tensors(group, params)
        if sharded:
            self._step_sharded(sharded)
        self._after_step()
        return loss

    def _init_state(
        self, param: torch.Tensor, group: dict[str, Any], local: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The parameter's state, created on its first step. ``local`` is the rank's shard of a DTensor parameter
        (the moments take its shape; whether they are quantized follows the global size)."""
        state = self.state[param]
        if _CLIP_MAX_EMA not in state:
            local = param if local is None else local
            compute_dtype = torch.promote_types(local.dtype, torch.float32)
            bits = group["state_bits"]
            if bits in (8, 4) and param.numel() >= MIN_QUANTIZED_NUMEL:
                zeros = torch.zeros(local.numel(), dtype=torch.float32, device=local.device)
                state[QUANTIZED_BITS] = bits
                for key, second_moment in MOMENTS:
                    state[key + INDICES], state[key + ABSMAX] = quantize(zeros, moment_format(bits, second_moment))
            else:  # bits 8/4 keep small tensors in 32 bits, as bitsandbytes does
                moment_dtype = torch.bfloat16 if bits == 16 else compute_dtype
                for key in (EXP_AVG, EXP_AVG_SQ):
                    state[key] = torch.zeros_like(local, dtype=moment_dtype, memory_format=torch.preserve_format)
            for key in _STAT_KEYS:
                state[key] = torch.zeros((), dtype=_stat_dtype(local.device), device=local.device)
            state[_NONFINITE] = torch.zeros((), dtype=torch.int64, device=local.device)
            if group["mode"] == "faithful":
                state["step"] = 0  # the official per-tensor counter k
        return state

    @staticmethod
    def _step_hyperparameters(group: dict[str, Any]) -> tuple[StepHyperparameters, int]:
        """The group's hyperparameters at its current step, and clean mode's Adam step."""
        t = group["step"]
        s = momentum_decay_factor(t, group["total_steps"], group["eta_min"], group["mode"])
        reset_interval = group["reset_interval"]
        hyper = StepHyperparameters(
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            beta1=group["betas"][0] * s,
            beta2=group["betas"][1],
            gamma1=(group["betas"][0] if group["gamma1"] == -1 else group["gamma1"]) * s,
            gamma2=group["gamma2"],
            gamma3=group["gamma3"],
            eps=group["eps"],
            faithful=group["mode"] == "faithful",
            is_reset_step=reset_interval > 0 and t % reset_interval == 0,
        )
        # clean mode: bias corrections of AdaClip/AdaGN on the global step, Adam's step restarts at each reset
        clean_adam_step = t if (reset_interval == 0 or t < reset_interval) else t % reset_interval + 1
        return hyper, clean_adam_step

    @staticmethod
    def _tensor_steps(
        state: dict[str, Any], group: dict[str, Any], hyper: StepHyperparameters, clean_adam_step: int
    ) -> tuple[int, int]:
        """(k of the AdaClip/AdaGN bias corrections, Adam's step) for one tensor; advances faithful mode's k."""
        if hyper.faithful:  # the official per-tensor counter k, set back to 1 at a reset
            stat_step = state["step"] + 1
            state["step"] = 1 if hyper.is_reset_step else stat_step
            return stat_step, state["step"]
        return group["step"], clean_adam_step

    def _step_tensors(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One step for parameters that share a device and a dtype.

        Tensors the fused Triton step supports are updated together, in three launches per set of tensors with the
        same step counters and formats (``triton_update_tensors``). The others go through the torch path one after
        another: a single scratch buffer, as large as the largest tensor, holds |g|, then the clipped gradient g̃,
        then ĝ, then Adam's denominator, so the step allocates no per-tensor temporaries.
        """
        hyper, clean_adam_step = self._step_hyperparameters(group)
        compute_dtype = torch.promote_types(params[0].dtype, torch.float32)
        triton_step = _triton_step() if _use_triton(params[0]) else None
        fused: dict[tuple[int, int], tuple[list[torch.Tensor], list[dict[str, Any]]]] = defaultdict(lambda: ([], []))
        scratch = spikes = one = None  # the torch path's buffers, allocated when a tensor first needs them
        for param in params:
            state = self._init_state(param, group)
            stat_step, adam_step = self._tensor_steps(state, group, hyper, clean_adam_step)
            if triton_step is not None and triton_step.triton_update_supported(param, state):
                fused_params, fused_states = fused[stat_step, adam_step]
                fused_params.append(param)
                fused_states.append(state)
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
        for (stat_step, adam_step), (fused_params, fused_states) in fused.items():
            triton_step.triton_update_tensors(fused_params, fused_states, hyper, stat_step, adam_step, check=False)

    def _step_sharded(self, entries: list[tuple[dict[str, Any], torch.Tensor]]) -> None:
        """One step for DTensor parameters: statistics over whole tensors with two all-reduces per process group
        (module docstring); the moments and the update work on the local shards."""
        step_hyper = {id(group): self._step_hyperparameters(group) for group, _ in entries}
        items = []
        for group, param in entries:
            process_group = _shard_group(param)  # checks the placements of the parameter and its gradient first
            local, grad = param.to_local(), param.grad.to_local()
            grad = grad if grad.is_contiguous() else grad.contiguous()
            state = self._init_state(param, group, local)
            hyper, clean_adam_step = step_hyper[id(group)]
            stat_step, adam_step = self._tensor_steps(state, group, hyper, clean_adam_step)
            triton_step = _triton_step() if _use_triton(local) else None
            use_triton = triton_step is not None and triton_step.triton_update_supported(local, state, grad)
            items.append(_Shard(local, grad, state, hyper, stat_step, adam_step, process_group, use_triton))
        _ShardedStep(items).run()

    # ----------------------------------------------------------------------------------------------------------------
    # non-finite gradients: lazy warning
    # ----------------------------------------------------------------------------------------------------------------

    def _after_step(self) -> None:
        if self._nonfinite_warned:
            return
        self._steps_since_check += 1
        if self._steps_since_check >= self.nonfinite_check_interval:
            self._steps_since_check = 0
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        """Warn if a non-finite counter is non-zero: counters of CPU tensors are read now; for CUDA a non-blocking
        copy started at an earlier check is read once it has arrived, and a new one is started (no synchronisation);
        other devices are read now (a host read every ``nonfinite_check_interval`` steps)."""
        pending = []
        for event, host, positions in self._pending_checks:
            if event.query():
                self._warn_if_nonfinite(host.tolist(), positions)
                if self._nonfinite_warned:
                    return
            else:
                pending.append((event, host, positions))
        self._pending_checks = pending
        by_device: dict[torch.device, tuple[list[tuple[int, int]], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
        for group_index, group in enumerate(self.param_groups):
            for index, param in enumerate(group["params"]):
                counter = self.state.get(param, {}).get(_NONFINITE)
                if counter is not None:
                    positions, counters = by_device[counter.device]
                    positions.append((group_index, index))
                    counters.append(counter)
        for device, (positions, counters) in by_device.items():
            values = torch.stack(counters)
            if device.type == "cuda":
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                with torch.cuda.device(device):
                    host.copy_(values, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                self._pending_checks.append((event, host, positions))
            else:
                self._warn_if_nonfinite(values.tolist(), positions)
                if self._nonfinite_warned:
                    return

    def _warn_if_nonfinite(self, counts: list[int], positions: list[tuple[int, int]]) -> None:
        hit = [(position, count) for position, count in zip(positions, counts, strict=True) if count > 0]
        if not hit:
            return
        listed = ", ".join(f"group {g} parameter {i}: {count}" for (g, i), count in hit[:8])
        more = f" and {len(hit) - 8} more" if len(hit) > 8 else ""
        warnings.warn(
            f"StableSPAM: gradients with non-finite entries (NaN or ±inf) in {len(hit)} parameter tensor(s) (steps "
            f"with such entries per tensor: {listed}{more}). The entries were treated as zero: they did not enter "
            "AdaClip, AdaGN or the Adam moments, and training goes on. Counts are in "
            f"optimizer.state[p][{_NONFINITE!r}]; this warning is given once per optimizer (counters are looked at "
            f"every {self.nonfinite_check_interval} steps).",
            RuntimeWarning,
            stacklevel=4,
        )
        self._nonfinite_warned = True
        self._pending_checks = []


def _trainer_spelling(bits: int) -> str:
    if bits in _TRAINER_NAMES:
        return _TRAINER_NAMES[bits] if bits != 32 else "optim='stable_spam' without state_bits in optim_args"
    return f"optim='stable_spam', optim_args='state_bits={bits}'"


def _state_layout_problem(saved_state: dict[str, Any], param: torch.Tensor, bits: int) -> str | None:
    """Why a checkpoint's per-tensor state does not fit ``param`` under ``state_bits=bits`` (None if it does)."""
    local = _local(param)
    numel = local.numel()
    quantized = bits in (8, 4) and param.numel() >= MIN_QUANTIZED_NUMEL
    if QUANTIZED_BITS in saved_state:
        saved_bits = saved_state[QUANTIZED_BITS]
        if not quantized or saved_bits != bits:
            return f"it holds {saved_bits}-bit quantized moments"
        for key, second_moment in MOMENTS:
            blocks = -(-numel // moment_format(bits, second_moment).blocksize)
            for suffix, size in ((INDICES, numel if bits == 8 else (numel + 1) // 2), (ABSMAX, blocks)):
                value = saved_state.get(key + suffix)
                if torch.is_tensor(value):
                    value = _loaded_local(key + suffix, value, param, saved_state)
                if value is None or not torch.is_tensor(value) or value.numel() != size:
                    return f"{key + suffix} is missing or has another size than this parameter's (shard's) {size}"
        return None
    if not any(key in saved_state for key in (EXP_AVG, EXP_AVG_SQ)):
        return None  # no moments saved (nothing to check against)
    if quantized:
        return f"it holds unquantized moments, this optimizer keeps this tensor in {bits} bits"
    for key in (EXP_AVG, EXP_AVG_SQ):
        value = saved_state.get(key)
        if not torch.is_tensor(value) or _local(value).shape != local.shape:
            shape = None if not torch.is_tensor(value) else tuple(_local(value).shape)
            return f"{key} has shape {shape}, the parameter (shard) {tuple(local.shape)}"
        expected = "bfloat16" if bits == 16 else "float32/float64"
        if (value.dtype == torch.bfloat16) != (bits == 16) or not value.is_floating_point():
            return f"{key} is {value.dtype}, this optimizer stores {expected} moments"
    return None


def _quantized_length(key: str, bits: int, numel: int) -> int:
    """Elements of the 8/4-bit buffer ``key`` (``exp_avg_q``, ``exp_avg_sq_absmax``, …) of ``numel`` elements."""
    if key.endswith(INDICES):
        return numel if bits == 8 else (numel + 1) // 2
    return -(-numel // moment_format(bits, key.startswith(EXP_AVG_SQ)).blocksize)


def _shard_dims(param: torch.Tensor) -> tuple[int, int] | None:
    """(mesh dimension, tensor dimension) along which a DTensor is sharded, or None when it is replicated."""
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            return mesh_dim, placement.dim
    return None


def _state_as_dtensors(param: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a DTensor parameter's state dict entry with its sharded tensors as DTensors (see state_dict)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    dims = _shard_dims(param)
    if dims is None or param.numel() == 0:
        return state
    mesh_dim, tensor_dim = dims
    mesh = param.device_mesh
    out = dict(state)
    for key in (EXP_AVG, EXP_AVG_SQ):
        if key in state:
            out[key] = DTensor.from_local(
                state[key], mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
    if QUANTIZED_BITS in state:
        shards = mesh.size(mesh_dim)
        rows = param.shape[tensor_dim]
        largest_shard = -(-rows // shards) * (param.numel() // rows)  # torch.chunk's first (largest) piece
        placements = [Shard(0) if dim == mesh_dim else Replicate() for dim in range(mesh.ndim)]
        for key in QUANTIZED_KEYS:
            local = state[key]
            length = _quantized_length(key, state[QUANTIZED_BITS], largest_shard)
            row = local.new_zeros(1, length)
            row[0, : local.numel()] = local
            out[key] = DTensor.from_local(
                row, mesh, placements, run_check=False, shape=torch.Size([shards, length]), stride=(length, 1)
            )
    return out


def _loaded_local(key: str, value: torch.Tensor, param: torch.Tensor, saved_state: dict[str, Any]) -> Any:
    """The rank's plain tensor of a loaded state value: a DTensor's local shard, for a row-per-shard 8/4-bit buffer
    its row without the padding (None when the row cannot hold this shard's buffer)."""
    if not _is_dtensor(value):
        return value
    local = value.to_local()
    if key in QUANTIZED_KEYS and QUANTIZED_BITS in saved_state and value.dim() == 2:
        length = _quantized_length(key, saved_state[QUANTIZED_BITS], _local(param).numel())
        if local.shape[0] != 1 or local.shape[1] < length:
            return None
        return local[0, :length]
    return local


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
class _Clip:
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


def _finite_abs(grad: torch.Tensor, work: torch.Tensor) -> None:
    """``work = |g|`` with the non-finite entries of g as 0."""
    torch.abs(grad, out=work)
    work.nan_to_num_(nan=0.0, posinf=0.0)


def _masked_abs_max(grad: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``work = |g|`` with the non-finite entries as 0; returns (max |g| over all entries, NaN/inf when one is not
    finite; max |g| over the finite ones), both 0-dim (0 for an empty tensor)."""
    torch.abs(grad, out=work)
    if work.numel() == 0:
        zero = work.new_zeros(())
        return zero, zero
    raw_max = work.amax()
    work.nan_to_num_(nan=0.0, posinf=0.0)
    return raw_max, work.amax()


def _adaclip(
    state: dict[str, Any],
    hp: StepHyperparameters,
    stat_step: int,
    grad_max: torch.Tensor,
    nonfinite: torch.Tensor,
    one: torch.Tensor,
) -> _Clip:
    """Count a non-finite gradient, update AdaClip's EMA T with max|g| (of the finite entries) and return the clip
    factors (the scale s for float32 compute only; float64 tensors are not scaled)."""
    state[_NONFINITE].add_(nonfinite)
    compute_dtype = one.dtype
    clip_max_ema = state[_CLIP_MAX_EMA]
    clip_max_ema.lerp_(grad_max.to(clip_max_ema.dtype), _constant(1.0 - hp.gamma3, compute_dtype))
    threshold = clip_max_ema / _constant(_bias_correction(hp.gamma3, stat_step), compute_dtype)
    # threshold/max|g| is inf or nan only when max|g| = 0, and then no entry exceeds the threshold
    ratio = (threshold / grad_max.to(threshold.dtype)).to(compute_dtype)
    threshold = threshold.to(compute_dtype)
    if compute_dtype != torch.float32:
        return _Clip(threshold, ratio, one, one.to(clip_max_ema.dtype))
    inv_scale, scale = _power_of_two_scale(torch.minimum(grad_max, threshold))
    return _Clip(threshold, ratio * inv_scale, inv_scale, scale.to(clip_max_ema.dtype))


def _clip_into(grad: torch.Tensor, work: torch.Tensor, spikes: torch.Tensor, clip: _Clip) -> None:
    """``work = g̃/s`` from ``work = |g|`` (non-finite entries 0, as :func:`_finite_abs` leaves it): entries above
    T̂ times (T̂/max|g|)/s, the others times 1/s, non-finite ones 0."""
    torch.gt(work, clip.threshold, out=spikes)
    torch.where(spikes, clip.spike_factor, clip.inv_scale, out=work)
    work.mul_(grad)
    work.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _update_tensor(
    param: torch.Tensor,
    state: dict[str, Any],
    work: torch.Tensor,
    spikes: torch.Tensor,
    hp: StepHyperparameters,
    stat_step: int,
    adam_step: int,
    one: torch.Tensor,
) -> None:
    """Weight decay, AdaClip, AdaGN, MoRet and Adam for one tensor (formulas in the module docstring).

    ``work`` and ``spikes`` are scratch buffers of the parameter's shape; ``one`` is a 0-dim 1.0 in the compute
    dtype. Every value-dependent choice is a ``torch.where`` on 0-dim tensors, so nothing is read back to the host.
    """
    grad = param.grad.to(work.dtype)  # a copy only when the dtype differs; never written
    raw_max, grad_max = _masked_abs_max(grad, work)
    clip = _adaclip(state, hp, stat_step, grad_max, ~torch.isfinite(raw_max), one)
    _clip_into(grad, work, spikes, clip)
    _adagn_adam(param, state, work, hp, stat_step, adam_step, one, torch.linalg.vector_norm(work), clip.scale)


def _adagn_adam(
    param: torch.Tensor,
    state: dict[str, Any],
    work: torch.Tensor,
    hp: StepHyperparameters,
    stat_step: int,
    adam_step: int,
    one: torch.Tensor,
    scaled_norm: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    """Weight decay, AdaGN, MoRet and Adam, from ``work = g̃/s`` and ``scaled_norm = ‖g̃‖/s`` (compute dtype)."""
    if hp.weight_decay != 0:
        param.mul_(1.0 - hp.lr * hp.weight_decay)
    compute_dtype = work.dtype

    # AdaGN: μ ← γ1·μ + (1−γ1)·n,  ν ← γ2·ν + (1−γ2)·n²,  ĝ = g̃/n · μ̂/(√ν̂ + ε) = (g̃/s) · c/(n/s).
    norm_ema, norm_sq_ema = state[_NORM_EMA], state[_NORM_SQ_EMA]
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
    norm_sq_ema_hat_sqrt = (norm_sq_ema / _constant(_bias_correction(hp.gamma2, stat_step), compute_dtype)).sqrt_()
    adagn_scale = (norm_ema / _constant(_bias_correction(hp.gamma1, stat_step), compute_dtype)).div_(
        norm_sq_ema_hat_sqrt.add_(_constant(hp.eps, compute_dtype))
    )
    factor = torch.where(has_norm, adagn_scale.div_(torch.where(has_norm, scaled_norm_stat, 1.0)), 1.0)
    work.mul_(factor.to(compute_dtype))  # ĝ

    # MoRet + Adam:  m ← β1·m + (1−β1)·ĝ,  v ← β2·v + (1−β2)·ĝ²,  W ← W − lr/bc1 · m/(√v/√bc2 + ε)
    # computed as W ← W − (lr·√bc2/bc1) · m/(√v + ε·√bc2).
    m, v = _load_moments(state, param, compute_dtype)
    if hp.is_reset_step and not hp.faithful:
        m.zero_()
        v.zero_()
    sqrt_bc2 = math.sqrt(_bias_correction(hp.beta2, adam_step))
    if hp.faithful:
        m.lerp_(work, 1.0 - hp.beta1)
        v.mul_(hp.beta2)
        denominator_eps: float | torch.Tensor = hp.eps * sqrt_bc2
    else:  # a skipped tensor keeps m and v (ĝ is 0: EMA weight 0, decay 1) and gets an infinite denominator
        active = has_norm.to(compute_dtype)
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
    if EXP_AVG in state:
        return state[EXP_AVG].to(dtype), state[EXP_AVG_SQ].to(dtype)
    bits = state[QUANTIZED_BITS]
    moments = []
    for key, second_moment in MOMENTS:
        fmt = moment_format(bits, second_moment)
        values = dequantize(state[key + INDICES], state[key + ABSMAX], fmt, param.numel())
        moments.append(values.view(param.shape).to(dtype))
    return moments[0], moments[1]


def _store_moments(state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
    """Write back moments that :func:`_load_moments` returned as copies."""
    if EXP_AVG in state:
        if m is not state[EXP_AVG]:
            state[EXP_AVG].copy_(m)
            state[EXP_AVG_SQ].copy_(v)
        return
    bits = state[QUANTIZED_BITS]
    for key, values, second_moment in ((EXP_AVG, m, False), (EXP_AVG_SQ, v, True)):
        indices, absmax = quantize(values, moment_format(bits, second_moment))
        state[key + INDICES].copy_(indices)
        state[key + ABSMAX].copy_(absmax)


# --------------------------------------------------------------------------------------------------------------------
# Sharded (DTensor) parameters
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Shard:
    """One DTensor parameter in a sharded step: its local shard, gradient shard and state."""

    param: torch.Tensor  # the local shard (aliases the DTensor's data)
    grad: torch.Tensor
    state: dict[str, Any]
    hp: StepHyperparameters
    stat_step: int
    adam_step: int
    process_group: Any  # None: replicated, no reduction
    use_triton: bool


class _ShardedStep:
    """The three phases of a sharded step (module docstring), with one MAX and one SUM all-reduce per process group.

    Torch-path shards work through one scratch buffer per (device, compute dtype) and recompute |g| and g̃/s in
    each phase instead of keeping per-tensor temporaries; Triton-path shards keep their kernel partials in one
    float64 workspace row each, and the cross-rank values are written back into those rows between the kernels.
    """

    def __init__(self, items: list[_Shard]) -> None:
        self.items = items
        self.torch_items = [i for i, item in enumerate(items) if not item.use_triton]
        self.triton_items = [i for i, item in enumerate(items) if item.use_triton]
        sizes: dict[tuple[torch.device, torch.dtype], int] = defaultdict(int)
        for i in self.torch_items:
            param = self.items[i].param
            key = (param.device, torch.promote_types(param.dtype, torch.float32))
            sizes[key] = max(sizes[key], param.numel())
        self.scratch = {
            (device, dtype): (
                torch.empty(size, dtype=dtype, device=device),
                torch.empty(size, dtype=torch.bool, device=device),
                torch.ones((), dtype=dtype, device=device),
            )
            for (device, dtype), size in sizes.items()
        }
        self.kernels = _triton_step() if self.triton_items else None
        self.workspaces: dict[torch.device, tuple[torch.Tensor, int, dict[int, int]]] = {}
        rows: dict[torch.device, list[int]] = defaultdict(list)
        for i in self.triton_items:
            rows[self.items[i].param.device].append(i)
        for device, indices in rows.items():
            stride = max(self.kernels.num_programs(self.items[i].param.numel()) for i in indices)
            workspace = torch.zeros(
                len(indices), self.kernels.PARTIALS_OFFSET + 3 * stride, dtype=torch.float64, device=device
            )
            self.workspaces[device] = (workspace, stride, {i: row for row, i in enumerate(indices)})
        # one set of launches per device over all its Triton shards (use_triton: their checks passed)
        self.launches = [
            self.kernels.StepLaunches([self._step_tensor(i) for i in indices], self.workspaces[device][1], check=False)
            for device, indices in rows.items()
        ]

    def _step_tensor(self, i: int) -> Any:
        """The Triton shard ``i`` as the kernels' :class:`StepTensor`, with its workspace row."""
        item = self.items[i]
        row, _ = self._row(i)
        return self.kernels.StepTensor(item.param, item.grad, item.state, item.hp, item.stat_step, item.adam_step, row)

    def _buffers(self, item: _Shard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gradient in the compute dtype, work, spikes, one) for a torch-path shard."""
        scratch, spikes, one = self.scratch[(item.param.device, torch.promote_types(item.param.dtype, torch.float32))]
        n, shape = item.param.numel(), item.param.shape
        return item.grad.to(scratch.dtype), scratch[:n].view(shape), spikes[:n].view(shape), one

    def _row(self, i: int) -> tuple[torch.Tensor, int]:
        workspace, stride, rows = self.workspaces[self.items[i].param.device]
        return workspace[rows[i]], stride

    def _partials(self, device: torch.device, which: int) -> tuple[torch.Tensor, list[int]]:
        """The partial buffer ``which`` (0 pmax, 1 pbad, 2 pss) of every Triton row on ``device``, and the rows'
        item indices."""
        workspace, stride, rows = self.workspaces[device]
        start = self.kernels.PARTIALS_OFFSET + which * stride
        return workspace[:, start : start + stride], sorted(rows, key=rows.get)

    def _all_reduce(self, columns: list[dict[int, torch.Tensor]], op: Any) -> list[dict[int, torch.Tensor]]:
        """All-reduce per-item 0-dim float64 values (one or more per item, one dict per kind), with one collective
        per process group for all of them, items in parameter order (the same on every rank); the values of
        replicated items stay as they are."""
        by_group: dict[Any, list[int]] = defaultdict(list)
        for i, item in enumerate(self.items):
            if item.process_group is not None:
                by_group[item.process_group].append(i)
        result = [dict(column) for column in columns]
        for process_group, indices in by_group.items():
            vector = torch.stack([column[i] for column in columns for i in indices])
            torch.distributed.all_reduce(vector, op=op, group=process_group)
            for column, chunk in zip(result, vector.split(len(indices)), strict=True):
                column.update(zip(indices, chunk.unbind(), strict=True))
        return result

    def run(self) -> None:
        maxima, flags = self._all_reduce(list(self._local_maxima()), torch.distributed.ReduceOp.MAX)
        clips, sums = self._clip(maxima, flags)
        (totals,) = self._all_reduce([sums], torch.distributed.ReduceOp.SUM)
        self._update(clips, totals)

    def _local_maxima(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Phase 1: each shard's max |g| over its finite entries and whether it had a non-finite one (float64)."""
        maxima, flags = {}, {}
        for i in self.torch_items:
            item = self.items[i]
            grad, work, _, _ = self._buffers(item)
            raw_max, grad_max = _masked_abs_max(grad, work)
            maxima[i], flags[i] = grad_max.double(), (~torch.isfinite(raw_max)).double()
        for launches in self.launches:
            launches.max_abs()
        for device in self.workspaces:
            pmax, indices = self._partials(device, 0)
            pbad, _ = self._partials(device, 1)
            maxima.update(zip(indices, pmax.amax(1).unbind(), strict=True))
            flags.update(zip(indices, (pbad.sum(1) > 0).double().unbind(), strict=True))
        return maxima, flags

    def _clip(
        self, maxima: dict[int, torch.Tensor], flags: dict[int, torch.Tensor]
    ) -> tuple[dict[int, _Clip], dict[int, torch.Tensor]]:
        """Phase 2: AdaClip with the global max|g| and non-finite flag; each shard's Σ(g̃/s)² (float64)."""
        clips, sums = {}, {}
        for i in self.torch_items:
            item = self.items[i]
            grad, work, spikes, one = self._buffers(item)
            grad_max = maxima[i].to(one.dtype)
            clips[i] = _adaclip(item.state, item.hp, item.stat_step, grad_max, flags[i] > 0, one)
            _finite_abs(grad, work)
            _clip_into(grad, work, spikes, clips[i])
            flat = work.view(-1)
            sums[i] = torch.dot(flat, flat).double()
        for device in self.workspaces:
            pmax, indices = self._partials(device, 0)
            pbad, _ = self._partials(device, 1)
            pmax.copy_(torch.stack([maxima[i] for i in indices]).unsqueeze(1).expand_as(pmax))
            pbad.zero_()
            pbad[:, 0].copy_(torch.stack([flags[i] for i in indices]))
        for launches in self.launches:
            launches.clip()
        for device in self.workspaces:
            pss, indices = self._partials(device, 2)
            sums.update(zip(indices, pss.sum(1).unbind(), strict=True))
        return clips, sums

    def _update(self, clips: dict[int, _Clip], totals: dict[int, torch.Tensor]) -> None:
        """Phase 3: AdaGN with the global ‖g̃‖/s, MoRet, Adam and the update of each shard."""
        for i in self.torch_items:
            item = self.items[i]
            grad, work, spikes, one = self._buffers(item)
            _finite_abs(grad, work)
            _clip_into(grad, work, spikes, clips[i])
            scaled_norm = totals[i].sqrt().to(one.dtype)
            _adagn_adam(item.param, item.state, work, item.hp, item.stat_step, item.adam_step, one, scaled_norm,
                        clips[i].scale)  # fmt: skip
        for device in self.workspaces:
            pss, indices = self._partials(device, 2)
            pss.zero_()
            pss[:, 0].copy_(torch.stack([totals[i] for i in indices]))
        for launches in self.launches:
            launches.update()
