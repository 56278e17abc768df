"""optim="stable_spam" through transformers' TrainingArguments, HfArgumentParser and an unmodified Trainer."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_gns_spam
from hf_gns_spam import StableSPAM
from hf_gns_spam.integrations import trainer_optimizer
from tests.support.paths import REPO_ROOT
from tests.support.tiny_llama import counting_dataset, tiny_llama
from tests.support.trainers import built_optimizer, training_args


def test_name_is_accepted_everywhere_transformers_reads_it(tmp_path):
    args = training_args(tmp_path)
    assert args.optim is OptimizerNames("stable_spam")
    assert args.to_dict()["optim"] == "stable_spam"
    (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "stable_spam", "--optim_args", "gamma1=0.85,mode=faithful"]
    )
    assert parsed.optim == "stable_spam" and parsed.optim_args == "gamma1=0.85,mode=faithful"
    other = TrainingArguments(output_dir=str(tmp_path), report_to="none").set_optimizer(name="stable_spam")
    assert other.optim == "stable_spam"
    assert "stable_spam" in [member.value for member in OptimizerNames]


def test_trainer_builds_stable_spam_on_its_own_parameter_groups(tmp_path):
    model = tiny_llama()
    optimizer = built_optimizer(tmp_path, model, weight_decay=0.1, adam_beta2=0.95, adam_epsilon=1e-6)
    assert isinstance(optimizer, StableSPAM)
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] for p in no_decay["params"]) and no_decay["params"]
    assert not any("norm" in names[id(p)] for p in decay["params"])
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-6 and decay["lr"] == 3e-3
    assert decay["mode"] == "clean" and decay["reset_interval"] == 1000


def test_optim_args_are_typed_and_reach_the_optimizer(tmp_path):
    optimizer = built_optimizer(
        tmp_path,
        optim_args="gamma1=0.85,gamma2=0.99999,gamma3=0.99,reset_interval=500,mode=faithful,total_steps=2000,"
        "eta_min=0.25,state_bits=16,betas=0.8:0.9,eps=1e-7",
    )
    group = optimizer.param_groups[0]
    assert group["gamma1"] == 0.85 and group["gamma2"] == 0.99999 and group["gamma3"] == 0.99
    assert group["reset_interval"] == 500 and isinstance(group["reset_interval"], int)
    assert group["mode"] == "faithful" and group["total_steps"] == 2000 and group["eta_min"] == 0.25
    assert group["state_bits"] == 16 and group["betas"] == (0.8, 0.9) and group["eps"] == 1e-7


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("gama1=0.8", r"unknown optim_args key\(s\) \['gama1'\]; valid keys are \['betas', 'eps', 'eta_min'"),
        ("lr=0.1", r"unknown optim_args key\(s\) \['lr'\]"),
        ("gamma2=1.5", r"invalid gamma2=1.5; gamma2 must be a float in \[0, 1\)"),
        ("reset_interval=abc", r"cannot read optim_args reset_interval='abc'"),
        ("mode=official", r"mode must be 'clean' or 'faithful'"),
        ("betas=0.9", r"write betas as beta1:beta2"),
        ("weight_decay=0.3", r"set --weight_decay instead"),
    ],
)
def test_bad_optim_args_are_clear_errors(tmp_path, optim_args, message):
    with pytest.raises(ValueError, match=message):
        built_optimizer(tmp_path, optim_args=optim_args)


def test_optim_args_may_not_contradict_training_arguments(tmp_path):
    with pytest.raises(ValueError, match="adam_beta1/adam_beta2"):
        built_optimizer(tmp_path, optim_args="betas=0.8:0.9", adam_beta2=0.95)
    assert built_optimizer(tmp_path, optim_args="weight_decay=0.1", weight_decay=0.1).param_groups[0]["weight_decay"]


def test_registration_fails_loudly_on_unrecognised_internals(monkeypatch):
    from transformers import trainer_optimizer as transformers_trainer_optimizer

    monkeypatch.delattr(transformers_trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(hf_gns_spam.TrainerIntegrationError, match=r"_OPTIMIZER_HANDLERS is missing.*transformers>=5"):
        trainer_optimizer.register_trainer_optimizers()


def test_registration_fails_loudly_when_trainer_stops_using_the_registry(monkeypatch):
    from transformers import trainer as transformers_trainer

    monkeypatch.setattr(transformers_trainer, "_OPTIMIZER_HANDLERS", {})
    with pytest.raises(hf_gns_spam.TrainerIntegrationError, match="no longer dispatches"):
        trainer_optimizer.register_trainer_optimizers()


def train(tmp_path, **overrides) -> Trainer:
    trainer = Trainer(
        model=tiny_llama(),
        args=training_args(tmp_path, **overrides),
        train_dataset=counting_dataset(),
    )
    trainer.train()
    return trainer


@pytest.mark.slow
def test_trainer_run_loss_falls(tmp_path):
    trainer = train(tmp_path, num_train_epochs=6, optim_args="reset_interval=40")
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert isinstance(trainer.optimizer.optimizer, StableSPAM)
    assert len(losses) == 96
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert first > 3.5  # ~ln(64) at initialisation
    assert last < 0.6 * first, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_checkpoint_resume_is_bit_identical(tmp_path, mode):
    common = {
        "max_steps": 12,
        "optim_args": f"reset_interval=5,mode={mode},total_steps=12",
        "lr_scheduler_type": "cosine",
        "warmup_steps": 2,
        "weight_decay": 0.01,
    }
    straight = Trainer(
        model=tiny_llama(), args=training_args(tmp_path / "a", **common), train_dataset=counting_dataset()
    )
    straight.train()

    saving = dict(common, save_strategy="steps", save_steps=6)
    first = Trainer(model=tiny_llama(), args=training_args(tmp_path / "b", **saving), train_dataset=counting_dataset())
    first.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-6"
    assert (checkpoint / "optimizer.pt").exists()
    # the Trainer reads optimizer.pt with weights_only=True; so must any reader
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"][0]["step"] == 6

    resumed = Trainer(
        model=tiny_llama(seed=1), args=training_args(tmp_path / "b", **saving), train_dataset=counting_dataset()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), (_, b) in zip(resumed.model.named_parameters(), straight.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.optimizer.optimizer.param_groups[0]["step"] == 12


@pytest.mark.slow
def test_training_args_bin_loads_in_a_fresh_process(tmp_path):
    args = training_args(tmp_path, optim_args="mode=faithful")
    path = tmp_path / "training_args.bin"
    torch.save(args, path)
    code = textwrap.dedent(
        f"""
        import torch, hf_gns_spam
        args = torch.load({str(path)!r}, weights_only=False)
        assert args.optim == "stable_spam" and args.optim_args == "mode=faithful", args.optim
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize(("name", "bits"), [("stable_spam_8bit", 8), ("stable_spam_4bit", 4)])
def test_low_bit_names(tmp_path, name, bits):
    optimizer = built_optimizer(tmp_path, optim=name)
    assert isinstance(optimizer, StableSPAM) and optimizer.param_groups[0]["state_bits"] == bits
    assert (
        built_optimizer(tmp_path, optim="stable_spam", optim_args=f"state_bits={bits}").param_groups[0]["state_bits"]
        == bits
    )
    with pytest.raises(ValueError, match=f"fixes state_bits={bits}"):
        built_optimizer(tmp_path, optim=name, optim_args="state_bits=16")


def test_import_warns_instead_of_failing_on_other_internals():
    """A transformers whose optimizer dispatch differs: `import hf_gns_spam` warns, and StableSPAM still works."""
    code = textwrap.dedent(
        """
        import warnings
        import transformers.trainer
        from transformers import trainer_optimizer
        trainer_optimizer._OPTIMIZER_HANDLERS = {}  # the Trainer no longer reads this registry
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hf_gns_spam
        assert any("cannot register optim='stable_spam'" in str(w.message) for w in caught), caught
        import torch
        parameter = torch.nn.Parameter(torch.ones(3))
        parameter.grad = torch.ones(3)
        hf_gns_spam.StableSPAM([parameter], lr=0.1).step()
        assert parameter.detach().lt(1).all()
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
