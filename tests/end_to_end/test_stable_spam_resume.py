"""Resuming a Trainer run of StableSPAM never goes on silently with a fresh or broken optimizer state.

transformers skips loading a checkpoint's optimizer and scheduler states when either file is missing and goes on
with fresh ones; a well-formed optimizer.pt holding NaN would be loaded and turn the parameters NaN at the next step.
Both are errors naming the file (and the tensor), with or without GNSCallback; an intact checkpoint resumes.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_gns_spam.errors import CheckpointError
from tests.support import model_zoo
from tests.support.data import padded_dataset

pytestmark = pytest.mark.slow


def trainer(tmp_path, state_bits: int) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-3,
        optim="stable_spam",
        optim_args=f"state_bits={state_bits}",
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    model = model_zoo.build("llama", intermediate_size=128)  # its MLP weights (4096 elements) are quantized at 8 bits
    return Trainer(model=model, args=args, train_dataset=padded_dataset(size=16))


@pytest.fixture(scope="module", params=[32, 8], ids=["32-bit", "8-bit"])
def checkpoint(request, tmp_path_factory):
    """(state_bits, the step-2 checkpoint of a 4-step run)."""
    directory = tmp_path_factory.mktemp(f"bits{request.param}")
    trainer(directory, request.param).train()
    return request.param, directory / "out" / "checkpoint-2"


def resumed(tmp_path, state_bits: int, source) -> Trainer:
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(source, copy)
    return copy, trainer(tmp_path / "resume", state_bits)


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt"])
def test_a_missing_optimizer_or_scheduler_state_is_an_error_naming_the_file(checkpoint, tmp_path, missing):
    state_bits, source = checkpoint
    copy, run = resumed(tmp_path, state_bits, source)
    (copy / missing).unlink()
    with pytest.raises(CheckpointError, match=f"has no {missing}, though it was saved at step 2"):
        run.train(resume_from_checkpoint=str(copy))


def test_non_finite_optimizer_state_is_an_error_naming_the_file_and_the_tensor(checkpoint, tmp_path):
    state_bits, source = checkpoint
    copy, run = resumed(tmp_path, state_bits, source)
    saved = torch.load(copy / "optimizer.pt", weights_only=True)
    key = "exp_avg_sq" if state_bits == 32 else "exp_avg_sq_absmax"
    state = next(state for state in saved["state"].values() if key in state)
    state[key].view(-1)[0] = float("nan")
    torch.save(saved, copy / "optimizer.pt")
    with pytest.raises(CheckpointError, match=rf"non-finite values in '{key}' \(1 of") as raised:
        run.train(resume_from_checkpoint=str(copy))
    assert str(copy / "optimizer.pt") in str(raised.value) and "without resume_from_checkpoint" in str(raised.value)


def test_an_intact_checkpoint_resumes_to_the_uninterrupted_parameters(checkpoint, tmp_path):
    state_bits, source = checkpoint
    copy, run = resumed(tmp_path, state_bits, source)
    run.train(resume_from_checkpoint=str(copy))
    straight = trainer(tmp_path / "straight", state_bits)
    straight.train()
    for (name, a), (_, b) in zip(run.model.named_parameters(), straight.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
