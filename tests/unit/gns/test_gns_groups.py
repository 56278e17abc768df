"""The GNS per norm group (``gns/block``, ``gns/final``, ``gns/other``): the classification of the patched norms, the
groups' per-example statistics and per-step estimates against torch.func, ``gns_signal``, and checkpoints."""

from __future__ import annotations

import copy
import logging
import math
from types import SimpleNamespace

import pytest

from hf_gns_spam import GNSCallback, patch_model, per_example_grad_stats
from hf_gns_spam.cli import main as cli_main
from hf_gns_spam.gns.arguments import CALLBACK_DEFAULTS, NORM_GROUPS, GNSConfig
from hf_gns_spam.gns.estimator import GradientNoiseScale, unbiased_estimates
from hf_gns_spam.gns.groups import norm_groups
from hf_gns_spam.gns.saved_state import RunShape, check_resume
from hf_gns_spam.gns.schedule import BatchSizeSchedule
from tests.support import model_zoo
from tests.support.first_step import first_trainer_step
from tests.support.model_zoo import EXPECTED_GROUPS, group_parameters
from tests.support.references import expected_sum_sq, per_example_gradients, weighted_small_big
from tests.support.trainers import make_trainer


@pytest.mark.parametrize("architecture", sorted(EXPECTED_GROUPS))
def test_each_patched_norm_is_classified_by_structure(architecture):
    model = model_zoo.build(architecture)
    report = patch_model(model)
    assert norm_groups(model) == EXPECTED_GROUPS[architecture]
    assert sorted(norm_groups(model)) == sorted(p.name for p in report.patched)


@pytest.mark.parametrize("architecture", model_zoo.BOTH_NORM_KINDS)
def test_group_statistics_equal_torch_func_per_example_gradients(architecture):
    """Σ_b ‖G_b‖² over each group's norm parameters (the sums the callback adds per group) against float64
    torch.func per-example gradients of that group's parameters."""
    model = model_zoo.build(architecture)
    reference = copy.deepcopy(model)
    patch_model(model)
    inputs = model_zoo.batch(architecture, batch_size=4)
    model(**inputs).loss.backward()  # the model's loss: a mean over the batch's label tokens
    stats = per_example_grad_stats(model)
    groups = norm_groups(model)
    for group in ("block", "final"):
        names = group_parameters(reference, architecture, group)
        assert names and all(groups[n.rpartition(".")[0]] == group for n in names)
        measured = sum(float(stats[n].sum_sq) for n in names)
        expected = sum(expected_sum_sq(reference, inputs, "tokens", names).values())
        assert measured == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("architecture", model_zoo.BOTH_NORM_KINDS)
def test_first_step_group_estimates_equal_torch_func(tmp_path, architecture):
    """A real Trainer step (accumulation 2, clipping on): each group's small, big, |G|², tr Σ and logged gns/<group>,
    gns/<group>_grad_sq and gns/<group>_trace_sigma equal the estimates from per-example gradients of that group's
    parameters computed with torch.func; the default signal is the block group's."""
    initial, callback, trainer, batch, weights = first_trainer_step(tmp_path, architecture)
    assert callback.estimates.groups_present == ("block", "final")
    measured = callback.estimates.history[0]
    logged = next(r for r in trainer.state.log_history if "loss" in r)
    assert {f"gns/{g}{s}" for g in ("block", "final") for s in ("", "_grad_sq", "_trace_sigma")} <= set(logged)
    assert not any(key.startswith("gns/other") for key in logged)
    smalls, bigs = [], []
    for group in ("block", "final"):
        per_example = per_example_gradients(initial, batch, group_parameters(initial, architecture, group))
        small, big, effective_batch = weighted_small_big(per_example, weights)
        grad_sq, trace_sigma = unbiased_estimates(small, big, effective_batch)
        assert measured[f"small/{group}"] == pytest.approx(small, rel=1e-4)
        assert measured[f"big/{group}"] == pytest.approx(big, rel=1e-4)
        estimator = callback.estimates.group_estimators[group]  # one update, bias-corrected: the step's own estimates
        assert estimator.grad_sq == pytest.approx(grad_sq, rel=1e-4, abs=1e-9)
        assert estimator.trace_sigma == pytest.approx(trace_sigma, rel=1e-4)
        assert logged[f"gns/{group}"] == pytest.approx(trace_sigma / grad_sq if grad_sq > 0 else math.inf, rel=1e-3)
        assert logged[f"gns/{group}_grad_sq"] == pytest.approx(grad_sq, rel=1e-4, abs=1e-9)
        assert logged[f"gns/{group}_trace_sigma"] == pytest.approx(trace_sigma, rel=1e-4)
        smalls.append(measured[f"small/{group}"])
        bigs.append(measured[f"big/{group}"])
    # the default signal (what a "gns" schedule follows unless told otherwise) is the block group's estimate,
    # checked against torch.func above
    assert callback.gns_signal == "block" and callback.signal_estimator is callback.estimates.group_estimators["block"]
    # the groups split the all-norm sums (every patched norm of these models is in block or final)
    assert sum(smalls) == pytest.approx(measured["small"], rel=1e-6)
    assert sum(bigs) == pytest.approx(measured["big"], rel=1e-6)


def estimator_with_gns(gns: float) -> GradientNoiseScale:
    """An estimator whose one update gives tr Σ / |G|² = gns (effective batch 4, |G|² = 1)."""
    estimator = GradientNoiseScale(ema_decay=0.9)
    # small = |G|² + tr Σ, big = |G|² + tr Σ / 4
    estimator.update(1.0 + gns, 1.0 + gns / 4, 4.0)
    assert estimator.gns == pytest.approx(gns)
    return estimator


