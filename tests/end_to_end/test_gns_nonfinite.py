"""Non-finite gradients are in the Trainer's logs at the first logging step after they happen."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import TrainerCallback

from hf_gns_spam import GNSCallback, patch_model
from tests.support import model_zoo
from tests.support.trainers import make_trainer

pytestmark = pytest.mark.slow


class NaNStorm(TrainerCallback):
    """Makes the LM head's gradient NaN in optimizer steps ``first``..``last`` (counted from 1)."""

    def __init__(self, model: torch.nn.Module, first: int, last: int) -> None:
        self.first, self.last, self.step = first, last, 1
        model.lm_head.weight.register_hook(self._poison)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.nan if self.first <= self.step <= self.last else grad

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step + 1


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipping", "no-clipping"])
def test_a_nan_storm_is_logged_at_the_next_logging_step_and_warned_once(tmp_path, caplog, max_grad_norm):
    """50 steps, NaN gradients in steps 11-30, a log record every 4 steps: nonfinite_grad_steps counts the storm's
    steps in every record from step 12 on, one warning says so, and training goes on (Stable-SPAM masks them).
    Without clipping (max_grad_norm=0) the Trainer (5.25) still computes the norm, with clip_grad_norm_(inf)."""
    model = model_zoo.build("llama")
    patch_model(model)
    callback = GNSCallback()
    trainer = make_trainer(
        tmp_path, model, callback, max_steps=50, logging_steps=4, max_grad_norm=max_grad_norm,
        gradient_accumulation_steps=1,
    )  # fmt: skip
    trainer.add_callback(NaNStorm(model, 11, 30))
    with (
        caplog.at_level(logging.WARNING, logger="hf_gns_spam.gns.callback"),
        pytest.warns(RuntimeWarning, match="StableSPAM: gradients with non-finite entries"),  # its own, by step 20
    ):
        trainer.train()
    records = {r["step"]: r for r in trainer.state.log_history if "loss" in r}
    assert sorted(records) == list(range(4, 51, 4))
    expected = {step: min(max(step - 10, 0), 20) for step in records}
    assert {step: r["nonfinite_grad_steps"] for step, r in records.items()} == expected
    assert caplog.text.count("had a gradient with NaN or ±inf entries") == 1
    assert "2 optimizer step(s) up to step 12" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(records[48]["gns"])  # the estimate goes on after the storm


def test_a_stable_spam_run_without_the_callback_logs_the_storm_and_keeps_the_count_across_a_resume(tmp_path):
    """StableSPAM alone: the same storm gives the same counts in the records (the optimizer counts the steps on the
    device; the Trainer's log reads it), its own warning comes by step 20, and a run resumed from step 32 (after the
    storm) goes on from 20: the count is in the optimizer's state dict."""
    model = model_zoo.build("llama")
    trainer = make_trainer(
        tmp_path, model, NaNStorm(model, 11, 30), max_steps=50, logging_steps=4, gradient_accumulation_steps=1,
        save_strategy="steps", save_steps=32,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="StableSPAM: gradients with non-finite entries"):
        trainer.train()
    counts = {r["step"]: r["nonfinite_grad_steps"] for r in trainer.state.log_history if "loss" in r}
    assert counts == {step: min(max(step - 10, 0), 20) for step in range(4, 51, 4)}
    again = model_zoo.build("llama", seed=1)
    resumed = make_trainer(
        tmp_path / "again", again, NaNStorm(again, 0, -1), max_steps=50, logging_steps=4, gradient_accumulation_steps=1
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-32"))
    after = {r["step"]: r["nonfinite_grad_steps"] for r in resumed.state.log_history if "loss" in r and r["step"] > 32}
    assert after == {step: 20 for step in range(36, 51, 4)}
