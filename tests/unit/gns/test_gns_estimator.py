"""The GNS estimator: its formulas for weighted examples (exact by enumeration, unbiased by Monte-Carlo and on a real
model against torch.func ground truth), outlier clipping, staleness and checkpoint state."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch

from hf_gns_spam import patch_model, per_example_grad_stats, reset_per_example_grad_stats
from hf_gns_spam.gns import GradientNoiseScale, effective_batch_size, unbiased_estimates
from tests.support import model_zoo
from tests.support.references import token_losses


def weighted_step(per_example: torch.Tensor, weights: torch.Tensor) -> tuple[float, float, float]:
    """(small, big, B_eff) of one step: per-example gradients [B, D], loss weights [B] (any sum)."""
    total = weights.sum()
    small = per_example.square().sum(1).mean().item()
    big = ((weights[:, None] * per_example).sum(0) / total).square().sum().item()
    return small, big, effective_batch_size(total.item(), weights.square().sum().item())


def test_estimates_from_known_gradients():
    """Equal weights: exact identities for a batch of explicit per-example gradients."""
    generator = torch.Generator().manual_seed(0)
    per_example = torch.randn(6, 40, generator=generator, dtype=torch.float64) + 0.3
    small, big, effective_batch = weighted_step(per_example, torch.full((6,), 0.7, dtype=torch.float64))
    assert effective_batch == pytest.approx(6.0, rel=1e-15)
    grad_sq, trace_sigma = unbiased_estimates(small, big, effective_batch)
    sample_mean = per_example.mean(0)
    # tr Σ estimate = the unbiased sample variance summed over coordinates
    assert trace_sigma == pytest.approx((per_example - sample_mean).square().sum(1).sum().item() / 5, rel=1e-12)
    # |G|² estimate = ‖mean‖² − tr Σ / B
    assert grad_sq == pytest.approx(big - trace_sigma / 6, rel=1e-12)
    for invalid in (1.0, 0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match=rf"effective batch .* got {invalid}"):
            unbiased_estimates(small, big, invalid)
    with pytest.raises(ValueError, match=r"squared example weights must be positive, got 0\.0"):
        effective_batch_size(0.0, 0.0)


def test_weighted_estimates_are_exactly_unbiased_by_enumeration():
    """Every ordered draw of 3 examples from a population of 5 (i.i.d. uniform), fixed unequal weights summing to
    2.5: the exact average of the per-step estimates is the population |G|² and tr Σ (1/5 covariance)."""
    generator = torch.Generator().manual_seed(3)
    population = torch.randn(5, 4, generator=generator, dtype=torch.float64) + torch.tensor([0.5, -1.0, 0.0, 2.0])
    weights = torch.tensor([0.2, 0.7, 1.6], dtype=torch.float64)
    mean = population.mean(0)
    true_grad_sq = mean.square().sum().item()
    true_trace_sigma = (population - mean).square().sum(1).mean().item()
    weighted, equal = [], []
    for rows in itertools.product(range(5), repeat=3):
        small, big, effective_batch = weighted_step(population[list(rows)], weights)
        weighted.append(unbiased_estimates(small, big, effective_batch))
        equal.append(unbiased_estimates(small, big, 3))
    expectation = torch.tensor(weighted, dtype=torch.float64).mean(0)
    assert effective_batch == pytest.approx(2.5**2 / (0.04 + 0.49 + 2.56), rel=1e-15)
    assert expectation[0].item() == pytest.approx(true_grad_sq, rel=1e-12)
    assert expectation[1].item() == pytest.approx(true_trace_sigma, rel=1e-12)
    # the equal-weight formulas are biased here, so the check above can fail
    equal_expectation = torch.tensor(equal, dtype=torch.float64).mean(0)
    assert abs(equal_expectation[1].item() / true_trace_sigma - 1) > 0.2
    assert abs(equal_expectation[0].item() / true_grad_sq - 1) > 0.05


def simulated_steps(
    steps: int, seed: int = 0, gns: float = 2500.0
) -> tuple[list[tuple[float, float, float]], float, float]:
    """A stationary stream of (small, big, B_eff) with a true GNS of ``gns``: batch 32 as 4 micro-batches of 8, each
    the mean over its label tokens and the 4 summed (a_b = n_b / N_micro, A = 4), lengths n_b uniform in 16..512
    independent of the gradients, which are i.i.d. N(G, I) in D = 512 dimensions with |G|² = 512 / gns."""
    dimension, batch, micro = 512, 32, 8
    true_trace_sigma = float(dimension)
    true_grad_sq = true_trace_sigma / gns
    mean = torch.full((dimension,), math.sqrt(true_grad_sq / dimension), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    stream = []
    for start in range(0, steps, 500):
        chunk = min(500, steps - start)
        lengths = torch.randint(16, 513, (chunk, batch // micro, micro), generator=generator).double()
        weights = (lengths / lengths.sum(-1, keepdim=True)).reshape(chunk, batch)
        gradients = mean + torch.randn(chunk, batch, dimension, generator=generator, dtype=torch.float64)
        total = weights.sum(1)
        small = gradients.square().sum(-1).mean(1)
        big = ((weights[..., None] * gradients).sum(1) / total[:, None]).square().sum(-1)
        effective = total.square() / weights.square().sum(1)
        stream += zip(small.tolist(), big.tolist(), effective.tolist(), strict=True)
    return stream, true_grad_sq, true_trace_sigma


def test_token_weighted_estimates_are_unbiased_in_a_simulation():
    """4000 simulated steps: mean per-step estimates within 3 s.e. of the truth; the equal-weight formula (B = 32)
    misses tr Σ by far more than 3 s.e. (the weights matter and the test can see it)."""
    steps = 4000
    stream, true_grad_sq, true_trace_sigma = simulated_steps(steps)
    values = torch.tensor([unbiased_estimates(*step) for step in stream], dtype=torch.float64)
    means, standard_errors = values.mean(0), values.std(0) / math.sqrt(steps)
    assert abs(means[0].item() - true_grad_sq) < 3 * standard_errors[0].item(), (means[0], true_grad_sq)
    assert abs(means[1].item() - true_trace_sigma) < 3 * standard_errors[1].item(), (means[1], true_trace_sigma)
    assert standard_errors[0].item() < 0.2 * true_grad_sq  # |G|² is resolved
    equal = torch.tensor([unbiased_estimates(small, big, 32) for small, big, _ in stream], dtype=torch.float64)
    assert abs(equal[:, 1].mean().item() - true_trace_sigma) > 10 * standard_errors[1].item()
    assert equal[:, 0].mean().item() > 5 * true_grad_sq


def patched_llama_and_exact_moments(dataset_size: int) -> tuple[torch.nn.Module, dict, float, float]:
    """A patched tiny LLaMA, a data set of full-length sequences, and the data set's exact |G|² and tr Σ of the
    patched norms' per-example gradients (torch.func on an unpatched copy)."""
    reference = model_zoo.build("llama")
    model = copy.deepcopy(reference)
    patch_model(model)
    data = model_zoo.batch("llama", batch_size=dataset_size, length=8)
    data["attention_mask"] = torch.ones_like(data["attention_mask"])
    data["labels"] = data["input_ids"].clone()
    norm_names = list(per_example_grad_stats(model))
    per_example = exact_per_example_gradients(reference, data, norm_names)
    true_grad_sq = per_example.mean(0).square().sum().item()
    true_trace_sigma = (per_example - per_example.mean(0)).square().sum(1).mean().item()
    return model, data, true_grad_sq, true_trace_sigma


