"""The GNS of frozen norms (peft LoRA and QLoRA freeze them): the first optimizer step's small, big and effective
batch through the real Trainer at 8x1, 4x2 and 2x4 micro-batches x accumulation, against per-example gradients of
the norm weights computed one example at a time (each example's own mean-token loss, weighted as the Trainer's loss
weights it); the frozen weights stay untouched; a model whose backward reaches no norm is reported once."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_gns_spam import GNSCallback, patch_model
from tests.support import model_zoo
from tests.support.data import padded_dataset
from tests.support.recording import TrainingForwards
from tests.support.references import token_losses, weighted_small_big

LLAMA_NORMS = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
LLAMA_NORMS.append("model.norm")
# the first block's input norm reads the frozen embeddings' output, which carries no gradient: measuring it would
# add a backward through the frozen projections above it, so it is left out (README, "Fine-tuning")
MEASURED_UNDER_LORA = LLAMA_NORMS[1:]


def lora_llama() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model_zoo.build("llama"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))


def qlora_llama(tmp_path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    model_zoo.build("llama").save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))


def norm_weight_names(model: torch.nn.Module, modules: list[str]) -> list[str]:
    """The peft model's parameter names of the given base-model norm modules' weights (in the given order)."""
    names = [n for n, _ in model.named_parameters()]
    return [next(n for n in names if n.endswith(f"{module}.weight")) for module in modules]


def own_loss_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor], names: list[str], dtype) -> torch.Tensor:
    """[B, P]: the gradient of each example's own mean-token loss w.r.t. the parameters ``names`` (frozen in the
    model, made trainable on a copy), one example at a time with plain autograd (no per-example machinery)."""
    reference = copy.deepcopy(model)
    if dtype == torch.float64:
        reference = reference.double()
    parameters = dict(reference.named_parameters())
    tracked = [parameters[n].requires_grad_(True) for n in names]
    rows = []
    for b in range(len(batch["labels"])):
        example = {k: batch[k][b : b + 1] for k in ("input_ids", "attention_mask")}
        labels = batch["labels"][b : b + 1]
        loss = token_losses(reference(**example).logits, labels).sum() / (labels[:, 1:] != -100).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, tracked)]).double())
    return torch.stack(rows)


def first_step(tmp_path, model, accumulation: int) -> tuple[dict, dict, torch.Tensor, Trainer]:
    """One optimizer step of 8 examples as (8 / accumulation) x accumulation micro-batches: the callback's record,
    the step's whole batch, each example's weight in the Trainer's loss, the trainer."""
    callback = GNSCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"out{accumulation}"), per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-2, optim="stable_spam",
        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
        max_grad_norm=0.05,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=padded_dataset(), callbacks=[callback])
    recorded = TrainingForwards(model)
    trainer.train()
    recorded.remove()
    assert len(recorded.forwards) == accumulation and len(callback.estimates.history) == 1
    batch = recorded.batch()
    weights = (batch["labels"][:, 1:] != -100).sum(1).double() / recorded.num_items[0]
    return callback.estimates.history[0], batch, weights, trainer


def assert_first_step_equals_reference(tmp_path, build, dtype) -> None:
    for accumulation in (1, 2, 4):
        model = build()
        patch_model(model)
        initial = copy.deepcopy(model)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
        assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if "norm" in n)
        measured, batch, weights, trainer = first_step(tmp_path, model, accumulation)
        names = norm_weight_names(initial, MEASURED_UNDER_LORA)
        small, big, effective_batch = weighted_small_big(own_loss_gradients(initial, batch, names, dtype), weights)
        assert measured["small"] == pytest.approx(small, rel=1e-4), accumulation
        assert measured["big"] == pytest.approx(big, rel=1e-4), accumulation
        assert measured["effective_batch"] == pytest.approx(effective_batch, rel=1e-6), accumulation
        logged = next(r for r in trainer.state.log_history if "loss" in r)
        # measured (nan means skipped); one step's |G|² estimate may be ≤ 0, hence inf
        assert not math.isnan(logged["gns"]) and not math.isnan(logged["gns/block"])
        # the frozen weights were measured, not trained
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


@pytest.mark.slow
def test_lora_frozen_norms_first_step_equals_per_example_gradients(tmp_path):
    assert_first_step_equals_reference(tmp_path, lora_llama, torch.float64)


@pytest.mark.slow
def test_qlora_frozen_norms_first_step_equals_per_example_gradients(tmp_path, has_avx512bf16):
    has_avx512bf16(False)
    assert_first_step_equals_reference(tmp_path, lambda: qlora_llama(tmp_path), torch.float32)


def test_a_model_whose_backward_reaches_no_norm_is_reported_once_and_refused_by_a_gns_schedule(tmp_path, caplog):
    """LoRA on the output head only: nothing below the head carries a gradient, so the backward reaches no norm
    and there is no GNS. Measuring only, the first step says so once; a "gns" schedule stops at the first step."""
    from peft import LoraConfig, get_peft_model

    from tests.support.trainers import make_trainer

    def head_only():
        model = get_peft_model(model_zoo.build("llama"), LoraConfig(r=4, target_modules=["lm_head"]))
        patch_model(model)
        return model

    callback = GNSCallback()
    trainer = make_trainer(tmp_path / "measure", head_only(), callback, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="hf_gns_spam.gns.callback"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "reached no patched normalization" in r.getMessage()]
    assert len(warnings) == 1 and "at optimizer step 1" in warnings[0]
    assert all(math.isnan(r["gns"]) for r in trainer.state.log_history if "loss" in r)

    scheduled = GNSCallback(schedule="gns", min_batch_size=4, max_batch_size=16)
    trainer = make_trainer(tmp_path / "gns", head_only(), scheduled, max_steps=3)
    with pytest.raises(ValueError, match=r"reached no patched normalization layer.*never move"):
        trainer.train()
    assert trainer.state.global_step == 0
