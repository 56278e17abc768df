"""One optimizer step's sums on this process, and their one all-reduce over the processes.

Per optimizer step, over the parameters of the patched norms, with α_b the weight of example b in the loss that was
back-propagated on its process (a_b × what the Trainer multiplied the loss by: ÷ accumulation for a loss not
normalised by ``num_items_in_batch``, the fp16 loss scale; observed in the backward,
:mod:`hf_gns_spam.gns.weight_observer`), summed over micro-batches and processes (P of them, whose gradients DDP
averages), :class:`StepSums` collects

* Σ_b ‖G_b‖² (G_b = α_b·g_b, example b's contribution to its process's gradient: the norms' statistics), in all and
  per norm group (:mod:`hf_gns_spam.gns.groups`);
* Σ_b α_b and Σ_b α_b², the micro-batches, examples and label tokens;
* ‖G‖² of the accumulated gradient after the all-reduce and before clipping, in all and per group (replicated
  gradients summed here; FSDP2's shards summed locally and over the processes with the rest;
  :mod:`hf_gns_spam.gns.group_gradients`);
* whether the gradient had a NaN or ±inf entry: the norm of the whole gradient before clipping, which the Trainer
  computes with ``clip_grad_norm_`` (with ``max_norm=inf`` when it does not clip, transformers 5.25), is not finite;
  where it computes none, only the norms' ‖G‖² is looked at. No host read of its own (the step's all-reduce);
* on a validation step (``validate_every``), the micro-batches' inputs, and ‖G‖² of all trainable parameters and of
  all but the embeddings (:mod:`hf_gns_spam.gns.whole_model`), whose per-example counterparts Σ_e α_e²‖g_e‖² are
  recomputed at :meth:`StepSums.reduce`.

:meth:`StepSums.reduce` sums them over the processes in one all-reduce (no other host synchronisation in the step)
and returns :class:`StepTotals`, from which :mod:`hf_gns_spam.gns.estimates` forms

    small = Σ_b ‖G_b‖² / Σ_b α_b²      big = ‖G‖²·P² / (Σ_b α_b)²      B_eff = (Σ_b α_b)² / Σ_b α_b²

so that E[small] = |G|² + tr Σ and E[big] = |G|² + tr Σ / B_eff for per-example gradients g_b (each example's own
loss) independent of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_gns_spam.errors import AccumulationError
from hf_gns_spam.gns.arguments import NORM_GROUPS, NormGroup
from hf_gns_spam.gns.estimator import StepWeights
from hf_gns_spam.gns.example_weights import LossWeighting
from hf_gns_spam.gns.group_gradients import group_squared_norms
from hf_gns_spam.gns.weight_observer import ObservedMicroBatch
from hf_gns_spam.gns.whole_model import (
    StoredMicroBatch,
    embedding_parameters,
    squared_gradient_norm,
    weighted_squared_norms,
)
from hf_gns_spam.stats import PerExampleStats

__all__ = ["StepSums", "StepTotals"]

GroupsOf = Callable[[list[str]], Mapping[str, NormGroup]]  # statistics keys -> their norm groups


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step's sums over all processes (:meth:`StepSums.reduce`)."""

    weights: StepWeights  # Σ_b α_b, Σ_b α_b², P
    sum_sq: float  # Σ_b ‖G_b‖² over the patched norms
    big: float | None  # ‖G‖² of their gradient (None: the backward reached no patched norm)
    group_sum_sq: list[float]  # the same two per norm group, in NORM_GROUPS order
    group_big: list[float]
    group_measured: list[bool]  # the group had a gradient
    groups_present: tuple[NormGroup, ...]  # the groups of the measured norms, in NORM_GROUPS order
    examples: int  # examples in the step, all processes
    label_tokens: float  # label tokens in the step, all processes
    measured_examples: float  # the most examples any norm's statistics counted on a process
    unusable: bool  # a micro-batch whose weights could not be identified (this process)
    validated: bool  # every process recomputed its examples' whole-model gradients (validate_every)
    total: tuple[float, float]  # (Σ_e α_e²‖g_e‖², ‖G‖²) over all trainable parameters
    no_embeddings: tuple[float, float]  # ... and over all but the embeddings (nan: every one is an embedding)
    norms_sq: float  # the norms' Σ_e α_e²‖g_e‖², recomputed from the whole model's per-example gradients
    nonfinite: bool  # the step's gradient had a NaN or ±inf on some process