@pytest.mark.slow
def test_weighted_estimates_are_unbiased_on_a_patched_model():
    """A real model, loss L = Σ_b a_b ℓ_b with random weights a_b = n_b / 10 (n_b uniform in 1..16, independent of
    the examples): small = Σ_b ‖a_b g_b‖² / Σ_b a_b² from the patched norms (as GNSCallback computes it),
    big = ‖grad‖² / (Σ a_b)², and B_eff; the mean per-step |G|² and tr Σ are within 3 s.e. of the dataset's exact
    values (torch.func)."""
    dataset_size, batch_size, steps = 24, 4, 300
    model, data, true_grad_sq, true_trace_sigma = patched_llama_and_exact_moments(dataset_size)

    generator = torch.Generator().manual_seed(1)
    weighted, equal = [], []
    for _ in range(steps):
        rows = torch.randint(0, dataset_size, (batch_size,), generator=generator)  # i.i.d. examples
        weights = torch.randint(1, 17, (batch_size,), generator=generator).double() / 10
        batch = {k: v[rows] for k, v in data.items()}
        model.zero_grad(set_to_none=True)
        reset_per_example_grad_stats(model)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        ((token_losses(logits, batch["labels"]).sum(1) / 7) * weights.float()).sum().backward()
        stats = per_example_grad_stats(model)
        # example b's contribution is a_b g_b: the norms' sum is Σ_b a_b²‖g_b‖²
        small = sum(s.sum_sq.item() for s in stats.values()) / weights.square().sum().item()
        grad_sq_norm = sum(p.grad.double().square().sum().item() for n, p in model.named_parameters() if n in stats)
        big = grad_sq_norm / weights.sum().item() ** 2
        effective_batch = effective_batch_size(weights.sum().item(), weights.square().sum().item())
        weighted.append(unbiased_estimates(small, big, effective_batch))
        equal.append(unbiased_estimates(small, big, batch_size))
    values = torch.tensor(weighted, dtype=torch.float64)
    means, standard_errors = values.mean(0), values.std(0) / math.sqrt(steps)
    assert abs(means[0].item() - true_grad_sq) < 3 * standard_errors[0].item(), (means[0], true_grad_sq)
    assert abs(means[1].item() - true_trace_sigma) < 3 * standard_errors[1].item(), (means[1], true_trace_sigma)
    # the test has power: |G|² is resolved to 30%, tr Σ to 3%, and the equal-weight tr Σ (9% low) is rejected
    assert standard_errors[0].item() < 0.3 * true_grad_sq and standard_errors[1].item() < 0.03 * true_trace_sigma
    equal_trace_sigma = torch.tensor(equal, dtype=torch.float64)[:, 1].mean().item()
    assert abs(equal_trace_sigma - true_trace_sigma) > 3 * standard_errors[1].item()


