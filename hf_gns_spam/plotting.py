"""Plot training runs' loss, gradient noise scale and batch size, one run or several overlaid.

Reads the Trainer's ``trainer_state.json`` (its ``log_history``, where :class:`~hf_gns_spam.GNSCallback` puts
``gns``, ``gns_tokens``, ``batch_size`` and ``examples_seen`` beside ``loss``) and draws four panels: loss against
data and against optimizer steps (training loss as a line, held-out ``eval_loss`` as markers), the GNS and the batch
size against data. Comparing runs that grow the batch with fixed-batch runs needs both loss panels: a growing batch
buys fewer optimizer steps with more data.

The data axis, one unit shared by all the runs of a figure (:func:`shared_data_unit`):

* **tokens** (``num_input_tokens_seen``, logged with ``include_num_input_tokens_seen=True``) when every run counts
  them;
* else **examples** when every run's examples are known (a run that counts tokens is then drawn in examples too,
  and the axis label names the runs without tokens). :func:`examples_seen` gives a run's examples at the end of
  optimizer step s, E(s) = Σ_{t≤s} B(t), where B(t) is the batch of step t. ``GNSCallback`` logs in each training
  record (the ones with ``loss``, at the logging steps) ``examples_seen``, E at the record's step as the callback
  counted it (all processes; resumed runs go on counting), and ``batch_size``, the examples of that record's
  optimizer step alone. A record's ``examples_seen`` is its E, exactly, wherever the batch changed.

  Runs logged before ``examples_seen`` was (and records where it is nan: resumed from a checkpoint without the
  callback's state) reconstruct E from ``batch_size``: a record's batch is taken to have been in force since the
  step after the previous record, B(t) = batch_size of the first record at or after step t, so at a record's step
  s_i, E(s_i) = E(s_{i−1}) + (s_i − s_{i−1})·b_i (s_0 = 0, E(s_0) = 0). A schedule changes the batch from the step
  after a decision (``"gns"`` decides every ``update_interval`` steps), so the reconstruction is exact at every
  step with ``logging_steps=1``, and at every record when each change follows a logged step (``"gns"`` with
  ``update_interval`` a multiple of ``logging_steps``, and ``warmup_steps`` too where it counts steps) and no epoch
  ends on a shorter step between records. Otherwise it is off by the unlogged steps' differences from the next
  logged batch (a 2-to-16 ``"linear"`` ramp, 4 epochs of 60 examples, logged every 2 steps: by 4 of 228 examples at
  the end, from an epoch's shorter last step; holding the earlier record's batch instead: by 14).

  Between records (an evaluation that is not at a logging step), E(s) = E(s_i) − (s_i − s)·b_i from the following
  record s_i, not below E(s_{i−1}): exact when the batch did not change between s and s_i. After the last record,
  E(s) = E(s_last) + (s − s_last)·b_last. A run with no ``batch_size`` records (no ``GNSCallback``) has a fixed
  batch, B = ``train_batch_size`` × ``gradient_accumulation_steps`` × ``world_size`` from its
  ``trainer_state.json`` and the ``training_args.bin`` the Trainer saved next to it;
* else **optimizer steps**, labelled as such with the runs that record neither.

The comparison of several runs (:func:`loss_reached`, written under the figure by :func:`saving_text`): the target is
the first run's final held-out loss (its last ``eval_loss`` record); each run's optimizer steps and data to reach
it are where its held-out losses first reach the target, linearly interpolated between evaluations
(:func:`first_crossing`, the definition ``examples/pretrain_clm.py`` compares its runs with). Runs without held-out
evaluations get no comparison: their training loss is a mean over each logging interval on different batches, so
its first crossing would time a fluctuation as much as progress, and smoothing it would shift the crossing by the
window.

Log axes (the GNS; an infinite GNS, noise without signal, is left out) are labelled with plain numbers
(:func:`plain_number`: 2, 5.5, 20, 1,500) at powers of ten, 1-2-5 steps or every digit, whichever is the sparsest
to give 3 ticks, else linearly spaced ticks (:func:`readable_log_ticks`); data axes with compact counts
(:func:`compact_count`: 250k, 1.2M).
"""

from __future__ import annotations

