"""StableSPAM on FSDP2 (DTensor) parameters: the sharded step and the conversion of the sharded state.

The behaviour (statistics over the whole tensor, two collectives per step, quantization blocks within each shard,
which states can be resharded) is described in :mod:`hf_gns_spam.optim.stable_spam`. Here:

* the DTensor helpers (:func:`is_dtensor`, :func:`local_tensor`, :func:`shard_group`);
* :class:`ShardedStep`, the three phases of a step over the local shards of all sharded tensors, with one MAX and
  one SUM all-reduce per process group;
* :func:`state_as_dtensors` and :func:`loaded_local`, the state dict's DTensor form of a sharded state and back: the
  moments sharded like the parameter, each quantized buffer one zero-padded row per shard (its length the state
  format's, :data:`~hf_gns_spam.kernels.step_contract.STATE_FORMATS`, for the largest shard).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from hf_gns_spam.kernels.step_contract import (
    MOMENTS,
    QUANTIZED_BITS,
    QUANTIZED_KEYS,
    STATE_FORMATS,
    MomentBuffer,
    StepHyperparameters,
)
from hf_gns_spam.optim.torch_step import Clip, adaclip, clip_into, finite_abs, masked_abs_max

__all__ = ["Shard", "ShardedStep", "is_dtensor", "loaded_local", "local_tensor", "shard_group", "state_as_dtensors"]

#: The torch path's AdaGN, MoRet and Adam for one shard, from ``work = g̃/s`` and the global ``‖g̃‖/s``:
#: ``(param, state, work, hp, stat_step, adam_step, one, scaled_norm, scale)``, the optimizer's moment storage included.
AdagnAdam = Callable[
    [torch.Tensor, dict[str, Any], torch.Tensor, StepHyperparameters, int, int, torch.Tensor, torch.Tensor,
     torch.Tensor],
    None,
]  # fmt: skip


@functools.cache
def _dtensor_type() -> type | None:
    """torch's DTensor class, or None when torch.distributed is unavailable."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor (a view that aliases it), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard_group(param: torch.Tensor) -> Any:
    """The process group over which a DTensor parameter's shards are spread (None when it is replicated), after
    checking that the placements are ones whose per-tensor statistics this optimizer can reduce."""
    placements = tuple(param.placements)
    if any(not (p.is_shard() or p.is_replicate()) for p in placements):
        raise RuntimeError(f"StableSPAM: DTensor parameter with placements {placements}; supported: Shard, Replicate.")
    grad_placements = tuple(param.grad.placements) if is_dtensor(param.grad) else None
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


# --------------------------------------------------------------------------------------------------------------------
# the state dict's DTensor form
# --------------------------------------------------------------------------------------------------------------------


def _shard_dims(param: torch.Tensor) -> tuple[int, int] | None:
    """(mesh dimension, tensor dimension) along which a DTensor is sharded, or None when it is replicated."""
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            return mesh_dim, placement.dim
    return None


def _quantized_buffers(state: dict[str, Any], numel: int) -> dict[str, MomentBuffer]:
    """The quantized buffers of ``state``'s format for a shard of ``numel`` elements, by state key."""
    buffers = STATE_FORMATS[state[QUANTIZED_BITS]].moment_buffers(numel, torch.float32)
    return {buffer.key: buffer for buffer in buffers}