def exact_per_example_gradients(model: torch.nn.Module, data: dict, names: list[str]) -> torch.Tensor:
    """[examples, parameters] float64: the gradient of each example's mean token loss w.r.t. ``names``."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def example_loss(tracked, i):
        example = {k: v[i : i + 1] for k, v in data.items() if k != "labels"}
        logits = torch.func.functional_call(model, {**params, **tracked}, args=(), kwargs=example).logits
        return token_losses(logits, data["labels"][i : i + 1]).sum() / 7

    gradients = [torch.func.grad(example_loss)({n: params[n] for n in names}, i) for i in range(len(data["labels"]))]
    return torch.stack([torch.cat([g.flatten() for g in gradient.values()]) for gradient in gradients]).double()


@pytest.mark.slow
def test_per_step_estimates_are_unbiased_on_a_patched_model():
    """Equal weights (B_eff = B): mean over many steps of |G|² and tr Σ from the patched norms vs the dataset's exact
    values (3 s.e.)."""
    dataset_size, batch_size, steps = 24, 4, 300
    model, data, true_grad_sq, true_trace_sigma = patched_llama_and_exact_moments(dataset_size)

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
        estimates.append(unbiased_estimates(small, big, effective_batch=batch_size))
    values = torch.tensor(estimates, dtype=torch.float64)
    means, standard_errors = values.mean(0), values.std(0) / math.sqrt(steps)
    assert abs(means[0].item() - true_grad_sq) < 3 * standard_errors[0].item(), (means[0], true_grad_sq)
    assert abs(means[1].item() - true_trace_sigma) < 3 * standard_errors[1].item(), (means[1], true_trace_sigma)
    # the test has power: |G|² is resolved to 30%, tr Σ to 10%
    assert standard_errors[0].item() < 0.3 * true_grad_sq and standard_errors[1].item() < 0.1 * true_trace_sigma


def test_ema_ratio_bias_correction_and_skips():
    estimator = GradientNoiseScale(ema_decay=0.9)
    assert math.isnan(estimator.gns)
    assert estimator.update(small=3.0, big=1.0, effective_batch=4)
    grad_sq, trace_sigma = unbiased_estimates(3.0, 1.0, 4)
    assert estimator.grad_sq == pytest.approx(grad_sq) and estimator.trace_sigma == pytest.approx(trace_sigma)
    assert not estimator.update(small=float("inf"), big=1.0, effective_batch=4)
    assert estimator.skipped == 1 and estimator.updates == 1
    estimator.update(small=5.0, big=1.5, effective_batch=7.5)
    g2, s2 = unbiased_estimates(5.0, 1.5, 7.5)
    expected_g = (0.9 * 0.1 * grad_sq + 0.1 * g2) / (1 - 0.81)
    expected_s = (0.9 * 0.1 * trace_sigma + 0.1 * s2) / (1 - 0.81)
    assert estimator.grad_sq == pytest.approx(expected_g) and estimator.trace_sigma == pytest.approx(expected_s)
    assert estimator.gns == pytest.approx(expected_s / expected_g)
    with pytest.raises(ValueError, match=r"effective batch .* got 1.0$"):
        estimator.update(small=5.0, big=1.5, effective_batch=1)
    with pytest.raises(ValueError, match="ema_decay"):
        GradientNoiseScale(ema_decay=1.0)
    with pytest.raises(ValueError, match=r"outlier_threshold must be > 1 .* got 1.0"):
        GradientNoiseScale(outlier_threshold=1.0)
    with pytest.raises(ValueError, match="outlier_warmup must be >= 1 update, got 0"):
        GradientNoiseScale(outlier_warmup=0)


def run(estimator: GradientNoiseScale, steps: list[tuple[float, float, float]]) -> GradientNoiseScale:
    for step in steps:
        estimator.update(*step)
    return estimator


def test_a_single_spike_barely_moves_the_estimate():
    """A step with 1000 × a normal step's small and big inserted into a stationary stream (true GNS 300, where the
    smoothed GNS is well determined), at 7 places: 5 and 110 steps later the GNS differs by < 5% from the run without
    it, and only the spike is clipped. Without clipping the spike still dominates 110 steps later (tr Σ more than
    doubled everywhere) and moves the GNS by more than 50% somewhere."""
    stream, _, _ = simulated_steps(3000, seed=1, gns=300.0)
    unclipped_changes = []
    for position in range(200, 3000, 400):
        small, big, effective_batch = stream[position]
        spike = [(1000 * small, 1000 * big, effective_batch)]
        for later in (5, 110):
            before, after = stream[:position], stream[position : position + later]
            reference = run(GradientNoiseScale(), before + after)
            spiked = run(GradientNoiseScale(), before + spike + after)
            assert abs(spiked.gns / reference.gns - 1) < 0.05, (position, later, spiked.gns, reference.gns)
            assert spiked.clipped == 1 and reference.clipped == 0
            unclipped = run(GradientNoiseScale(outlier_threshold=math.inf), before + spike + after)
            assert unclipped.trace_sigma > 2 * reference.trace_sigma
            unclipped_changes.append(abs(unclipped.gns / reference.gns - 1))
    assert max(unclipped_changes) > 0.5


def test_clipping_does_not_trigger_in_a_stationary_stream():
    """4000 steps without outliers: nothing is clipped, so the estimates equal those without clipping."""
    stream, _, _ = simulated_steps(4000)
    clipping, plain = run(GradientNoiseScale(), stream), run(GradientNoiseScale(outlier_threshold=math.inf), stream)
    assert clipping.clipped == 0 and clipping.updates == 4000
    assert clipping.state_dict() == plain.state_dict()


def test_clipping_bounds_follow_the_current_estimates():
    """After the warmup, small and big are clipped to τ × (g⁺ + s⁺) and τ × (g⁺ + s⁺/B_eff): a step entirely above
    both enters as exactly τ × the current estimates; before the warmup nothing is clipped."""
    estimator = run(GradientNoiseScale(ema_decay=0.9, outlier_threshold=4.0, outlier_warmup=3), [(10.0, 2.0, 8.0)] * 2)
    assert not estimator.update(math.nan, 1.0, 8.0)  # a skip does not count towards the warmup
    estimator.update(1e3, 2e2, 8.0)  # third update, 100 × the others: still unclipped
    assert estimator.clipped == 0
    grad_sq, trace_sigma, gns = estimator.grad_sq, estimator.trace_sigma, estimator.gns
    assert grad_sq > 0 and trace_sigma > 0
    estimator.update(1e9, 1e9, 5.0)
    assert estimator.clipped == 1
    debias_before, debias_after = 1 - 0.9**3, 1 - 0.9**4
    expected_g = (0.9 * grad_sq * debias_before + 0.1 * 4.0 * grad_sq) / debias_after
    expected_s = (0.9 * trace_sigma * debias_before + 0.1 * 4.0 * trace_sigma) / debias_after
    assert estimator.grad_sq == pytest.approx(expected_g, rel=1e-12)
    assert estimator.trace_sigma == pytest.approx(expected_s, rel=1e-12)
    assert estimator.gns == pytest.approx(gns, rel=1e-12)
    # only big too large: big ← 4·(g⁺ + s⁺/B_eff), small (= s⁺, below 4·(g⁺ + s⁺)) kept
    g, s = estimator.grad_sq, estimator.trace_sigma
    g_ema, s_ema = estimator.grad_sq_ema, estimator.trace_sigma_ema
    estimator.update(s, 1e9, 5.0)
    assert estimator.clipped == 2
    clipped_g, clipped_s = unbiased_estimates(s, 4.0 * (g + s / 5.0), 5.0)
    assert estimator.grad_sq_ema == pytest.approx(0.9 * g_ema + 0.1 * clipped_g, rel=1e-12)
    assert estimator.trace_sigma_ema == pytest.approx(0.9 * s_ema + 0.1 * clipped_s, rel=1e-12)
    # a negative |G|² average counts as 0 in the bounds: small ← 4·s⁺ = 80, big ← 4·s⁺/5 = 16
    negative = run(GradientNoiseScale(ema_decay=0.5, outlier_threshold=4.0, outlier_warmup=1), [(10.0, 0.0, 2.0)])
    assert (negative.grad_sq, negative.trace_sigma) == (-10.0, 20.0)
    negative.update(1e9, 1e9, 5.0)
    assert negative.clipped == 1
    assert negative.grad_sq_ema == pytest.approx(0.5 * -10.0 * 0.5 + 0.5 * 0.0, rel=1e-12)
    assert negative.trace_sigma_ema == pytest.approx(0.5 * 20.0 * 0.5 + 0.5 * 80.0, rel=1e-12)


def test_skipped_steps_make_the_estimate_stale():
    estimator = GradientNoiseScale()
    assert not estimator.is_current and estimator.consecutive_skips == 0
    estimator.update(3.0, 1.0, 4.0)
    assert estimator.is_current
    gns = estimator.gns
    assert not estimator.update(math.nan, 1.0, 4.0)
    assert not estimator.is_current and estimator.consecutive_skips == 1
    assert not estimator.update(2.0, math.inf, 4.0)
    estimator.skip()  # e.g. a step whose norms were frozen
    assert not estimator.is_current and estimator.consecutive_skips == 3 and estimator.skipped == 3
    assert estimator.gns == gns and estimator.updates == 1  # the EMAs are untouched
    assert estimator.update(3.0, 1.0, 4.0)
    assert estimator.is_current and estimator.consecutive_skips == 0 and estimator.skipped == 3
    never_updated = GradientNoiseScale()
    never_updated.skip()
    assert not never_updated.is_current and math.isnan(never_updated.gns)


def test_state_dict_restores_exactly():
    """Restore from a JSON round trip of state_dict() mid-run (after skips and a clipped spike): the restored and
    the original estimator then agree bit for bit."""
    stream, _, _ = simulated_steps(120, seed=2)
    original = run(GradientNoiseScale(ema_decay=0.95), stream[:60])
    original.update(math.nan, 1.0, 20.0)
    original.update(1e3 * stream[60][0], 1e3 * stream[60][1], stream[60][2])
    original.update(math.inf, 1.0, 20.0)
    state = json.loads(json.dumps(original.state_dict()))
    assert set(state) == {
        "grad_sq_ema",
        "trace_sigma_ema",
        "updates",
        "skipped",
        "consecutive_skips",
        "clipped",
    }
    assert all(type(value) in (int, float) for value in state.values())
    assert state["skipped"] == 2 and state["consecutive_skips"] == 1 and state["clipped"] == 1
    restored = GradientNoiseScale(ema_decay=0.95, **state)
    assert restored == original and not restored.is_current
    run(original, stream[61:])
    run(restored, stream[61:])
    assert restored == original and restored.gns == original.gns