import bisect
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

__all__ = [
    "DataUnit",
    "Reach",
    "Run",
    "compact_count",
    "data_axis_label",
    "data_values",
    "examples_seen",
    "find_trainer_state",
    "first_crossing",
    "load_run",
    "loss_reached",
    "plain_number",
    "plot_figure",
    "plot_run",
    "plot_runs",
    "readable_log_ticks",
    "saving_text",
    "shared_data_unit",
    "training_records",
]

DataUnit = Literal["tokens", "examples", "steps"]
UNIT_NAMES: dict[DataUnit, str] = {"tokens": "tokens", "examples": "examples", "steps": "optimizer steps"}


# the GNS panel's lines: every patched norm's estimate, and the per-block norms' (what a "gns" schedule follows by
# default), each drawn where the run logged it
GNS_LABELS = {"gns": "gns (all norms)", "gns/block": "gns/block"}


def find_trainer_state(run_dir: str | Path) -> Path:
    """``run_dir/trainer_state.json``, or the one in the run's latest ``checkpoint-*`` folder."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    direct = run_dir / "trainer_state.json"
    if direct.exists():
        return direct
    checkpoints = sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    if not checkpoints:
        raise FileNotFoundError(
            f"no trainer_state.json in {run_dir} or its checkpoint-* folders; "
            "the Trainer writes it with trainer.save_state() or at each checkpoint"
        )
    return checkpoints[-1]


def training_records(trainer_state: dict[str, Any]) -> list[dict[str, Any]]:
    """The log records of training steps (the ones with a ``loss``), in order."""
    return [record for record in trainer_state.get("log_history", []) if "loss" in record and "step" in record]


def is_positive(value: Any) -> bool:
    """A logged number above zero and finite (not None, nan, inf or a string)."""
    return isinstance(value, (int, float)) and 0 < value < math.inf


@dataclass(frozen=True)
class Run:
    """One run's log, as the plot reads it.

    ``records`` are its training records (with ``loss``), ``evaluations`` its held-out ones (with ``eval_loss``),
    both with a ``step``. ``fixed_batch_size`` is the examples per optimizer step from its Trainer arguments, read
    only for a run that logged no ``batch_size`` (None when those are logged or the arguments cannot be read)."""

    label: str
    records: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    fixed_batch_size: int | None

    @property
    def counts_tokens(self) -> bool:
        return all(is_positive(record.get("num_input_tokens_seen")) for record in self.records)

    @property
    def logs_batch_sizes(self) -> bool:
        return all(is_positive(record.get("batch_size")) for record in self.records)

    @property
    def knows_examples(self) -> bool:
        return self.logs_batch_sizes or self.fixed_batch_size is not None


def arguments_batch_size(state_path: Path, trainer_state: dict[str, Any]) -> int | None:
    """``train_batch_size`` (per device, from trainer_state.json) × ``gradient_accumulation_steps`` × ``world_size``
    (from the ``training_args.bin`` the Trainer pickled beside it); None without a readable ``training_args.bin``.

    Unpickles that file (``torch.load(weights_only=False)``): read it only from runs you trust, as the Trainer's
    own checkpoints."""
    args_path = state_path.parent / "training_args.bin"
    if not args_path.exists():
        return None
    import torch

    try:
        args = torch.load(args_path, weights_only=False, map_location="cpu")
        micro_batch = trainer_state.get("train_batch_size") or args.train_batch_size
        return int(micro_batch * args.gradient_accumulation_steps * args.world_size)
    except (OSError, EOFError, AttributeError, ImportError, pickle.UnpicklingError, RuntimeError):
        return None  # another version's arguments: the run's examples are unknown, and the label says so


def load_run(label: str, run_dir: str | Path) -> Run:
    """Read a run (its folder, a checkpoint folder or its ``trainer_state.json``)."""
    state_path = find_trainer_state(run_dir)
    trainer_state = json.loads(state_path.read_text())
    records = training_records(trainer_state)
    if not records:
        raise ValueError(f"{state_path} has no training log records (set logging_steps to log during training)")
    evaluations = [r for r in trainer_state.get("log_history", []) if "eval_loss" in r and "step" in r]
    run = Run(label, records, evaluations, None)
    if run.logs_batch_sizes:
        return run
    return Run(label, records, evaluations, arguments_batch_size(state_path, trainer_state))


def examples_seen(records: list[dict[str, Any]], steps: list[int], fixed_batch_size: int | None = None) -> list[int]:
    """E(s) = Σ_{t≤s} B(t), the examples consumed by the end of optimizer step s, for each s in ``steps``.

    B(t) is ``fixed_batch_size`` when given. Else, at the step of each of ``records``, its logged ``examples_seen``
    (exact), or for a record without it, the previous record's E plus the steps since it at this record's
    ``batch_size``; between records, from the following record back at its batch, not below the previous record's
    E (module docstring)."""
    if fixed_batch_size is not None:
        return [step * fixed_batch_size for step in steps]
    logged = {record["step"]: record for record in sorted(records, key=lambda record: record["step"])}
    logged_steps, batches = list(logged), [record["batch_size"] for record in logged.values()]
    cumulative, total, previous_step = [], 0, 0
    for step, record in logged.items():
        counted = record.get("examples_seen")
        # the callback's count; else the steps since the previous record, at this record's batch
        total = counted if is_positive(counted) else total + (step - previous_step) * record["batch_size"]
        cumulative.append(total)
        previous_step = step
    result = []
    for step in steps:
        following = min(bisect.bisect_left(logged_steps, step), len(logged_steps) - 1)
        # E(s) = E(the following record's step) − the steps from s to it at its batch (+ after the last one)
        back = cumulative[following] + (step - logged_steps[following]) * batches[following]
        previous = cumulative[following - 1] if following > 0 else 0
        result.append(max(back, previous) if step <= logged_steps[following] else back)
    return result


def shared_data_unit(runs: list[Run]) -> DataUnit:
    """Tokens when every run counts them, else examples when every run's examples are known, else steps."""
    if all(run.counts_tokens for run in runs):
        return "tokens"
    if all(run.knows_examples for run in runs):
        return "examples"
    return "steps"


