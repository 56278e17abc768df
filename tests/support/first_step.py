"""The first optimizer step of a real Trainer with a GNSCallback, and the estimates it measured.

:func:`first_trainer_step` returns what a recomputation from per-example gradients needs (the model before the step,
the step's batch, each example's weight in the loss); :func:`first_step` runs the same examples as 8x1, 4x2 or 2x4
micro-batches x accumulation and returns the step's estimates, which :func:`assert_split_invariant` compares."""

from __future__ import annotations

import copy

import pytest
from transformers import Trainer, TrainingArguments

from hf_gns_spam import GNSCallback, patch_model
from tests.support import model_zoo
from tests.support.recording import TrainingForwards
from tests.support.trainers import make_trainer


def first_trainer_step(tmp_path, architecture: str) -> tuple:
    """One optimizer step (2 micro-batches) of a patched ``architecture`` through the real Trainer with a
    GNSCallback: (the model before the step, the callback, the trainer, the step's whole batch, each example's weight
    in the loss). The Trainer's loss is Σ token losses / num_items_in_batch (which, for GPT-2, counts labels without
    the shift), so an example's weight is its label count after the shift over num_items_in_batch."""
    model = model_zoo.build(architecture)
    initial = copy.deepcopy(model)
    patch_model(model)
    callback = GNSCallback()
    trainer = make_trainer(tmp_path, model, callback, max_steps=1)
    recorded = TrainingForwards(model)
    trainer.train()
    recorded.remove()
    assert len(recorded.forwards) == 2 and len(callback.estimates.history) == 1
    batch = recorded.batch()
    weights = (batch["labels"][:, 1:] != -100).sum(1).double() / recorded.num_items[0]
    return initial, callback, trainer, batch, weights


def first_step(
    tmp_path, model, accumulation: int, dataset, trainer_class=Trainer, args_class=TrainingArguments,
    trainer_kwargs=None, **overrides,
) -> dict[str, float]:  # fmt: skip
    """One optimizer step of 8 examples as (8 // accumulation) x accumulation micro-batches through ``trainer_class``
    with a GNSCallback on the patched ``model``: the step's estimates (small, big, effective batch, ...)."""
    patch_model(model)
    callback = GNSCallback()
    settings = {
        "output_dir": str(tmp_path / f"out{accumulation}"),
        "per_device_train_batch_size": 8 // accumulation,
        "gradient_accumulation_steps": accumulation,
        "max_steps": 1,
        "learning_rate": 1e-3,
        "optim": "stable_spam",
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    trainer = trainer_class(
        model=model, args=args_class(**settings), train_dataset=dataset, callbacks=[callback], **(trainer_kwargs or {})
    )
    trainer.train()
    assert len(callback.estimates.history) == 1 and callback.last_batch_size == 8
    return callback.estimates.history[0]


def assert_split_invariant(measured: list[dict[str, float]], rel: float = 1e-4) -> None:
    """The :func:`first_step` estimates of several splits of the same examples agree (small, big, effective batch)."""
    for key in ("small", "big", "effective_batch"):
        values = [m[key] for m in measured]
        assert values == pytest.approx([values[0]] * len(values), rel=rel), key
