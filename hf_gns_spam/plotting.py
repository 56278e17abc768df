"""Plot training runs' loss, gradient noise scale and batch size, one run or several overlaid.

Reads the Trainer's ``trainer_state.json`` (its ``log_history``, where :class:`~hf_gns_spam.GNSCallback` puts
``gns``, ``gns_tokens`` and ``batch_size`` beside ``loss``) and draws four panels: loss against tokens seen (when the
run logged ``num_input_tokens_seen``, ``include_num_input_tokens_seen=True``; else optimizer steps) and against
optimizer steps, the GNS and the batch size against tokens. Comparing runs that grow the batch with fixed-batch
runs needs both loss panels: a growing batch buys fewer optimizer steps with more data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["find_trainer_state", "plot_run", "plot_runs", "training_records"]


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


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw loss, GNS and batch size of a run; returns the PNG's path (default: ``gns_plot.png`` in the run)."""
    state_path = find_trainer_state(run_dir)
    return plot_runs({"run": state_path}, output if output is not None else state_path.parent / "gns_plot.png")


def plot_runs(runs: dict[str, str | Path], output: str | Path) -> Path:
    """Overlay runs (label -> run folder or trainer_state.json) in four panels: loss against tokens seen and against
    optimizer steps (training loss as a line, held-out evaluations as markers), the GNS and the batch size against
    tokens; returns ``output``. Tokens are optimizer steps for a run that did not log ``num_input_tokens_seen``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (tokens_axis, steps_axis), (gns_axis, batch_axis) = axes
    token_runs = 0
    for (label, run_dir), color in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        state_path = find_trainer_state(run_dir)
        history = json.loads(state_path.read_text()).get("log_history", [])
        records = training_records({"log_history": history})
        if not records:
            raise ValueError(f"{state_path} has no training log records (set logging_steps to log during training)")
        by_tokens = all("num_input_tokens_seen" in r for r in records)
        token_runs += by_tokens
        x_key = "num_input_tokens_seen" if by_tokens else "step"
        evaluations = [r for r in history if "eval_loss" in r and x_key in r]
        for axis, key in ((tokens_axis, x_key), (steps_axis, "step")):
            axis.plot([r[key] for r in records], [r["loss"] for r in records], color=color, alpha=0.45, lw=1)
            axis.plot(
                [r[key] for r in evaluations],
                [r["eval_loss"] for r in evaluations],
                "o-",
                color=color,
                ms=4,
                label=f"{label}: held-out" if evaluations else None,
            )
            axis.plot([], [], color=color, alpha=0.45, label=f"{label}: training")

        def positive(key: str, records=records, x_key=x_key) -> tuple[list[float], list[float]]:
            pairs = [(r[x_key], r.get(key, math.nan)) for r in records]
            pairs = [(x, value) for x, value in pairs if isinstance(value, (int, float)) and value > 0]
            return [p[0] for p in pairs], [p[1] for p in pairs]

        gns_x, gns_y = positive("gns")
        if gns_y:
            gns_axis.plot(gns_x, gns_y, color=color, label=label)
        batch_x, batch_y = positive("batch_size")
        if batch_y:
            batch_axis.step(batch_x, batch_y, where="post", color=color, label=label)
    x_label = "tokens seen" if token_runs == len(runs) else "tokens seen (optimizer steps where not logged)"
    tokens_axis.set(title="Loss against data", xlabel=x_label, ylabel="cross-entropy (nats / token)")
    steps_axis.set(title="Loss against optimizer steps", xlabel="optimizer step", ylabel="cross-entropy (nats / token)")
    gns_axis.set(title="Gradient noise scale, from the normalization layers", xlabel=x_label, ylabel="examples")
    if gns_axis.get_lines():
        gns_axis.set_yscale("log")
    batch_axis.set(title="Batch size", xlabel=x_label, ylabel="examples per optimizer step")
    for axis in axes.flat:
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    output = Path(output)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