def data_axis_label(runs: list[Run], unit: DataUnit) -> str:
    """The data axis's label: the unit, and why it is not tokens (or examples) when some runs have those."""
    if unit == "tokens":
        return "tokens seen"
    if unit == "examples":
        without_tokens = [run.label for run in runs if not run.counts_tokens]
        fixed = [run.label for run in runs if not run.logs_batch_sizes]
        notes = [f"no token count: {', '.join(without_tokens)}"] if len(without_tokens) < len(runs) else []
        notes += [f"fixed batch from the Trainer's arguments: {', '.join(fixed)}"] if fixed else []
        return "examples seen" + (f" ({'; '.join(notes)})" if notes else "")
    unknown = [run.label for run in runs if not run.knows_examples]
    return f"optimizer steps (no token count or batch size: {', '.join(unknown)})"


def data_values(run: Run, unit: DataUnit, records: list[dict[str, Any]]) -> list[float]:
    """The data axis's value at each of ``records`` (the run's training or evaluation records) in ``unit``;
    tokens need ``num_input_tokens_seen`` in every record."""
    steps = [record["step"] for record in records]
    if unit == "tokens":
        return [record["num_input_tokens_seen"] for record in records]
    if unit == "examples":
        return examples_seen(run.records, steps, run.fixed_batch_size)
    return steps


def drawn_evaluations(run: Run, unit: DataUnit) -> list[dict[str, Any]]:
    """The run's evaluations that have a value in ``unit`` (with tokens: the ones that logged them)."""
    return [e for e in run.evaluations if unit != "tokens" or "num_input_tokens_seen" in e]


def first_crossing(xs: list[float], losses: list[float], target: float) -> float | None:
    """x at which the loss first reaches ``target`` (loss ≤ target), linearly interpolated between the point before
    and the first point at or below it; ``xs[0]`` when the first point already is; None if never."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return xs[0]
            x0, x1, l0, l1 = xs[i - 1], xs[i], losses[i - 1], loss
            return x0 + (x1 - x0) * (l0 - target) / (l0 - l1)
    return None


@dataclass(frozen=True)
class Reach:
    """Where one run's held-out loss first reaches the target: ``steps`` and ``data`` (in the figure's unit),
    interpolated (:func:`first_crossing`), None when it never does; its last evaluation's step and lowest loss."""

    label: str
    steps: float | None
    data: float | None
    last_step: int
    lowest_loss: float


