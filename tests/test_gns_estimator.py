"""The GNS estimator: its formulas, and unbiasedness on a real model against torch.func ground truth."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_gns_spam import patch_model, per_example_grad_stats, reset_per_example_grad_stats
from hf_gns_spam.gns import GradientNoiseScale, unbiased_estimates
from tests import model_zoo
from tests.test_per_example_stats import token_losses


def test_estimates_from_known_gradients():
    """Exact identities for a batch of explicit per-example gradients."""
    generator = torch.Generator().manual_seed(0)
    per_example = torch.randn(6, 40, generator=generator, dtype=torch.float64) + 0.3
    small = per_example.square().sum(1).mean().item()
    big = per_example.mean(0).square().sum().item()
    grad_sq, trace_sigma = unbiased_estimates(small, big, 6)
    sample_mean = per_example.mean(0)
    # tr Σ estimate = the unbiased sample variance summed over coordinates
    assert trace_sigma == pytest.approx((per_example - sample_mean).square().sum(1).sum().item() / 5, rel=1e-12)
    # |G|² estimate = ‖mean‖² − tr Σ / B
    assert grad_sq == pytest.approx(big - trace_sigma / 6, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 examples"):
        unbiased_estimates(small, big, 1)


def test_ema_ratio_bias_correction_and_skips():
    estimator = GradientNoiseScale(ema_decay=0.9)
    assert math.isnan(estimator.gns)
    assert estimator.update(small=3.0, big=1.0, batch_size=4)
    grad_sq, trace_sigma = unbiased_estimates(3.0, 1.0, 4)
    assert estimator.grad_sq == pytest.approx(grad_sq) and estimator.trace_sigma == pytest.approx(trace_sigma)
    assert not estimator.update(small=float("inf"), big=1.0, batch_size=4)
    assert estimator.skipped == 1 and estimator.updates == 1
    estimator.update(small=5.0, big=1.5, batch_size=8)
    g2, s2 = unbiased_estimates(5.0, 1.5, 8)
    expected_g = (0.9 * 0.1 * grad_sq + 0.1 * g2) / (1 - 0.81)
    expected_s = (0.9 * 0.1 * trace_sigma + 0.1 * s2) / (1 - 0.81)
    assert estimator.grad_sq == pytest.approx(expected_g) and estimator.trace_sigma == pytest.approx(expected_s)
    assert estimator.gns == pytest.approx(expected_s / expected_g)
    with pytest.raises(ValueError, match="ema_decay"):
        GradientNoiseScale(ema_decay=1.0)


@pytest.mark.slow
def test_per_step_estimates_are_unbiased_on_a_patched_model():
    """Mean over many steps of |G|² and tr Σ from the patched norms vs the dataset's exact values (3 s.e.)."""
    dataset_size, batch_size, steps = 24, 4, 300
    reference = model_zoo.build("llama")
    model = copy.deepcopy(reference)
    patch_model(model)
    data = model_zoo.batch("llama", batch_size=dataset_size, length=8)
    data["attention_mask"] = torch.ones_like(data["attention_mask"])
    data["labels"] = data["input_ids"].clone()
    norm_names = list(per_example_grad_stats(model))

    # ground truth: per-example gradients g_i of each example's mean token loss, from torch.func
    params = {n: p.detach() for n, p in reference.named_parameters()}

    def example_loss(tracked, i):
        example = {k: v[i : i + 1] for k, v in data.items() if k != "labels"}
        logits = torch.func.functional_call(reference, {**params, **tracked}, args=(), kwargs=example).logits
        return token_losses(logits, data["labels"][i : i + 1]).sum() / 7

    per_example = torch.stack(
        [
            torch.cat(
                [g.flatten() for g in torch.func.grad(example_loss)({n: params[n] for n in norm_names}, i).values()]
            )
            for i in range(dataset_size)
        ]
    ).double()
    true_grad_sq = per_example.mean(0).square().sum().item()
    true_trace_sigma = (per_example - per_example.mean(0)).square().sum(1).mean().item()

    generator = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(steps):
        rows = torch.randint(0, dataset_size, (batch_size,), generator=generator)  # i.i.d. examples
        batch = {k: v[rows] for k, v in data.items()}
        model.zero_grad(set_to_none=True)
        reset_per_example_grad_stats(model)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        (token_losses(logits, batch["labels"]).sum(1) / 7).mean().backward()
        stats = per_example_grad_stats(model)
        # each example's contribution is g_b / B, so mean_b ‖g_b‖² = B · Σ_b ‖contribution_b‖²
        small = batch_size * sum(s.sum_sq.item() for s in stats.values())
        big = sum(p.grad.double().square().sum().item() for n, p in model.named_parameters() if n in stats)
        estimates.append(unbiased_estimates(small, big, batch_size))
    values = torch.tensor(estimates, dtype=torch.float64)
    means, standard_errors = values.mean(0), values.std(0) / math.sqrt(steps)
    assert abs(means[0].item() - true_grad_sq) < 3 * standard_errors[0].item(), (means[0], true_grad_sq)
    assert abs(means[1].item() - true_trace_sigma) < 3 * standard_errors[1].item(), (means[1], true_trace_sigma)
    # the test has power: |G|² is resolved to 30%, tr Σ to 10%
    assert standard_errors[0].item() < 0.3 * true_grad_sq and standard_errors[1].item() < 0.1 * true_trace_sigma
