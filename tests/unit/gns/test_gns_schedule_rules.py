"""The rules of the batch-size schedules, decision by decision, against a brute-force reference."""

from __future__ import annotations

import dataclasses
import math
import random
from fractions import Fraction

import pytest

from hf_gns_spam.gns.arguments import GNSConfig
from hf_gns_spam.gns.schedule import RULES, BatchSizeSchedule
from tests.support.accumulation_properties import check_run
from tests.support.trainer_loop_simulation import simulate


def gns_schedule(**overrides) -> BatchSizeSchedule:
    settings = {"kind": "gns", "min_batch_size": 8, "max_batch_size": 256, "unit": 4, "update_interval": 1}
    return BatchSizeSchedule(**{**settings, **overrides})


def decide(schedule: BatchSizeSchedule, current: int, gns: float, step: int = 0, current_estimate: bool = True) -> int:
    return schedule.target_accumulation(current, step, 0.0, 1.0, gns, estimate_is_current=current_estimate)


def reference_decision(schedule: BatchSizeSchedule, current: int, gns: float) -> int:
    """Brute force over every allowed accumulation k: the batch k·unit nearest to the clamped target (ties: the
    larger), then the largest k with k ≤ max_growth · current (exact rational arithmetic), never below current."""
    lowest, highest = schedule.min_batch_size // schedule.unit, schedule.max_batch_size // schedule.unit
    candidates = range(lowest, highest + 1)
    target = min(max(schedule.gns_multiplier * gns, schedule.min_batch_size), schedule.max_batch_size)
    nearest = min(candidates, key=lambda k: (abs(k * schedule.unit - target), -k))
    cap = max(k for k in candidates if k <= Fraction(str(schedule.max_growth)) * current)
    return max(current, min(nearest, cap))


def test_an_infinite_or_huge_gns_grows_by_at_most_max_growth_per_decision():
    schedule = gns_schedule()
    for gns in (math.inf, 1e12):
        path = [2]
        while len(path) < 8:
            path.append(decide(schedule, path[-1], gns))
        assert path == [2, 4, 8, 16, 32, 64, 64, 64]  # × 2 per decision, then max_batch_size / unit
    slower = gns_schedule(max_growth=1.5)
    path = [2]
    while len(path) < 12:
        path.append(decide(slower, path[-1], math.inf))
    assert path == [2, 3, 4, 6, 9, 13, 19, 28, 42, 63, 64, 64]  # floor(1.5 k), clamped at 64
    # the cap is rounded down exactly: 1.4 × 45 = 63 (62.99999999999999 in floating point)
    exact = BatchSizeSchedule("gns", 3, 1000, 1, update_interval=1, max_growth=1.4)
    assert decide(exact, 45, math.inf) == 63


def test_decisions_match_the_brute_force_reference():
    """Random schedules, current batches and estimates (finite, huge, inf, below the bounds)."""
    generator = random.Random(0)
    for _ in range(3000):
        unit = generator.choice([1, 2, 3, 4, 8])
        lowest = generator.randint(1, 6)
        highest = lowest + generator.randint(0, 80)
        growth = generator.choice([2.0, 1.5, 3.0, 1.25, 1.4, 10.0])
        if growth < 1 + 1 / lowest or lowest * unit < 2:
            continue
        schedule = BatchSizeSchedule(
            "gns",
            lowest * unit,
            highest * unit,
            unit,
            update_interval=1,
            gns_multiplier=generator.choice([1.0, 0.5, 2.0]),
            max_growth=growth,
        )
        current = generator.randint(lowest, highest)
        gns = generator.choice([math.inf, 1e15, -5.0, 0.0, generator.uniform(0, 2 * highest * unit)])
        decision = decide(schedule, current, gns)
        assert decision == reference_decision(schedule, current, gns), (schedule, current, gns, decision)
        assert current <= decision <= highest and decision <= growth * current + 1e-9


def test_targets_round_to_the_nearest_unit_and_never_decrease():
    schedule = gns_schedule()
    assert decide(schedule, 2, 13.9) == 3  # batch 12 is nearer than 16
    assert decide(schedule, 2, 14.1) == 4
    assert decide(schedule, 2, 14.0) == 4  # a tie rounds up
    assert decide(schedule, 2, 1.0) == 2  # below min_batch_size: clamped
    assert decide(schedule, 10, 12.0) == 10  # a smaller target never shrinks the batch
    assert decide(schedule, 10, -3.0) == 10  # a negative GNS (negative tr Σ average) neither
    assert decide(gns_schedule(gns_multiplier=2.0), 3, 10.0) == 5  # 2 × 10 = 20 examples = 5 units


def test_no_decision_without_a_current_estimate():
    schedule = gns_schedule()
    assert decide(schedule, 2, math.nan) == 2
    assert decide(schedule, 2, math.inf, current_estimate=False) == 2
    assert decide(schedule, 2, 100.0, current_estimate=False) == 2
    assert decide(schedule, 2, 100.0) == 4
    with pytest.raises(TypeError, match="estimate_is_current"):
        schedule.target_accumulation(2, 0, 0.0, 1.0, 100.0)  # the flag is required


def test_decisions_only_every_update_interval_after_the_warmup():
    schedule = gns_schedule(update_interval=10, warmup_steps=25)
    decisions = {step: decide(schedule, 2, 100.0, step=step) for step in range(0, 61)}
    assert {step for step, k in decisions.items() if k != 2} == {30, 40, 50, 60}
    assert decisions[30] == 4


