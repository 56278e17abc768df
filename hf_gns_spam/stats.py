"""Per-example gradient statistics of the patched normalization layers.

For every parameter p of every patched module, since the last reset:

    sum_sq = Σ_b ‖G_p[b]‖²     over every example b of every backward pass,
    count  = number of examples seen,

where G_p[b] is the contribution of example b to ``p.grad`` (so that Σ_b G_p[b] is the gradient). With a loss that
weights example b by a_b (1/B for a mean over examples, n_b/N for a mean over label tokens), the gradient of example
b's own loss is G_p[b] / a_b.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hf_gns_spam.kernels.norm_contract import BIAS_SUM_SQ, EXAMPLES, WEIGHT_SUM_SQ
from hf_gns_spam.patching import is_patched

__all__ = [
    "NormGradient",
    "PerExampleStats",
    "norm_gradients",
    "per_example_grad_stats",
    "reset_per_example_grad_stats",
]


@dataclass(frozen=True)
class PerExampleStats:
    """0-dim float32 tensors on the parameter's device (reading them does not synchronise)."""

    sum_sq: torch.Tensor
    count: torch.Tensor


def _measured_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(prefix of its parameters' names, module) of every patched module that takes statistics (not shared)."""
    for module_name, module in model.named_modules():
        if is_patched(module) and not getattr(module, "_gns_shared", False):
            yield (f"{module_name}." if module_name else ""), module


def per_example_grad_stats(model: nn.Module) -> dict[str, PerExampleStats]:
    """Statistics of every parameter of every patched module, keyed by its name in ``model.named_parameters()``.

    A parameter whose module saw no backward pass since the last reset reports zeros (a frozen norm whose input
    carries no gradient is not measured). A module found at run time to be applied more than once per forward
    (shared) is left out.
    """
    stats: dict[str, PerExampleStats] = {}
    for prefix, module in _measured_modules(model):
        accumulated = module._gns_statistics.grad
        if accumulated is None:
            accumulated = torch.zeros_like(module._gns_statistics)
        examples = accumulated[EXAMPLES]
        stats[prefix + "weight"] = PerExampleStats(accumulated[WEIGHT_SUM_SQ], examples)
        if getattr(module, "bias", None) is not None:
            stats[prefix + "bias"] = PerExampleStats(accumulated[BIAS_SUM_SQ], examples)
    return stats


@dataclass(frozen=True)
class NormGradient:
    """The batch gradient Σ_b G_p[b] of one patched norm parameter (None where the backward did not reach it since
    the last reset), whether the parameter is ``frozen`` (then the gradient is its module's float32 sink, local to
    this process; otherwise its ``.grad``, reduced over the processes by DDP, sharded by FSDP2) and its ``size``."""

    gradient: torch.Tensor | None
    frozen: bool
    size: int


def norm_gradients(model: nn.Module) -> dict[str, NormGradient]:
    """The batch gradient of every parameter :func:`per_example_grad_stats` reports, with the same keys."""
    gradients: dict[str, NormGradient] = {}
    for prefix, module in _measured_modules(model):
        for name, sink in zip(("weight", "bias"), module._gns_sinks, strict=True):
            parameter = getattr(module, name, None)
            if parameter is None:
                continue
            frozen = not parameter.requires_grad
            gradient = sink.grad if frozen else parameter.grad
            gradients[prefix + name] = NormGradient(gradient, frozen, sink.numel())
    return gradients


def reset_per_example_grad_stats(model: nn.Module) -> None:
    """Zero the statistics (and the frozen parameters' gradients) of every patched module: a new optimizer step."""
    for module in model.modules():
        if is_patched(module):
            module._gns_statistics.grad = None
            for sink in module._gns_sinks:
                if sink is not None:
                    sink.grad = None