def loss_reached(runs: list[Run], unit: DataUnit) -> tuple[float, list[Reach]] | None:
    """The first run's final held-out loss, and where each run (the first included) first reaches it; None when
    the first run has no held-out evaluation. A run without evaluations never reaches it."""
    evaluations = [drawn_evaluations(run, unit) for run in runs]
    if not evaluations[0]:
        return None
    target = evaluations[0][-1]["eval_loss"]
    reaches = []
    for run, evals in zip(runs, evaluations, strict=True):
        losses = [e["eval_loss"] for e in evals]
        reaches.append(
            Reach(
                run.label,
                first_crossing([e["step"] for e in evals], losses, target),
                first_crossing(data_values(run, unit, evals), losses, target),
                evals[-1]["step"] if evals else run.records[-1]["step"],
                min(losses, default=math.nan),
            )
        )
    return target, reaches


def saving_text(runs: list[Run], unit: DataUnit) -> str:
    """One line per run: the optimizer steps (and data, unless the unit is steps) it needs to reach the first run's
    final held-out loss, and for each later run the first run's difference from it, first / other − 1 (−31.6%
    steps: 31.6% fewer). Empty for one run or when the first run has no held-out evaluation."""
    reached = loss_reached(runs, unit) if len(runs) > 1 else None
    if reached is None:
        return ""
    target, (first, *others) = reached
    name = UNIT_NAMES[unit]

    def amount(reach: Reach) -> str:
        steps = f"{reach.steps:.0f} steps"
        return steps if unit == "steps" else f"{steps}, {compact_count(reach.data)} {name}"

    lines = [f"to {first.label}'s final held-out loss {target:.3f}: {first.label} {amount(first)}"]
    for other in others:
        if other.steps is None:
            lines.append(
                f"{other.label}: not reached in {other.last_step} steps (lowest held-out loss {other.lowest_loss:.3f})"
            )
            continue
        changes = [f"{100 * (first.steps / other.steps - 1):+.1f}% steps"] if other.steps > 0 else []
        if unit != "steps" and other.data > 0:
            changes.append(f"{100 * (first.data / other.data - 1):+.1f}% {name}")
        relative = f" ({first.label}: {', '.join(changes)})" if changes else ""
        lines.append(f"{other.label}: {amount(other)}{relative}")
    return "\n".join(lines)


def plain_number(value: float, _position: int | None = None) -> str:
    """``value`` in positional notation, rounded to 3 significant digits (at least to a whole number), trailing
    zeros dropped, thousands separated: 0.05, 2, 5.5, 20, 1,500. A tick formatter (``_position`` unused)."""
    if value == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    text = f"{round(value, decimals):,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if decimals else text


def compact_count(value: float, _position: int | None = None) -> str:
    """A count with a k (10³), M (10⁶) or G (10⁹) suffix and :func:`plain_number`'s digits: 374, 25k, 1.23M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return plain_number(value / scale) + suffix
    return plain_number(value)


def readable_log_ticks(axis: Axis) -> None:
    """Plain-number labels on a log-scaled axis, for its current limits: ticks at the sparsest of 10^k,
    {1, 2, 5} × 10^k and {1, …, 9} × 10^k that puts at least 3 in range (the others unlabelled minor ticks), or
    linearly spaced ticks when even the last does not (a range well under a decade, where a log scale is nearly
    linear)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

    low, high = sorted(axis.get_view_interval())
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for subs in ((1,), (1, 2, 5), tuple(range(1, 10))):
        if sum(low <= sub * 10.0**decade <= high for decade in decades for sub in subs) >= 3:
            axis.set_major_locator(LogLocator(base=10, subs=subs))
            axis.set_minor_locator(LogLocator(base=10, subs=[sub for sub in range(2, 10) if sub not in subs]))
            break
    else:
        axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(plain_number))
    axis.set_minor_formatter(NullFormatter())


