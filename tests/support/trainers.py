"""Trainers set up as the tests use them: on the CPU, no reporting, no checkpoints unless asked (``**overrides``).

:func:`training_args` and :func:`built_optimizer`: ``optim="stable_spam"`` through TrainingArguments and the
Trainer. :func:`make_trainer`: a Trainer with a GNSCallback on :func:`tests.support.data.padded_dataset`."""

from __future__ import annotations

from transformers import Trainer, TrainingArguments

from hf_gns_spam import StableSPAM
from tests.support.data import padded_dataset
from tests.support.tiny_llama import tiny_llama


def training_args(tmp_path, **overrides) -> TrainingArguments:
    """TrainingArguments with ``optim="stable_spam"`` for a short CPU run (``overrides`` on top)."""
    settings = {
        "output_dir": str(tmp_path / "out"),
        "optim": "stable_spam",
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "data_seed": 0,
        "use_cpu": True,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def built_optimizer(tmp_path, model=None, **overrides) -> StableSPAM:
    """The optimizer a Trainer builds from :func:`training_args` (on a :func:`tiny_llama` by default)."""
    trainer = Trainer(model=model or tiny_llama(), args=training_args(tmp_path, **overrides))
    trainer.create_optimizer()
    return trainer.optimizer


def make_trainer(tmp_path, model, callback, eval_dataset=None, **overrides) -> Trainer:
    """A Trainer of ``model`` with ``callback`` (a GNSCallback) on 16 padded rows: micro-batches of 2, accumulation 2,
    StableSPAM, gradient clipping on, a log record every step (``overrides`` on top)."""
    settings = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3,
        "data_seed": None,
        "max_grad_norm": 0.05,  # clipping is active: big must be read before it
        **overrides,
    }
    return Trainer(
        model=model,
        args=training_args(tmp_path, **settings),
        train_dataset=padded_dataset(),
        eval_dataset=eval_dataset,
        callbacks=[callback],
    )
