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
:attr:`StableSPAM.nonfinite_check_interval` (10) steps; on the CPU it is read then, on CUDA the check starts a
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
fit the parameter (its moment buffers' keys, dtypes and lengths differ from the format's: another width, or another
sharding); other hyperparameters that differ from this optimizer's
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

Where things are: this module holds the optimizer (hyperparameters, state initialisation, the step's dispatch, the
moments' load and store in the state's format, the non-finite warning); :mod:`hf_gns_spam.optim.torch_step` the
torch path's maths; :mod:`hf_gns_spam.optim.sharded_step` the sharded step and the DTensor form of the state;
:mod:`hf_gns_spam.optim.checkpoint` what ``load_state_dict`` checks; the state formats (``state_bits``) are the
table :data:`hf_gns_spam.kernels.step_contract.STATE_FORMATS`.
"""

from __future__ import annotations

import importlib.util
import math
import types
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Literal

import torch

from hf_gns_spam.kernels.step_contract import (
    ABSMAX,
    CLIP_MAX_EMA,
    DEFAULT_STATE_BITS,
    INDICES,
    MOMENTS,
    NONFINITE_GRAD_STEPS,
    QUANTIZED_BITS,
    STATE_FORMATS,
    STATISTICS,
    StateBits,
    StepHyperparameters,
)
from hf_gns_spam.optim.checkpoint import check_loaded_groups, check_loaded_states, restored_state
from hf_gns_spam.optim.hyperparameters import HYPERPARAMETERS, check_hyperparameter
from hf_gns_spam.optim.quantized_state import dequantize, quantize
from hf_gns_spam.optim.sharded_step import Shard, ShardedStep, is_dtensor, shard_group, state_as_dtensors
from hf_gns_spam.optim.torch_step import adaclip, adagn, adam_update, clip_into, masked_abs_max, stat_dtype

Mode = Literal["clean", "faithful"]

__all__ = ["StableSPAM", "momentum_decay_factor"]


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
        state_bits: storage of Adam's moments, a row of the state-format table
            :data:`~hf_gns_spam.kernels.step_contract.STATE_FORMATS`: 32 (float32; float64 for float64
            parameters), 16 (bfloat16), or 8 and 4 (blockwise-quantized in bitsandbytes' formats,
            :mod:`hf_gns_spam.optim.quantized_state`; tensors under 4096 elements stay float32). The update itself
            always runs in float32.

    Paper settings: 4-bit runs ``gamma1=0.7, gamma2=0.9, gamma3=0.999, reset_interval=1000``; BF16 runs
    ``gamma1=0.85, gamma2=0.99999, gamma3=0.999, reset_interval=1000``.

    The statistics are per parameter tensor. FSDP2 (DTensor) parameters are supported with statistics over the whole
    tensor (module docstring). Under DeepSpeed ZeRO or FSDP1 flat parameters the optimizer sees flattened shards, so
    "per tensor" silently becomes "per shard"; use DDP or FSDP2.

    Non-finite gradient entries are treated as zero and counted in ``state[p]["nonfinite_grad_steps"]``; the
    optimizer warns once when it finds a non-zero counter, looking every :attr:`nonfinite_check_interval` steps.
    """

    #: Steps between two looks at the non-finite counters (each look reads them on the host; see the module docstring).
    nonfinite_check_interval: int = 10  # a 20-step NaN storm in a short run is said within 10 steps

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
        state_bits: StateBits = DEFAULT_STATE_BITS,
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
        self._nonfinite_totals: dict[torch.device, torch.Tensor] = {}  # Σ of the counters after the latest step
        self._nonfinite_steps: dict[torch.device, torch.Tensor] = {}  # steps with a non-finite entry, per device

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also called by ``load_state_dict`` and on unpickling (torch pickles only defaults, state and groups)."""
        super().__setstate__(state)
        self.__dict__.setdefault("_nonfinite_warned", False)
        self.__dict__.setdefault("_steps_since_check", 0)
        self.__dict__.setdefault("_pending_checks", [])
        self.__dict__.setdefault("_nonfinite_totals", {})
        self.__dict__.setdefault("_nonfinite_steps", {})

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
        counters); for sharded parameters, this rank's. Per tensor of n elements: the moment buffers of its format
        (``STATE_FORMATS[state_bits].for_numel(n).moment_buffers``, about n·``bytes_per_parameter``), plus 3·8 bytes
        of statistics and 8 of the non-finite counter."""
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
            if is_dtensor(param) and index in state_dict["state"]:
                state_dict["state"][index] = state_as_dtensors(param, state_dict["state"][index])
        state_dict[NONFINITE_GRAD_STEPS] = self.nonfinite_grad_steps
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping the saved dtype of every moment tensor (what is checked: module docstring and
        :mod:`hf_gns_spam.optim.checkpoint`).

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
            changes = check_loaded_groups(saved_groups, self.param_groups)
            check_loaded_states(state_dict, self.param_groups)
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
            if saved_state:
                self.state[param].update(restored_state(saved_state, param))
        # the next step counts from the loaded counters
        self._nonfinite_totals = {device: counters.sum() for device, (_, counters) in self._stacked_counters().items()}
        saved_steps = state_dict.get(NONFINITE_GRAD_STEPS, 0)  # state dicts from before it lack it
        self._nonfinite_steps = {
            device: torch.full((), int(saved_steps), dtype=torch.int64, device=device)
            for device in self._nonfinite_totals
        }
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
                if is_dtensor(param):
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
        """The parameter's state, created on its first step in the format ``STATE_FORMATS[state_bits]`` gives a
        tensor of its size. ``local`` is the rank's shard of a DTensor parameter (the moments take its shape; the
        format follows the global size)."""
        state = self.state[param]
        if CLIP_MAX_EMA not in state:
            local = param if local is None else local
            fmt = STATE_FORMATS[group["state_bits"]].for_numel(param.numel())
            if fmt.moment_formats is not None:  # zero moments, quantized as every later store quantizes them
                zeros = torch.zeros(local.numel(), dtype=torch.float32, device=local.device)
                state[QUANTIZED_BITS] = fmt.bits
                for (key, _), code in zip(MOMENTS, fmt.moment_formats, strict=True):
                    state[key + INDICES], state[key + ABSMAX] = quantize(zeros, code)
            else:
                moment_dtype = fmt.moment_dtype(torch.promote_types(local.dtype, torch.float32))
                for key, _ in MOMENTS:
                    state[key] = torch.zeros_like(local, dtype=moment_dtype, memory_format=torch.preserve_format)
            for key in STATISTICS:
                state[key] = torch.zeros((), dtype=stat_dtype(local.device), device=local.device)
            state[NONFINITE_GRAD_STEPS] = torch.zeros((), dtype=torch.int64, device=local.device)
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
            process_group = shard_group(param)  # checks the placements of the parameter and its gradient first
            local, grad = param.to_local(), param.grad.to_local()
            grad = grad if grad.is_contiguous() else grad.contiguous()
            state = self._init_state(param, group, local)
            hyper, clean_adam_step = step_hyper[id(group)]
            stat_step, adam_step = self._tensor_steps(state, group, hyper, clean_adam_step)
            triton_step = _triton_step() if _use_triton(local) else None
            use_triton = triton_step is not None and triton_step.triton_update_supported(local, state, grad)
            items.append(Shard(local, grad, state, hyper, stat_step, adam_step, process_group, use_triton))
        kernels = _triton_step() if any(item.use_triton for item in items) else None
        ShardedStep(items, kernels, _adagn_adam).run()

    # ----------------------------------------------------------------------------------------------------------------
    # non-finite gradients: lazy warning
    # ----------------------------------------------------------------------------------------------------------------

    @property
    def nonfinite_grad_steps(self) -> int:
        """Optimizer steps in which some gradient entry was NaN or ±inf (the most on any one device), since the
        optimizer was made (or the state dict it loaded was): counted on the device every step, read here (a host
        read). Saved in the state dict."""
        return max((int(steps) for steps in self._nonfinite_steps.values()), default=0)

    def _stacked_counters(self) -> dict[torch.device, tuple[list[tuple[int, int]], torch.Tensor]]:
        """The per-tensor non-finite counters, per device: each one's (group, index) and the counters stacked (a
        device tensor; no host read)."""
        by_device: dict[torch.device, tuple[list[tuple[int, int]], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
        for group_index, group in enumerate(self.param_groups):
            for index, param in enumerate(group["params"]):
                counter = self.state.get(param, {}).get(NONFINITE_GRAD_STEPS)
                if counter is not None:
                    positions, counters = by_device[counter.device]
                    positions.append((group_index, index))
                    counters.append(counter)
        return {device: (positions, torch.stack(counters)) for device, (positions, counters) in by_device.items()}

    def _count_nonfinite_step(self, stacked: dict[torch.device, tuple[list[tuple[int, int]], torch.Tensor]]) -> None:
        """A step whose counters' sum grew on a device had a non-finite entry there (each counter grows by at most 1
        a step): counted on the device, without a host read."""
        totals = {device: counters.sum() for device, (_, counters) in stacked.items()}
        for device, total in totals.items():
            previous = self._nonfinite_totals.get(device)
            grew = (total > previous) if previous is not None else (total > 0)
            steps = self._nonfinite_steps.get(device)
            self._nonfinite_steps[device] = grew.long() if steps is None else steps + grew
        self._nonfinite_totals = totals

    def _after_step(self) -> None:
        stacked = self._stacked_counters()
        self._count_nonfinite_step(stacked)
        if self._nonfinite_warned:
            return
        self._steps_since_check += 1
        if self._steps_since_check >= self.nonfinite_check_interval:
            self._steps_since_check = 0
            self._check_nonfinite(stacked)

    def _check_nonfinite(self, stacked: dict[torch.device, tuple[list[tuple[int, int]], torch.Tensor]]) -> None:
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
        for device, (positions, values) in stacked.items():
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
            f"optimizer.state[p][{NONFINITE_GRAD_STEPS!r}]; this warning is given once per optimizer (counters are "
            f"looked at every {self.nonfinite_check_interval} steps).",
            RuntimeWarning,
            stacklevel=4,
        )
        self._nonfinite_warned = True


def _use_triton(param: torch.Tensor) -> bool:
    """Whether the fused Triton step is used for this device (CUDA)."""
    return param.is_cuda


def _triton_step() -> types.ModuleType | None:
    """The fused Triton step for CUDA tensors (fp32/bf16/fp16 params; fp32, bf16 or quantized moments), if Triton
    is installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    from hf_gns_spam.kernels import stable_spam_step

    return stable_spam_step


# --------------------------------------------------------------------------------------------------------------------
# the torch path: the maths of hf_gns_spam.optim.torch_step around the moments in the state's format
# --------------------------------------------------------------------------------------------------------------------


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
    raw_max, grad_max = masked_abs_max(grad, work)
    clip = adaclip(state, hp, stat_step, grad_max, ~torch.isfinite(raw_max), one)
    clip_into(grad, work, spikes, clip)
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
    """Weight decay, AdaGN, MoRet and Adam, from ``work = g̃/s`` and ``scaled_norm = ‖g̃‖/s`` (compute dtype), with
    the moments loaded from and stored back into the state's format."""
    has_norm = adagn(state, work, hp, stat_step, scaled_norm, scale)  # work = ĝ
    m, v = _load_moments(state, param, work.dtype)
    adam_update(param, m, v, work, hp, adam_step, has_norm, one)
    _store_moments(state, m, v)


def _load_moments(state: dict[str, Any], param: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's moments in the compute dtype: the state tensors themselves when they are stored in it, else copies
    (bf16 moments cast up; quantized moments dequantized)."""
    if QUANTIZED_BITS not in state:
        m, v = (state[key].to(dtype) for key, _ in MOMENTS)
        return m, v
    codes = STATE_FORMATS[state[QUANTIZED_BITS]].moment_formats
    m, v = (
        dequantize(state[key + INDICES], state[key + ABSMAX], code, param.numel()).view(param.shape).to(dtype)
        for (key, _), code in zip(MOMENTS, codes, strict=True)
    )
    return m, v


def _store_moments(state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
    """Write back moments that :func:`_load_moments` returned as copies."""
    if QUANTIZED_BITS not in state:
        for (key, _), values in zip(MOMENTS, (m, v), strict=True):
            if values is not state[key]:
                state[key].copy_(values)
        return
    codes = STATE_FORMATS[state[QUANTIZED_BITS]].moment_formats
    for (key, _), values, code in zip(MOMENTS, (m, v), codes, strict=True):
        indices, absmax = quantize(values, code)
        state[key + INDICES].copy_(indices)
        state[key + ABSMAX].copy_(absmax)