def plot_figure(runs: dict[str, str | Path]) -> Figure:
    """The figure of :func:`plot_runs`, not saved (its axes: loss against data, loss against steps, GNS, batch)."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    loaded = [load_run(label, run_dir) for label, run_dir in runs.items()]
    unit = shared_data_unit(loaded)
    figure = Figure(figsize=(13, 8.5))  # no pyplot: no global backend or figure registry in the user's session
    axes = figure.subplots(2, 2)
    (data_axis, steps_axis), (gns_axis, batch_axis) = axes
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for run, color in zip(loaded, colors, strict=False):
        evaluations = drawn_evaluations(run, unit)
        x_records, x_evaluations = data_values(run, unit, run.records), data_values(run, unit, evaluations)
        step_records, step_evaluations = [r["step"] for r in run.records], [e["step"] for e in evaluations]
        for axis, xs, eval_xs in ((data_axis, x_records, x_evaluations), (steps_axis, step_records, step_evaluations)):
            axis.plot(xs, [r["loss"] for r in run.records], color=color, alpha=0.45, lw=1)
            axis.plot(
                eval_xs,
                [e["eval_loss"] for e in evaluations],
                "o-",
                color=color,
                ms=4,
                label=f"{run.label}: held-out" if evaluations else None,
            )
            axis.plot([], [], color=color, alpha=0.45, label=f"{run.label}: training")
        for key, draw, style in (
            ("gns", gns_axis.plot, {}),
            ("gns/block", gns_axis.plot, {"ls": "--"}),  # the per-block norms' GNS, the "gns" schedule's default
            ("batch_size", batch_axis.step, {"where": "pre"}),  # a record's batch: since the previous record
        ):
            pairs = [(x, r.get(key)) for x, r in zip(x_records, run.records, strict=True)]
            pairs = [(x, value) for x, value in pairs if is_positive(value)]
            if pairs:
                label = run.label if key == "batch_size" else f"{run.label}: {GNS_LABELS[key]}"
                draw([p[0] for p in pairs], [p[1] for p in pairs], color=color, label=label, **style)
    reached = loss_reached(loaded, unit) if len(loaded) > 1 else None
    if reached is not None:
        for axis in (data_axis, steps_axis):
            axis.axhline(reached[0], color="0.4", ls="--", lw=0.8, label=f"{loaded[0].label}'s final held-out loss")
    x_label = data_axis_label(loaded, unit)
    loss_label = "cross-entropy (nats / token)"
    data_axis.set(title=f"Loss against {UNIT_NAMES[unit]}", xlabel=x_label, ylabel=loss_label)
    steps_axis.set(title="Loss against optimizer steps", xlabel="optimizer step", ylabel=loss_label)
    gns_axis.set(title="Gradient noise scale, from the normalization layers", xlabel=x_label, ylabel="examples")
    batch_axis.set(title="Batch size", xlabel=x_label, ylabel="examples per optimizer step")
    if gns_axis.get_lines():
        gns_axis.set_yscale("log")
    for axis in axes.flat:
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="best", fontsize=8)
        if axis.get_yscale() == "log":
            readable_log_ticks(axis.yaxis)
        if axis is not steps_axis and unit != "steps":
            axis.xaxis.set_major_formatter(FuncFormatter(compact_count))
    text = saving_text(loaded, unit)
    bottom = 0.02 + 0.022 * (text.count("\n") + 1) if text else 0.0
    if text:
        figure.text(0.01, 0.01, text, fontsize=9, va="bottom", ha="left", family="monospace")
    figure.tight_layout(rect=(0, bottom, 1, 1))
    return figure


def plot_runs(runs: dict[str, str | Path], output: str | Path) -> Path:
    """Overlay runs (label -> run folder or trainer_state.json) in four panels, with the steps and data each needs
    to reach the first run's final held-out loss written under them (module docstring); returns ``output``."""
    output = Path(output)
    plot_figure(runs).savefig(output, dpi=110)
    return output


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw loss, GNS and batch size of a run; returns the PNG's path (default: ``gns_plot.png`` in the run)."""
    state_path = find_trainer_state(run_dir)
    return plot_runs({"run": state_path}, output if output is not None else state_path.parent / "gns_plot.png")
