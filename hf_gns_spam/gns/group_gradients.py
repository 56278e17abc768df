"""‖G‖² of the patched norms' accumulated gradient, per norm group, as the GNS needs it (``big``).

The gradient of a trained norm parameter is its ``.grad``: replicated on every process under DDP (already averaged
over the processes), or a DTensor shard under FSDP2 (whose squares are summed here, locally, and over the processes
with the step's other sums). The gradient of a frozen one (peft's LoRA and QLoRA) is its module's float32 sink
(:func:`hf_gns_spam.stats.norm_gradients`), local to each process: the sinks are averaged over the processes here,
as DDP averages the trained gradients, in one all-reduce that every process joins with the same sinks in the same
order, whatever its backward reached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from hf_gns_spam.gns.arguments import NORM_GROUPS, NormGroup
from hf_gns_spam.stats import NormGradient, norm_gradients

__all__ = ["GroupSquaredNorms", "group_squared_norms"]


@dataclasses.dataclass(frozen=True)
class GroupSquaredNorms:
    """Per norm group (:data:`NORM_GROUPS` order): Σ‖grad‖² of replicated gradients (complete), of this process's
    shards (to be summed over the processes), and whether any of the group's parameters had a gradient."""

    replicated: torch.Tensor
    shards: torch.Tensor
    measured: tuple[bool, ...]


def group_squared_norms(
    model: nn.Module, groups_of: Callable[[Iterable[str]], dict[str, NormGroup]], accelerator: Any
) -> GroupSquaredNorms | None:
    """The squared gradient norms of ``model``'s patched norm parameters by group (``groups_of`` maps their names in
    :func:`~hf_gns_spam.stats.norm_gradients` to groups), or None when the backward reached none; ``accelerator``
    (the Trainer's) gives the processes and their all-reduce."""
    gradients = norm_gradients(model)
    groups = groups_of(gradients)
    measured = [(groups[n], g.gradient) for n, g in gradients.items() if not g.frozen and g.gradient is not None]
    frozen = {name: gradient for name, gradient in gradients.items() if gradient.frozen}
    if frozen:
        measured += _averaged_sinks(frozen, groups, accelerator)
    if not measured:
        return None
    zero = torch.zeros((), device=measured[0][1].device)
    replicated, shards = [zero] * len(NORM_GROUPS), [zero] * len(NORM_GROUPS)
    present = [False] * len(NORM_GROUPS)
    for group, grad in measured:
        index = NORM_GROUPS.index(group)
        present[index] = True
        if isinstance(grad, DTensor):
            shards[index] = shards[index] + grad.to_local().float().square().sum()
        else:
            replicated[index] = replicated[index] + grad.float().square().sum()
    return GroupSquaredNorms(torch.stack(replicated), torch.stack(shards), tuple(present))


def _averaged_sinks(
    frozen: dict[str, NormGradient], groups: dict[str, NormGroup], accelerator: Any
) -> list[tuple[NormGroup, torch.Tensor]]:
    """The frozen norms' gradients reached on this process, each averaged over the processes (module docstring;
    zeros stand for the sinks the backward did not reach here; nothing is read on the host)."""
    processes = accelerator.num_processes
    reached = [name for name, g in frozen.items() if g.gradient is not None]
    if not reached and processes == 1:
        return []
    device = frozen[reached[0]].gradient.device if reached else accelerator.device
    flat = torch.cat(
        [torch.zeros(g.size, device=device) if g.gradient is None else g.gradient.reshape(-1) for g in frozen.values()]
    )
    if processes > 1:
        flat = accelerator.reduce(flat, reduction="mean")
    pieces = dict(zip(frozen, flat.split([g.size for g in frozen.values()]), strict=True))
    return [(groups[name], pieces[name]) for name in reached]
