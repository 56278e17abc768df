"""What :meth:`StableSPAM.load_state_dict <hf_gns_spam.optim.stable_spam.StableSPAM.load_state_dict>` checks before
it loads anything, and how it restores a parameter's saved state.

* :func:`check_loaded_groups`: every hyperparameter of the checkpoint's groups is valid (the table of
  :mod:`hf_gns_spam.optim.hyperparameters`), its step counter is an integer >= 0 and its ``state_bits`` is this
  optimizer's (moments are not converted between formats); returns the other hyperparameters that differ;
* :func:`check_loaded_states`, :func:`state_layout_problem` and :func:`nonfinite_problem`: every saved per-tensor
  state has the buffers the parameter's format (:data:`~hf_gns_spam.kernels.step_contract.STATE_FORMATS`) gives it,
  with their dtypes and lengths, for the rank's shard of a DTensor parameter, and no NaN or ±inf in them;
* :func:`restored_state`: the saved tensors on the parameter's device in their saved dtype, statistics of earlier
  versions converted.

Each refusal is a ``ValueError`` that names the group or parameter, the key and what was expected.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_gns_spam.kernels.step_contract import (
    CLIP_MAX_EMA,
    MOMENTS,
    NONFINITE_GRAD_STEPS,
    QUANTIZED_BITS,
    STATE_FORMATS,
    STATISTICS,
)
from hf_gns_spam.optim.hyperparameters import HYPERPARAMETERS, check_hyperparameter
from hf_gns_spam.optim.sharded_step import loaded_local, local_tensor
from hf_gns_spam.optim.torch_step import stat_dtype

__all__ = [
    "check_loaded_groups",
    "check_loaded_states",
    "nonfinite_problem",
    "restored_state",
    "state_layout_problem",
]


def check_loaded_groups(saved_groups: list[dict[str, Any]], param_groups: list[dict[str, Any]]) -> list[str]:
    """Validate the checkpoint's group hyperparameters (ValueError); return the differences to report."""
    changes = []
    for index, (saved, group) in enumerate(zip(saved_groups, param_groups, strict=True)):
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
                f"(Trainer: {STATE_FORMATS[saved_bits].trainer_spelling}); to change the width, start a fresh "
                "optimizer state (load the model weights only)."
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


def check_loaded_states(state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
    """Refuse per-tensor states whose layout does not fit their parameter under the group's state_bits."""
    for index, (saved, group) in enumerate(zip(state_dict["param_groups"], param_groups, strict=True)):
        bits = group["state_bits"]
        for saved_id, param in zip(saved["params"], group["params"], strict=True):
            saved_state = state_dict["state"].get(saved_id)
            if not saved_state:
                continue
            problem = state_layout_problem(saved_state, param, bits) or nonfinite_problem(saved_state, param)
            if problem is not None:
                raise ValueError(
                    f"StableSPAM.load_state_dict: the state of parameter {saved_id} (group {index}, shape "
                    f"{tuple(param.shape)}) does not fit this optimizer with state_bits={bits}: {problem}. "
                    "Build the optimizer as the checkpoint's run did (same state_bits, same parameters, and for "
                    "sharded parameters the same sharding and world size), or start a fresh optimizer state."
                    + (_FRESH_STATE if problem.startswith("non-finite") else "")
                )


_FRESH_STATE = (
    " A step from non-finite moments or statistics makes the parameter non-finite: resume from an earlier "
    "checkpoint, or start a fresh optimizer state deliberately (load the model's weights from the checkpoint and "
    "train without resume_from_checkpoint)."
)


def nonfinite_problem(saved_state: dict[str, Any], param: torch.Tensor) -> str | None:
    """Which floating-point tensor of a saved state holds NaN or ±inf (None if none does), for the rank's shard."""
    for key, value in saved_state.items():
        if torch.is_tensor(value) and value.is_floating_point():
            local = local_tensor(loaded_local(key, value, param, saved_state))
            bad = local.numel() - int(torch.isfinite(local).sum())
            if bad:
                return f"non-finite values in {key!r} ({bad} of {local.numel()} elements)"
    return None


def state_layout_problem(saved_state: dict[str, Any], param: torch.Tensor, bits: int) -> str | None:
    """Why a checkpoint's per-tensor state does not fit ``param`` under ``state_bits=bits`` (None if it does): the
    format of the parameter's (whole) size, its moment buffers' keys, dtypes and lengths for the rank's shard."""
    local = local_tensor(param)
    fmt = STATE_FORMATS[bits].for_numel(param.numel())
    compute_dtype = torch.promote_types(local.dtype, torch.float32)
    if QUANTIZED_BITS in saved_state:
        saved_bits = saved_state[QUANTIZED_BITS]
        if not fmt.is_quantized or saved_bits != bits:
            return f"it holds {saved_bits}-bit quantized moments"
        for buffer in fmt.moment_buffers(local.numel(), compute_dtype):
            value = saved_state.get(buffer.key)
            if torch.is_tensor(value):
                value = loaded_local(buffer.key, value, param, saved_state)
            if value is None or not torch.is_tensor(value) or value.numel() != buffer.numel:
                return f"{buffer.key} is missing or has another size than this parameter's (shard's) {buffer.numel}"
            if value.dtype != buffer.dtype:
                return f"{buffer.key} is {value.dtype}, this optimizer stores it as {buffer.dtype}"
        return None
    if not any(key in saved_state for key, _ in MOMENTS):
        return None  # no moments saved (nothing to check against)
    if fmt.is_quantized:
        return f"it holds unquantized moments, this optimizer keeps this tensor in {bits} bits"
    for key, _ in MOMENTS:
        value = saved_state.get(key)
        if not torch.is_tensor(value) or local_tensor(value).shape != local.shape:
            shape = None if not torch.is_tensor(value) else tuple(local_tensor(value).shape)
            return f"{key} has shape {shape}, the parameter (shard) {tuple(local.shape)}"
        if str(value.dtype).removeprefix("torch.") not in fmt.moment_dtypes:
            return f"{key} is {value.dtype}, this optimizer stores {'/'.join(fmt.moment_dtypes)} moments"
    return None


def restored_state(saved_state: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    """The tensors of a checked saved state as this rank's plain tensors on the parameter's device, each in its saved
    dtype (torch's own load would cast the moments to the parameter's dtype); statistics of versions that kept them
    in float32 converted to :func:`~hf_gns_spam.optim.torch_step.stat_dtype`, a missing non-finite counter 0."""
    device = local_tensor(param).device
    state = {}
    for key, value in saved_state.items():
        if torch.is_tensor(value):
            state[key] = loaded_local(key, value, param, saved_state).detach().to(device=device, copy=True)
    for key in STATISTICS:
        if key in state:
            state[key] = state[key].to(stat_dtype(device))
    if CLIP_MAX_EMA in state and NONFINITE_GRAD_STEPS not in state:
        state[NONFINITE_GRAD_STEPS] = torch.zeros((), dtype=torch.int64, device=device)
    return state
