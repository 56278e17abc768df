"""Independent recomputations of what the package measures, and comparisons with them.

Ground truth from the unpatched model, one example at a time (``torch.func``, float64): per-token losses, per-example
gradients and the sums the per-example statistics and the GNS estimator are built from. Then the patched model's
statistics as plain numbers, and their comparison."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_gns_spam import per_example_grad_stats


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross entropy per position (shifted), 0 where the label is -100: shape [B, T-1]."""
    shifted_logits, shifted_labels = logits[:, :-1].float(), labels[:, 1:]
    losses = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels.clamp_min(0), reduction="none")
    return losses * (shifted_labels != -100)


def expected_sum_sq(model: nn.Module, inputs: dict, reduction: str, names: list[str]) -> dict[str, float]:
    """Σ_b ‖∂(weight_b · loss_b)/∂p‖² from torch.func.grad, one example at a time (float64)."""
    model = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    labels = inputs["labels"]
    batch_size = labels.shape[0]
    total_tokens = (labels[:, 1:] != -100).sum()

    def contribution(tracked: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        example = {k: v[b : b + 1] for k, v in inputs.items() if k != "labels"}
        logits = torch.func.functional_call(model, {**params, **tracked}, args=(), kwargs=example).logits
        losses = token_losses(logits, labels[b : b + 1])
        if reduction == "tokens":
            return losses.sum() / total_tokens
        return losses.sum() / (labels[b, 1:] != -100).sum() / batch_size

    totals = dict.fromkeys(names, 0.0)
    for b in range(batch_size):
        grads = torch.func.grad(contribution)({n: params[n] for n in names}, b)
        for n in names:
            totals[n] += grads[n].square().sum().item()
    return totals


def per_example_norm_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, P] float64: the gradient of each example's own mean-token loss w.r.t. the norm parameters (torch.func)."""
    return per_example_gradients(model, batch, [n for n, _ in model.named_parameters() if "norm" in n or ".ln_" in n])


def per_example_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """[B, P] float64: the gradient of each example's own mean-token loss w.r.t. the parameters ``names``."""
    reference = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in reference.named_parameters()}

    def own_loss(tracked, b):
        example = {k: batch[k][b : b + 1] for k in ("input_ids", "attention_mask")}
        logits = torch.func.functional_call(reference, {**params, **tracked}, args=(), kwargs=example).logits
        losses = token_losses(logits, batch["labels"][b : b + 1])
        return losses.sum() / (batch["labels"][b, 1:] != -100).sum()

    tracked = {n: params[n] for n in names}
    rows = [
        torch.cat([g.flatten() for g in torch.func.grad(own_loss)(tracked, b).values()])
        for b in range(len(batch["labels"]))
    ]
    return torch.stack(rows)


def weighted_small_big(per_example: torch.Tensor, weights: torch.Tensor) -> tuple[float, float, float]:
    """The callback's inputs to the estimator from per-example own-loss gradients g_b [B, D] and their weights a_b
    in the loss: Σ a_b²‖g_b‖² / Σ a_b², ‖Σ a_b g_b‖² / (Σ a_b)², and (Σ a_b)² / Σ a_b²."""
    weights = weights.double()
    small = (weights.square() * per_example.square().sum(1)).sum() / weights.square().sum()
    big = (weights[:, None] * per_example).sum(0).square().sum() / weights.sum().square()
    return small.item(), big.item(), (weights.sum().square() / weights.square().sum()).item()


def snapshot(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Each patched norm parameter's (Σ_b ‖g_b‖², examples counted) from its per-example statistics."""
    return {n: (s.sum_sq.item(), s.count.item()) for n, s in per_example_grad_stats(model).items()}


def assert_same_statistics(measured: dict[str, tuple[float, float]], expected: dict[str, tuple[float, float]]):
    """Two :func:`snapshot` results agree: the same parameters, the same counts, the sums to 1e-6 (relative)."""
    assert measured.keys() == expected.keys()
    for name, (sum_sq, count) in measured.items():
        assert count == expected[name][1] and sum_sq == pytest.approx(expected[name][0], rel=1e-6), name
