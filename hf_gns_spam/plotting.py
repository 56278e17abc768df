"""Plot a training run's loss, gradient noise scale and batch size against tokens seen.

Reads the Trainer's ``trainer_state.json`` (its ``log_history``, where :class:`~hf_gns_spam.GNSCallback` puts
``gns``, ``gns_tokens`` and ``batch_size`` beside ``loss``) and draws three stacked panels sharing the x axis:
tokens seen when the run logged ``num_input_tokens_seen`` (``include_num_input_tokens_seen=True``), else optimizer
steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["find_trainer_state", "plot_run", "training_records"]


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
    """Draw loss, GNS and batch size against tokens for a run; returns the PNG's path (default: in the run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state_path = find_trainer_state(run_dir)
    records = training_records(json.loads(state_path.read_text()))
    if not records:
        raise ValueError(f"{state_path} has no training log records (set logging_steps to log during training)")
    by_tokens = all("num_input_tokens_seen" in r for r in records)
    x = [r["num_input_tokens_seen"] if by_tokens else r["step"] for r in records]
    x_label = "tokens seen" if by_tokens else "optimizer step"

    figure, (loss_axis, gns_axis, batch_axis) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    loss_axis.plot(x, [r["loss"] for r in records], color="tab:blue", label="training loss")
    evaluations = [r for r in json.loads(state_path.read_text()).get("log_history", []) if "eval_loss" in r]
    if evaluations and by_tokens and all("num_input_tokens_seen" in r for r in evaluations):
        loss_axis.plot(
            [r["num_input_tokens_seen"] for r in evaluations],
            [r["eval_loss"] for r in evaluations],
            "o",
            color="tab:red",
            label="evaluation loss",
        )
    loss_axis.set_ylabel("cross-entropy (nats / token)")
    loss_axis.set_title("Loss")

    def finite(key: str) -> tuple[list[float], list[float]]:
        pairs = [(xi, r[key]) for xi, r in zip(x, records, strict=True) if math.isfinite(r.get(key, math.nan))]
        pairs = [(xi, value) for xi, value in pairs if value > 0]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    gns_x, gns_y = finite("gns")
    if gns_y:
        gns_axis.plot(gns_x, gns_y, color="tab:green", label="GNS (examples)")
        gns_axis.set_yscale("log")
    gns_axis.set_ylabel("gradient noise scale (examples)")
    gns_axis.set_title("Gradient noise scale, from the normalization layers (EMA ratio)")

    batch_x, batch_y = finite("batch_size")
    batch_axis.step(batch_x, batch_y, where="post", color="tab:purple", label="batch size")
    batch_axis.set_ylabel("batch size (examples per optimizer step)")
    batch_axis.set_xlabel(x_label)
    batch_axis.set_title("Batch size")
    for axis in (loss_axis, gns_axis, batch_axis):
        axis.grid(True, alpha=0.3)
        if axis.get_lines():
            axis.legend(loc="best")
    figure.tight_layout()
    output = Path(output) if output is not None else state_path.parent / "gns_plot.png"
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output