@pytest.mark.parametrize(("signal", "expected"), [("all", 3), ("block", 8), ("final", 2)])
def test_the_schedule_follows_the_chosen_signal(signal, expected, tmp_path):
    """A "gns" decision (micro-batch 1, one process: accumulation = batch) with GNS 3 over all norms, 10 for the
    blocks and 1.5 for the final norm, gns_multiplier 1, current batch 2, at most ×4 per decision: 3, 8 (the cap)
    and 2 (never decreasing)."""
    callback = GNSCallback(
        schedule="gns",
        min_batch_size=2,
        max_batch_size=64,
        update_interval=1,
        warmup_steps=0,
        gns_multiplier=1.0,
        max_growth=4,
        gns_signal=signal,
    )
    model = model_zoo.build("llama")
    patch_model(model)
    callback.attach(
        make_trainer(tmp_path, model, callback, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    )
    callback.driver.controller = SimpleNamespace(accumulation=2, progress=10, loop=SimpleNamespace(budget=1000))
    callback.estimates.estimator = estimator_with_gns(3.0)
    callback.estimates.group_estimators["block"] = estimator_with_gns(10.0)
    callback.estimates.group_estimators["final"] = estimator_with_gns(1.5)
    target = callback.driver._target(SimpleNamespace(global_step=5))
    assert callback.driver.rule == BatchSizeSchedule("gns", 2, 64, 1, 1, 0, 1.0, 4.0)
    estimates = callback.estimates
    assert callback.signal_estimator is (estimates.estimator if signal == "all" else estimates.group_estimators[signal])
    assert target == callback.driver.rule.target_accumulation(2, 5, 10, 1000, callback.signal_estimator.gns, True)
    assert target == expected


def test_gns_signal_is_checked_by_the_torch_free_checks_and_against_the_model(tmp_path):
    for make in (GNSConfig, GNSCallback):
        with pytest.raises(ValueError, match="gns_signal must be one of 'all', 'block', 'final', 'other', got 'x'"):
            make(gns_signal="x")
    model = model_zoo.build("llama")
    patch_model(model)
    schedule = {"schedule": "gns", "min_batch_size": 4, "max_batch_size": 16}
    with pytest.raises(ValueError, match="gns_signal='other', but the model has no patched norm in that group"):
        make_trainer(tmp_path, model, GNSCallback(gns_signal="other", **schedule))
    make_trainer(tmp_path, model, GNSCallback(gns_signal="final", **schedule))  # llama has one
    make_trainer(tmp_path, model, GNSCallback(gns_signal="other"))  # measuring only: the signal drives nothing


def test_the_launcher_checks_gns_signal(capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["launch", "--gns-schedule", "gns", "--gns-signal", "x", "train.py"])
    assert exited.value.code == 2
    assert "--gns-signal must be one of 'all', 'block', 'final', 'other', got 'x'" in capsys.readouterr().err


def test_checkpoint_state_round_trips_the_group_estimates_and_old_checkpoints_load(tmp_path, caplog):
    model = model_zoo.build("gpt2")
    patch_model(model)
    callback = GNSCallback(gns_signal="block", ema_decay=0.5)
    trainer = make_trainer(tmp_path, model, callback, max_steps=2)
    trainer.train()
    group_estimators = callback.estimates.group_estimators
    assert group_estimators["block"].updates == 2 and group_estimators["other"].updates == 0
    logged = [r for r in trainer.state.log_history if "loss" in r][-1]  # the groups' EMAs after 2 updates
    for group in ("block", "final"):
        assert logged[f"gns/{group}_grad_sq"] == callback.estimates.group_estimators[group].grad_sq
        assert logged[f"gns/{group}_trace_sigma"] == callback.estimates.group_estimators[group].trace_sigma
    state = callback.state()
    restored = GNSCallback.from_state(state)
    restored._restore(state["attributes"])
    assert restored.gns_signal == "block" and restored.estimates.groups_present == ("block", "final")
    for group in NORM_GROUPS:
        assert restored.estimates.group_estimators[group] == callback.estimates.group_estimators[group]
    assert restored.estimates.group_metrics() == callback.estimates.group_metrics()

    old = copy.deepcopy(state)  # a checkpoint from before the norm groups
    del old["args"]["gns_signal"], old["attributes"]["group_estimator_states"], old["attributes"]["groups_present"]
    restored = GNSCallback.from_state(old)  # as transformers restores it: the saved args, the defaults for the rest
    restored._restore(old["attributes"])
    assert restored.gns_signal == CALLBACK_DEFAULTS["gns_signal"]
    assert restored.estimates.estimator == callback.estimates.estimator
    assert all(restored.estimates.group_estimators[g] == GradientNoiseScale(ema_decay=0.5) for g in NORM_GROUPS)
    # a scheduled run resumed from such a checkpoint is told that the signal it follows changes there
    old["args"].update(schedule="gns", min_batch_size=4, max_batch_size=16)
    for signal, warned in (("block", True), ("all", False)):
        restored = GNSCallback(**{**old["args"], "gns_signal": signal})
        with caplog.at_level(logging.WARNING, logger="hf_gns_spam.gns.saved_state"):
            caplog.clear()
            check_resume(old, restored.config, RunShape(**old["run"]), "checkpoint-2/trainer_state.json")
        assert ("its batch followed the GNS of every patched norm (gns_signal='all')" in caplog.text) is warned