def state_as_dtensors(param: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a DTensor parameter's state dict entry with its sharded tensors as DTensors: the unquantized
    moments sharded like the parameter; each quantized buffer as a ``[shards, length]`` tensor, one zero-padded row
    per shard (``Shard(0)`` over the sharding mesh dimension), ``length`` the buffer's for the largest shard."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    dims = _shard_dims(param)
    if dims is None or param.numel() == 0:
        return state
    mesh_dim, tensor_dim = dims
    mesh = param.device_mesh
    out = dict(state)
    for key, _ in MOMENTS:
        if key in state:
            out[key] = DTensor.from_local(
                state[key], mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
    if QUANTIZED_BITS in state:
        shards = mesh.size(mesh_dim)
        rows = param.shape[tensor_dim]
        largest_shard = -(-rows // shards) * (param.numel() // rows)  # torch.chunk's first (largest) piece
        placements = [Shard(0) if dim == mesh_dim else Replicate() for dim in range(mesh.ndim)]
        for key, buffer in _quantized_buffers(state, largest_shard).items():
            local = state[key]
            row = local.new_zeros(1, buffer.numel)
            row[0, : local.numel()] = local
            out[key] = DTensor.from_local(
                row,
                mesh,
                placements,
                run_check=False,
                shape=torch.Size([shards, buffer.numel]),
                stride=(buffer.numel, 1),
            )
    return out


def loaded_local(key: str, value: torch.Tensor, param: torch.Tensor, saved_state: dict[str, Any]) -> Any:
    """The rank's plain tensor of a loaded state value: a DTensor's local shard, for a row-per-shard quantized
    buffer its row without the padding (None when the row cannot hold this shard's buffer)."""
    if not is_dtensor(value):
        return value
    local = value.to_local()
    if key in QUANTIZED_KEYS and QUANTIZED_BITS in saved_state and value.dim() == 2:
        length = _quantized_buffers(saved_state, local_tensor(param).numel())[key].numel
        if local.shape[0] != 1 or local.shape[1] < length:
            return None
        return local[0, :length]
    return local


# --------------------------------------------------------------------------------------------------------------------
# the sharded step
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Shard:
    """One DTensor parameter in a sharded step: its local shard, gradient shard and state."""

    param: torch.Tensor  # the local shard (aliases the DTensor's data)
    grad: torch.Tensor
    state: dict[str, Any]
    hp: StepHyperparameters
    stat_step: int
    adam_step: int
    process_group: Any  # None: replicated, no reduction
    use_triton: bool


class ShardedStep:
    """The three phases of a sharded step (stable_spam's docstring), with one MAX and one SUM all-reduce per process
    group.

    Torch-path shards work through one scratch buffer per (device, compute dtype) and recompute |g| and g̃/s in
    each phase instead of keeping per-tensor temporaries; Triton-path shards keep their kernel partials in one
    float64 workspace row each, and the cross-rank values are written back into those rows between the kernels.
    ``kernels`` is :mod:`hf_gns_spam.kernels.stable_spam_step` when a shard takes the Triton path; ``adagn_adam`` is
    the optimizer's last phase of the torch path (:data:`AdagnAdam`).
    """

    def __init__(self, items: list[Shard], kernels: ModuleType | None, adagn_adam: AdagnAdam) -> None:
        self.items = items
        self.adagn_adam = adagn_adam
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
        self.kernels = kernels
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

    def _buffers(self, item: Shard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
            raw_max, grad_max = masked_abs_max(grad, work)
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
    ) -> tuple[dict[int, Clip], dict[int, torch.Tensor]]:
        """Phase 2: AdaClip with the global max|g| and non-finite flag; each shard's Σ(g̃/s)² (float64)."""
        clips, sums = {}, {}
        for i in self.torch_items:
            item = self.items[i]
            grad, work, spikes, one = self._buffers(item)
            grad_max = maxima[i].to(one.dtype)
            clips[i] = adaclip(item.state, item.hp, item.stat_step, grad_max, flags[i] > 0, one)
            finite_abs(grad, work)
            clip_into(grad, work, spikes, clips[i])
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

    def _update(self, clips: dict[int, Clip], totals: dict[int, torch.Tensor]) -> None:
        """Phase 3: AdaGN with the global ‖g̃‖/s, MoRet, Adam and the update of each shard."""
        for i in self.torch_items:
            item = self.items[i]
            grad, work, spikes, one = self._buffers(item)
            finite_abs(grad, work)
            clip_into(grad, work, spikes, clips[i])
            scaled_norm = totals[i].sqrt().to(one.dtype)
            self.adagn_adam(item.param, item.state, work, item.hp, item.stat_step, item.adam_step, one, scaled_norm,
                            clips[i].scale)  # fmt: skip
        for device in self.workspaces:
            pss, indices = self._partials(device, 2)
            pss.zero_()
            pss[:, 0].copy_(torch.stack([totals[i] for i in indices]))
        for launches in self.launches:
            launches.update()