class StepSums:
    """This process's sums of the optimizer step in progress (module docstring); a fresh one for every step."""

    def __init__(self, validating: bool = False) -> None:
        self.micro_batches = 0
        self.rows = 0  # examples
        self.label_tokens = 0
        self.weight_sum: torch.Tensor | float = 0.0
        self.weight_sq_sum: torch.Tensor | float = 0.0
        self.unusable = False  # a micro-batch whose weights could not be identified
        self.validating = validating  # this step is a validation step (validate_every)
        self.stored: list[StoredMicroBatch] = []  # its micro-batches
        self.big: torch.Tensor | None = None  # ‖G‖² of replicated gradients (None: not measured)
        self.big_shards = torch.zeros(())  # this process's part of ‖G‖² of sharded gradients
        self.group_big = torch.zeros(len(NORM_GROUPS))  # the same two, per norm group (NORM_GROUPS order)
        self.group_big_shards = torch.zeros(len(NORM_GROUPS))
        self.group_measured = [False] * len(NORM_GROUPS)
        self.total_big: torch.Tensor | None = None  # a validation step's ‖G‖² over all trainable parameters
        self.total_big_no_embeddings: torch.Tensor | None = None  # ... and over all but the embeddings
        self.gradient_norm: torch.Tensor | None = None  # the whole gradient's norm before clipping

    def add_micro_batch(self, observed: ObservedMicroBatch, inputs: Mapping[str, Any]) -> None:
        """Count one micro-batch (already counted in ``micro_batches``); keep it on a validation step."""
        self.rows += observed.examples
        self.unusable |= observed.unusable
        if observed.tokens is None:
            return
        self.label_tokens += int(observed.tokens.sum())
        if self.validating:
            inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            self.stored.append(StoredMicroBatch(inputs, observed.labels.detach(), observed.sequences, observed.tokens))

    def add_weights(self, weights: torch.Tensor | None) -> None:
        """Count a micro-batch's examples' weights α_b (in units of the loss passed to the backward), if given."""
        if weights is None:
            return
        if self.validating and self.stored and self.stored[-1].weights is None:
            self.stored[-1].weights = weights
        self.weight_sum = self.weight_sum + weights.sum()
        self.weight_sq_sum = self.weight_sq_sum + weights.square().sum()

    def measure_gradient(self, model: nn.Module, groups_of: GroupsOf, accelerator: Any) -> None:
        """‖G‖² of the accumulated gradient before clipping (and of the whole model's on a validation step)."""
        if self.validating and self.total_big is None:
            self.total_big = squared_gradient_norm(model)
            self.total_big_no_embeddings = squared_gradient_norm(model, embedding_parameters(model))
        squared = group_squared_norms(model, groups_of, accelerator)
        if squared is None:
            self.big = None
            return
        self.group_measured = list(squared.measured)
        self.group_big, self.group_big_shards = squared.replicated, squared.shards
        self.big, self.big_shards = self.group_big.sum(), self.group_big_shards.sum()

    def reduce(
        self,
        model: nn.Module,
        named_stats: Mapping[str, PerExampleStats],
        groups_of: GroupsOf,
        accelerator: Any,
        weighting: LossWeighting | None,
        smoothing: float,
    ) -> StepTotals:
        """The step's sums over all processes, in one all-reduce; on a validation step the whole model's per-example
        gradients are recomputed first (``weighting``'s label shift and ``smoothing`` give each example's loss)."""
        stats = list(named_stats.values())
        device = stats[0].sum_sq.device if stats else accelerator.device
        zero = torch.zeros((), device=device)
        validated = self.validating and not self.unusable and self.total_big is not None
        total_sq = no_embeddings_sq = norms_sq = zero
        no_embeddings = True  # some trainable parameter is not an embedding
        if validated:  # the whole model's Σ α_e²‖g_e‖², without the embeddings, and the norms' share (recomputed)
            embeddings = {id(p) for p in embedding_parameters(model)}
            no_embedding_names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in embeddings]
            no_embeddings = bool(no_embedding_names)
            groups = {"norms": list(named_stats), "no_embeddings": no_embedding_names}
            sums = weighted_squared_norms(model, self.stored, weighting.shifted, smoothing, groups)
            total_sq, no_embeddings_sq, norms_sq = (
                sums[key].to(device, torch.float32) for key in ("all", "no_embeddings", "norms")
            )
        groups = groups_of(list(named_stats))
        group_sum_sq = [
            sum((s.sum_sq for n, s in named_stats.items() if groups[n] == group), zero) for group in NORM_GROUPS
        ]
        # a non-finite gradient: the whole gradient's norm where the Trainer computed one, else the norms' ‖G‖²
        checked = self.gradient_norm if isinstance(self.gradient_norm, torch.Tensor) else self.big
        nonfinite = zero if checked is None else (~torch.isfinite(checked.to(device, torch.float32))).float()
        local = torch.stack(
            [
                sum((s.sum_sq for s in stats), zero),
                zero + self.weight_sum,
                zero + self.weight_sq_sum,
                zero + self.micro_batches,
                zero + self.rows,
                zero + self.label_tokens,
                torch.stack([s.count for s in stats]).max() if stats else zero,
                zero if self.big is None else self.big_shards.to(device),
                total_sq,
                no_embeddings_sq,
                norms_sq,
                zero + float(validated),
                nonfinite,
                *group_sum_sq,
                *self.group_big_shards.to(device),
            ]
        )
        totals = accelerator.reduce(local, reduction="sum").tolist()  # the step's one all-reduce
        (sum_sq, weight_sum, weight_sq_sum, micro, rows, label_tokens, measured, big_shards, total_sq,
         no_embeddings_sq, norms_sq, validated_processes,
         nonfinite_processes) = (float(v) for v in totals[:13])  # fmt: skip
        count = len(NORM_GROUPS)
        group_sum_sq, group_big_shards = totals[13 : 13 + count], totals[13 + count :]
        processes = accelerator.num_processes
        if round(micro) != processes * self.micro_batches:
            raise AccumulationError(
                f"this optimizer step ran {self.micro_batches} micro-batches on this process but {round(micro)} on "
                f"{processes} processes together: the processes are out of step"
            )
        validated_everywhere = round(validated_processes) == processes
        big_no_embeddings = float(self.total_big_no_embeddings) if validated and no_embeddings else math.nan
        return StepTotals(
            weights=StepWeights(weight_sum, weight_sq_sum, processes),
            sum_sq=sum_sq,
            big=None if self.big is None else float(self.big) + big_shards,
            group_sum_sq=group_sum_sq,
            group_big=[b + s for b, s in zip(self.group_big.tolist(), group_big_shards, strict=True)],
            group_measured=self.group_measured,
            groups_present=tuple(g for g in NORM_GROUPS if g in set(groups.values())),
            examples=round(rows),
            label_tokens=label_tokens,
            measured_examples=measured,
            unusable=self.unusable,
            validated=validated_everywhere,
            total=(total_sq, float(self.total_big) if validated else math.nan),
            # nan (the estimator skips the step) when every trainable parameter is an embedding
            no_embeddings=(no_embeddings_sq, big_no_embeddings),
            norms_sq=norms_sq,
            nonfinite=nonfinite_processes > 0,
        )