def test_a_fractional_warmup_waits_for_that_share_of_the_data():
    """warmup_steps in (0, 1) is a fraction of the budget in data (as TrainingArguments.warmup_steps): no decision
    before warmup × budget examples, whatever the step; a whole number >= 1 counts steps; anything else is refused."""
    schedule = gns_schedule(update_interval=10, warmup_steps=0.1)
    budget = 4480.0
    for step, samples, decides in ((10, 447.9, False), (60, 447.9, False), (60, 448.0, True), (10, 4000.0, True)):
        wanted = schedule.target_accumulation(2, step, samples, budget, 100.0, True)
        assert (wanted != 2) is decides, (step, samples)
        assert schedule.warming_up(step, samples, budget) is not decides
    assert gns_schedule(warmup_steps=20.0).warming_up(19, 1e9, budget)  # 20.0 is 20 steps, not a fraction
    assert not gns_schedule(warmup_steps=0).warming_up(0, 0.0, budget)
    for bad in (-0.5, -2, 2.5, math.inf, math.nan):  # -2: a whole number, but no count of steps
        with pytest.raises(ValueError, match="warmup_steps must be a whole number of optimizer steps"):
            gns_schedule(warmup_steps=bad)


def test_linear_is_unchanged_and_ignores_the_estimate():
    """B(s) = B_min + (B_max − B_min)·s/S rounded to whole units, never decreasing, whatever the estimate says."""
    schedule = BatchSizeSchedule("linear", 8, 256, 4)
    budget = 10_000.0
    for samples in (0.0, 1234.0, 5000.0, 9999.0, 20_000.0):
        progress = min(samples / budget, 1.0)
        expected = math.floor((8 + 248 * progress) / 4 + 0.5)
        for gns, current_estimate in ((math.nan, False), (math.inf, True), (3.0, True)):
            decision = schedule.target_accumulation(2, 7, samples, budget, gns, estimate_is_current=current_estimate)
            assert decision == expected
    assert schedule.target_accumulation(40, 7, 0.0, budget, math.inf, estimate_is_current=True) == 40
    assert schedule.target_accumulation(2, 7, 5000.0, 0.0, math.inf, estimate_is_current=True) == 2  # no budget


def test_validation_errors_say_the_valid_range():
    for growth in (1.0, 0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match=rf"max_growth must be in \(1, inf\), got {growth}"):
            gns_schedule(max_growth=growth)
    with pytest.raises(ValueError, match=r"schedule='gns' needs max_growth >= 2 .* got 1.5"):
        BatchSizeSchedule("gns", 4, 64, 4, max_growth=1.5)  # from 1 unit, 1.5 × could never add a unit
    assert BatchSizeSchedule("gns", 8, 64, 4, max_growth=1.5).max_growth == 1.5  # 2 units -> 3 is allowed
    assert BatchSizeSchedule("linear", 4, 64, 4, max_growth=1.5).max_growth == 1.5  # linear does not use it
    for interval in (0, 2.5, True):
        with pytest.raises(ValueError, match="update_interval must be an int >= 1"):
            gns_schedule(update_interval=interval)
    for multiplier in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="gns_multiplier must be a finite number > 0"):
            gns_schedule(gns_multiplier=multiplier)
    with pytest.raises(ValueError, match="min_batch_size=6 must be a positive multiple"):
        gns_schedule(min_batch_size=6)
    with pytest.raises(ValueError, match="max_batch_size=4 < min_batch_size=8"):
        gns_schedule(max_batch_size=4)
    with pytest.raises(ValueError, match="schedule must be None or one of 'linear', 'gns'"):
        gns_schedule(kind="cosine")


# ------------------------------------------------------------------------------------------ the rules table's users
def test_every_schedule_field_is_the_option_of_the_same_name():
    """A new knob of a rule is one GNSConfig field of the BatchSizeSchedule field's name: GNSConfig.batch_schedule
    passes every field but the kind and the unit on by name (this test names every field, so a new one must be
    added here too)."""
    fields = {f.name for f in dataclasses.fields(BatchSizeSchedule)} - {"kind", "unit"}
    values = {
        "min_batch_size": 4,
        "max_batch_size": 64,
        "update_interval": 3,
        "warmup_steps": 7,
        "gns_multiplier": 1.25,
        "max_growth": 3.0,
    }
    assert set(values) == fields
    made = GNSConfig(schedule="gns", **values).batch_schedule(2)
    assert {name: getattr(made, name) for name in fields} == values and (made.kind, made.unit) == ("gns", 2)
    assert GNSConfig().batch_schedule(2) is None


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_drives_the_shipped_driver_as_its_row_says(name):
    """For every row of RULES: GNSConfig accepts the name; a rule that follows the GNS refuses min_batch_size 1,
    moves the batch with the signal and not without one; a rule that does not is deaf to it; a foreseeable rule's
    expected steps at train start are the run's (the shipped driver in the simulated Trainer loop, with
    BatchSizeSchedule's own targets: 23 micro-batches of one example, 2 epochs, batch 2 -> 16)."""
    row = RULES[name]
    rule = GNSConfig(
        schedule=name, min_batch_size=2, max_batch_size=16, update_interval=1, warmup_steps=0
    ).batch_schedule(1)
    assert rule.foreseeable == row.foreseeable

    def run(gns: float):
        record = simulate(
            23, rule.min_accumulation, rule, signal=lambda: (gns, not math.isnan(gns)), num_train_epochs=2
        )
        check_run(record, rule.min_accumulation, foreseeable=rule.foreseeable)
        return [len(step.ids) for step in record.steps]

    with_signal, without = run(12.0), run(math.nan)
    if row.follows_gns:
        with pytest.raises(ValueError, match="min_batch_size >= 2"):
            GNSConfig(schedule=name, min_batch_size=1, max_batch_size=16)
        assert set(without) <= {rule.min_accumulation, 1} and max(with_signal) > rule.min_accumulation
    else:
        assert with_signal == without and max(without) > rule.min_accumulation
