"""GNSCallback in a real 2-process DDP run (torchrun, gloo, CPU): every rank computes the same estimate, all norms'
and each norm group's, and it equals one computed from per-example gradients of both ranks' examples."""

from __future__ import annotations

import pytest
import torch

from hf_gns_spam.gns.estimator import GradientNoiseScale
from tests.support import model_zoo
from tests.support.model_zoo import group_parameters
from tests.support.processes import torchrun
from tests.support.references import per_example_gradients, per_example_norm_gradients, weighted_small_big


@pytest.mark.slow
def test_two_processes_log_the_same_gns_and_end_identical(tmp_path):
    ranks = torchrun(tmp_path)
    assert ranks[0]["world_size"] == 2 and ranks[0]["max_relative_error"] < 1e-5
    assert ranks[0]["batch_size"] == [8] * len(ranks[0]["batch_size"])  # 2 processes x 2 micro-batches x 2
    assert len(ranks[0]["gns"]) == 8  # 32 examples / 8 per step x 2 epochs
    for key in ("gns", "gns_trace_sigma", "batch_size", "history"):
        assert ranks[0][key] == ranks[1][key], key
    assert all(step["small"] > 0 and step["big"] > 0 for step in ranks[0]["history"])
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name

    # the first step's small and big from per-example gradients of both ranks' examples (torch.func)
    micro_batches = [m for rank in ranks for m in rank["first_step_inputs"]]
    num_items_in_batch = float(micro_batches[0]["num_items_in_batch"])  # global with average_tokens_across_devices
    batch = {k: torch.cat([m[k] for m in micro_batches]) for k in ("input_ids", "attention_mask", "labels")}
    per_example = per_example_norm_gradients(model_zoo.build("llama"), batch)
    tokens = (batch["labels"][:, 1:] != -100).sum(1).double()
    small, big, effective_batch = weighted_small_big(per_example, tokens / num_items_in_batch)
    assert ranks[0]["history"][0]["small"] == pytest.approx(small, rel=1e-4)
    assert ranks[0]["history"][0]["big"] == pytest.approx(big, rel=1e-4)
    assert ranks[0]["history"][0]["effective_batch"] == pytest.approx(effective_batch, rel=1e-6)
    check_group_estimates_against_torch_func(ranks)


@pytest.mark.slow
def test_frozen_norms_under_ddp_give_one_process_first_step(tmp_path):
    """Norms frozen (as under LoRA): their gradients are local sinks, averaged over the 2 processes by the callback
    (DDP does not reduce them); the first step's small, big and effective batch equal those from per-example
    gradients of both ranks' examples (the norms' gradients as if trained), both ranks agree, the norms stay as they
    were."""
    ranks = torchrun(tmp_path, "none", "frozen")
    assert ranks[0]["max_relative_error"] < 1e-5  # the trained parameters' all-reduced gradients
    for key in ("gns", "gns_trace_sigma", "history"):
        assert ranks[0][key] == ranks[1][key], key
    initial = model_zoo.build("llama")
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
        if "norm" in name:
            assert torch.equal(value, dict(initial.named_parameters())[name]), name
    micro_batches = [m for rank in ranks for m in rank["first_step_inputs"]]
    num_items_in_batch = float(micro_batches[0]["num_items_in_batch"])
    batch = {k: torch.cat([m[k] for m in micro_batches]) for k in ("input_ids", "attention_mask", "labels")}
    per_example = per_example_norm_gradients(initial, batch)
    tokens = (batch["labels"][:, 1:] != -100).sum(1).double()
    small, big, effective_batch = weighted_small_big(per_example, tokens / num_items_in_batch)
    assert ranks[0]["history"][0]["small"] == pytest.approx(small, rel=1e-4)
    assert ranks[0]["history"][0]["big"] == pytest.approx(big, rel=1e-4)
    assert ranks[0]["history"][0]["effective_batch"] == pytest.approx(effective_batch, rel=1e-6)


def check_group_estimates_against_torch_func(ranks: list[dict]) -> None:
    """Every step's logged gns/<group>, gns/<group>_grad_sq and gns/<group>_trace_sigma (identical on both ranks)
    equal an independent reference: per-example gradients (torch.func, float64) of the group's norm parameters on
    both ranks' examples of the step, at the parameters the step saw, into the estimator's formulas and its EMA.

    Tolerance: rel 1e-4 (float32 sums against float64; measured: ~1e-6) on each step's small and big and on the
    smoothed values, and for |G|², a difference of nearly equal numbers that can be small beside tr Σ, also abs
    1e-4 × tr Σ. A wrong process count, a rank's examples left out or a group's sums mixed up are O(1) errors."""
    groups = ("block", "final")
    logged = ranks[0]["groups"]
    assert logged == ranks[1]["groups"]
    assert sorted(logged) == sorted(f"gns/{g}{s}" for g in groups for s in ("", "_grad_sq", "_trace_sigma"))
    steps = list(zip(ranks[0]["steps"], ranks[1]["steps"], strict=True))
    assert len(steps) == len(logged["gns/block"]) == 8
    estimators = {g: GradientNoiseScale(ema_decay=ranks[0]["ema_decay"]) for g in groups}
    for index, (mine, theirs) in enumerate(steps):
        model = model_zoo.build("llama")
        model.load_state_dict(mine["parameters"])
        micro_batches = mine["micro_batches"] + theirs["micro_batches"]
        batch = {k: torch.cat([m[k] for m in micro_batches]) for k in ("input_ids", "attention_mask", "labels")}
        weights = torch.cat(
            [(m["labels"][:, 1:] != -100).sum(1).double() / float(m["num_items_in_batch"]) for m in micro_batches]
        )
        for group in groups:
            per_example = per_example_gradients(model, batch, group_parameters(model, "llama", group))
            small, big, effective_batch = weighted_small_big(per_example, weights)
            assert ranks[0]["history"][index][f"small/{group}"] == pytest.approx(small, rel=1e-4), (index, group)
            assert ranks[0]["history"][index][f"big/{group}"] == pytest.approx(big, rel=1e-4), (index, group)
            estimator = estimators[group]
            estimator.update(small, big, effective_batch)
            trace_sigma = logged[f"gns/{group}_trace_sigma"][index]
            assert trace_sigma == pytest.approx(estimator.trace_sigma, rel=1e-4), (index, group)
            grad_sq = logged[f"gns/{group}_grad_sq"][index]
            assert grad_sq == pytest.approx(estimator.grad_sq, rel=1e-4, abs=1e-4 * abs(trace_sigma)), (index, group)
            assert logged[f"gns/{group}"][index] == pytest.approx(estimator.gns, rel=1e-4), (index, group)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["linear", "gns"])
def test_two_processes_take_the_same_batch_size_decisions(tmp_path, schedule):
    ranks = torchrun(tmp_path, schedule)
    for key in ("gns", "batch_size", "history", "samples"):
        assert ranks[0][key] == ranks[1][key], key
    sizes = ranks[0]["batch_size"]
    assert sizes[0] == 4 and max(sizes) > 4
    # 30 examples: accelerate gives each rank 8 micro-batches of 2 per epoch (the last rows repeated to even out)
    assert ranks[0]["samples"] == 64 == sum(sizes) == ranks[0]["rows"] + ranks[1]["rows"]
    # every step: the all-reduced gradient of exactly the micro-batches both ranks ran for it
    assert ranks[0]["max_relative_error"] < 1e-5 and ranks[1]["max_relative_error"] < 1e-5
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
