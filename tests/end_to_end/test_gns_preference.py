"""TRL's DPOTrainer (with a reference model) and RewardTrainer with a GNSCallback: an example is a pair of rows (chosen
and rejected), each pair weighing 1/P in a micro-batch of P pairs. The first optimizer step's small, big and
effective batch at 8x1, 4x2 and 2x4 pairs x accumulation, against per-pair gradients of the norm weights computed
one pair at a time with plain autograd: of the trainer's own loss on a batch of that one pair (the gradient the
statistics must describe: TRL's fused LM head computes approximate float32 log-probabilities, 1e-3 off the exact
ones here), and, as a check that this loss is what the weights assume, of the loss written out here (DPO's sigmoid
loss of the summed completion log-probabilities; the reward model's −log σ(r_chosen − r_rejected)) to 1e-2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from hf_gns_spam import GNSCallback, patch_model
from tests.support import model_zoo
from tests.support.data import preference_data
from tests.support.recording import TrainingForwards
from tests.support.references import weighted_small_big

trl = pytest.importorskip("trl")

BETA = 0.1


def settings(tmp_path, accumulation: int) -> dict:
    return {
        "output_dir": str(tmp_path / f"out{accumulation}"), "per_device_train_batch_size": 8 // accumulation,
        "gradient_accumulation_steps": accumulation, "max_steps": 1, "learning_rate": 1e-3, "optim": "stable_spam",
        "report_to": "none", "save_strategy": "no", "logging_steps": 1, "use_cpu": True, "disable_tqdm": True,
        "seed": 0, "max_grad_norm": 0.05,
    }  # fmt: skip


def run_first_step(trainer, model) -> tuple[dict, list[dict]]:
    """Train one step, recording every forward with gradients of ``model`` (its keyword arguments)."""
    recorded = TrainingForwards(model, keys=None, labelled=False)
    trainer.train()
    recorded.remove()
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GNSCallback))
    assert len(callback.estimates.history) == 1 and callback.last_batch_size == 8
    return callback.estimates.history[0], recorded.forwards


def norm_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "norm" in n and n.endswith("weight")]


def completion_logps(model, forward: dict, rows: list[int]) -> torch.Tensor:
    """Σ over the completion tokens (labels ≠ −100, shifted) of log p, for the given rows of a recorded forward."""
    labels = forward["labels"][rows]
    logits = model(input_ids=forward["input_ids"][rows], attention_mask=forward["attention_mask"][rows]).logits
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(1)


def per_pair_gradients(policy, forwards: list[dict], pair_loss) -> torch.Tensor:
    """[pairs, P] float64: the gradient of each pair's own loss ``pair_loss(policy, forward, rows)`` over the norm
    weights, one pair at a time."""
    names = norm_names(policy)
    parameters = dict(policy.named_parameters())
    rows = []
    for forward in forwards:
        pairs = forward["input_ids"].shape[0] // 2
        for i in range(pairs):
            gradients = torch.autograd.grad(pair_loss(policy, forward, [i, i + pairs]), [parameters[n] for n in names])
            rows.append(torch.cat([g.flatten() for g in gradients]).double())
    return torch.stack(rows)


def trained_copy_at(model, initial) -> torch.nn.Module:
    """A copy of the model as the Trainer ran it (TRL's fused LM head, accelerate's preparation: a copy taken before
    train() computes differently, at 1e-3), with the weights it had before the step."""
    policy = copy.deepcopy(model).train()
    with torch.no_grad():
        for (name, parameter), (initial_name, value) in zip(
            policy.named_parameters(), initial.named_parameters(), strict=True
        ):
            assert name == initial_name
            parameter.copy_(value)
    return policy


def trainers_own_loss(trainer, keys: tuple[str, ...]):
    """The trainer's compute_loss on a batch of one pair (its class's method: the instance's is GNSCallback's)."""

    def pair_loss(policy, forward, rows):
        batch = {k: forward[k][rows] for k in ("input_ids", "attention_mask")}
        if "completion_mask" in keys:
            batch["completion_mask"] = (forward["labels"][rows] != -100).long()
        return type(trainer).compute_loss(trainer, policy, batch)

    return pair_loss


def assert_first_step(measured: dict, gradients: torch.Tensor, rel: float, accumulation: int) -> None:
    small, big, effective_batch = weighted_small_big(gradients, torch.full((8,), 1 / 8))
    assert measured["small"] == pytest.approx(small, rel=rel), accumulation
    assert measured["big"] == pytest.approx(big, rel=rel), accumulation
    assert measured["effective_batch"] == pytest.approx(effective_batch, rel=1e-6) == 8.0


@pytest.mark.slow
def test_dpo_with_a_reference_model_first_step_equals_per_pair_gradients(tmp_path):
    # float64 throughout: at a policy near its reference the pairs' gradients largely cancel in the batch gradient,
    # whose float32 rounding would then show at 1e-3; a reference of other weights gives each pair its own weight
    # σ(−β·Δ_i) in the gradient
    # float64: a pair's gradient is a difference of its two rows' (which share the prompt), so float32 rounding
    # would show at 1e-4; a reference of other weights gives each pair its own factor σ(−β·Δ_i)
    initial = model_zoo.build("llama").double()
    reference = model_zoo.build("llama", seed=1).double().eval()
    for accumulation in (1, 2, 4):
        model = copy.deepcopy(initial)
        patch_model(model)
        config = trl.DPOConfig(beta=BETA, max_length=None, **settings(tmp_path, accumulation))
        trainer = trl.DPOTrainer(
            model=model, ref_model=copy.deepcopy(reference), args=config, train_dataset=preference_data(),
            processing_class=model_zoo.tokenizer(), callbacks=[GNSCallback()],
        )  # fmt: skip
        measured, forwards = run_first_step(trainer, model)
        assert len(forwards) == accumulation
        policy = trained_copy_at(model, initial)
        gradients = per_pair_gradients(policy, forwards, trainers_own_loss(trainer, ("completion_mask",)))
        assert_first_step(measured, gradients, 1e-4, accumulation)

        def dpo_loss(policy, forward, rows):
            with torch.no_grad():
                reference_logps = completion_logps(reference, forward, rows)
            ratios = completion_logps(policy, forward, rows) - reference_logps
            return -F.logsigmoid(BETA * (ratios[0] - ratios[1]))

        assert_first_step(measured, per_pair_gradients(copy.deepcopy(initial), forwards, dpo_loss), 1e-2, accumulation)
        logged = next(r for r in trainer.state.log_history if "loss" in r)
        assert not math.isnan(logged["gns"]) and logged["batch_size"] == 8


def reward_data(size: int = 8) -> Dataset:
    data = preference_data(size)
    return Dataset.from_dict(
        {"chosen": [p + c for p, c in zip(data["prompt"], data["chosen"], strict=True)],
         "rejected": [p + r for p, r in zip(data["prompt"], data["rejected"], strict=True)]}
    )  # fmt: skip


@pytest.mark.slow
def test_reward_trainer_first_step_equals_per_pair_gradients(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(**{**model_zoo.build("llama").config.to_dict(), "num_labels": 1, "pad_token_id": 0})
    initial = LlamaForSequenceClassification(config).double()  # float64, as for DPO
    for accumulation in (1, 2, 4):
        model = copy.deepcopy(initial)
        patch_model(model)
        args = trl.RewardConfig(max_length=None, **settings(tmp_path, accumulation))
        trainer = trl.RewardTrainer(
            model=model, args=args, train_dataset=reward_data(), processing_class=model_zoo.tokenizer(),
            callbacks=[GNSCallback()],
        )  # fmt: skip
        measured, forwards = run_first_step(trainer, model)
        assert len(forwards) == accumulation
        policy = trained_copy_at(model, initial)
        gradients = per_pair_gradients(policy, forwards, trainers_own_loss(trainer, ()))
        assert_first_step(measured, gradients, 1e-4, accumulation)

        def reward_loss(policy, forward, rows):
            rewards = policy(input_ids=forward["input_ids"][rows], attention_mask=forward["attention_mask"][rows])
            rewards = rewards.logits.squeeze(-1)
            return -F.logsigmoid(rewards[0] - rewards[1])

        assert_first_step(
            measured, per_pair_gradients(copy.deepcopy(initial), forwards, reward_loss), 1e-2, accumulation
        )


def test_dpo_loss_types_that_are_not_a_mean_over_pairs_are_refused(tmp_path):
    model = model_zoo.build("llama")
    patch_model(model)
    config = trl.DPOConfig(beta=BETA, max_length=None, loss_type=["sigmoid", "sft"], **settings(tmp_path, 1))
    trainer = trl.DPOTrainer(
        model=model, ref_model=model_zoo.build("llama"), args=config, train_dataset=preference_data(),
        processing_class=model_zoo.tokenizer(), callbacks=[GNSCallback()],
    )  # fmt: skip
    with pytest.raises(ValueError, match="'sft' loss is a token mean over the chosen rows"):
        trainer.train()
    assert trainer.state.global_step == 0
