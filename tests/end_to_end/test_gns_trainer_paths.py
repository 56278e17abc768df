"""GNSCallback on the paths users take: uneven epochs, fractional epochs, add_callback, callbacks restored from a
checkpoint, label smoothing, compute_loss_func, sequence classification, TRL's SFTTrainer, gradient checkpointing,
and a dead (NaN) run. Every schedule test audits each step's gradient against an independent recomputation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_gns_spam import GNSCallback, patch_model
from hf_gns_spam.gns.example_weights import ExampleWeightError
from tests.support import model_zoo
from tests.support.data import padded_dataset
from tests.support.first_step import assert_split_invariant, first_step
from tests.support.model_zoo import classification_model
from tests.support.references import token_losses
from tests.support.schedule_runs import rows, run


def sorted_rows(dataset) -> list[tuple[int, ...]]:
    return sorted(tuple(r) for r in dataset["input_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("padding", [True, False], ids=["padded", "full-length"])
def test_uneven_epoch_end_every_step_exact_every_row_twice(tmp_path, padding):
    """90 rows, micro-batches of 4 (the last has 2), batch 4 -> 16 over 2 epochs (issue 9's reproduction)."""
    data = padded_dataset(size=90, length=8 if padding else 6)
    if not padding:
        data = data.map(lambda row: {"attention_mask": [1] * 6, "labels": row["input_ids"]})
    callback = GNSCallback(schedule="linear", min_batch_size=4, max_batch_size=16)
    trainer, auditor = run(tmp_path, callback, dataset=data, num_train_epochs=2, per_device_train_batch_size=4)
    trainer.train()
    assert auditor.max_relative_error < 1e-5  # each step = the token-mean gradient of exactly its micro-batches
    seen = rows([m for step in auditor.steps for m in step])
    assert len(seen) == 180 and sorted(seen[:90]) == sorted_rows(data) and sorted(seen[90:]) == sorted_rows(data)
    sizes = [sum(len(m["input_ids"]) for m in step) for step in auditor.steps]
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["batch_size"] for r in records] == sizes and callback.samples == 180
    assert [r["grad_accum_steps"] for r in records] == [len(step) for step in auditor.steps]
    assert max(sizes) == 12 and sizes[-1] == 6  # grew (16 only at the very end); the epochs' ends are exact steps
    assert trainer.state.max_steps == trainer.state.global_step == len(sizes)


@pytest.mark.slow
def test_fractional_epochs_use_their_share_of_the_data(tmp_path):
    # lr_batch_power=0: the learning rate is the schedule in data alone (the default 0.5 multiplies it by √B)
    callback = GNSCallback(schedule="linear", min_batch_size=1, max_batch_size=4, lr_batch_power=0.0)
    trainer, auditor = run(tmp_path, callback, num_train_epochs=0.5)  # 24 rows, micro-batch 1
    trainer.train()
    assert auditor.max_relative_error < 1e-5
    assert callback.samples == 12 == sum(len(step) for step in auditor.steps)  # half the data, not all of it
    warmup = 2  # cosine with warmup 0.1 of 12 reference steps
    after_warmup = auditor.learning_rates[warmup:]
    assert after_warmup == sorted(after_warmup, reverse=True)  # the schedule never climbs back up
    factor = trainer.lr_scheduler.lr_lambdas[0]
    before = [sum(len(step) for step in auditor.steps[:k]) for k in range(len(auditor.steps))]
    assert auditor.learning_rates == pytest.approx([1e-3 * factor(s) for s in before], rel=1e-9)


@pytest.mark.slow
def test_add_callback_trains_exactly(tmp_path):
    trainer, auditor = run(tmp_path, GNSCallback(), num_train_epochs=1)
    trainer.remove_callback(GNSCallback)
    added = GNSCallback(schedule="linear", min_batch_size=1, max_batch_size=3)
    trainer.add_callback(added)
    trainer.train()
    assert auditor.max_relative_error < 1e-5 and added.samples == 24
    assert max(len(step) for step in auditor.steps) == 3


@pytest.mark.slow
def test_callback_restored_from_a_checkpoint_resumes_bit_identically(tmp_path):
    def callback():
        return GNSCallback(schedule="linear", min_batch_size=1, max_batch_size=4)

    settings = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 11}
    straight, _ = run(tmp_path / "a", callback(), **settings)
    straight.train()
    first, _ = run(tmp_path / "b", callback(), **settings)
    first.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-11"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["GNSCallback"]
    assert 0 < saved["attributes"]["controller_state"]["position"] < 24  # mid-epoch
    assert saved["attributes"]["controller_state"]["accumulation"] > 1  # after the batch grew
    other_model = model_zoo.build("llama", seed=5)
    resumed, auditor = run(
        tmp_path / "b", callback(), model=other_model, restore_callback_states_from_checkpoint=True, **settings
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), (_, b) in zip(resumed.model.named_parameters(), straight.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    restored = next(c for c in resumed.callback_handler.callbacks if isinstance(c, GNSCallback))
    original = next(c for c in straight.callback_handler.callbacks if isinstance(c, GNSCallback))
    assert restored.samples == 48 and restored.estimates.estimator == original.estimates.estimator
    assert auditor.max_relative_error < 1e-5
    examples = [r["examples_seen"] for r in resumed.state.log_history if "loss" in r]
    assert examples == [r["examples_seen"] for r in straight.state.log_history if "loss" in r] and examples[-1] == 48


@pytest.mark.slow
def test_resumed_from_a_checkpoint_without_the_callback_the_examples_seen_are_unknown(tmp_path):
    """A run that had no GNSCallback, resumed with one: the examples before the checkpoint are unknown (its
    batches were not logged), so examples_seen is nan rather than the count since the resume; a fresh train()
    counts again."""
    first, _ = run(tmp_path, TrainerCallback(), num_train_epochs=1, save_strategy="steps", save_steps=10)
    first.train()  # patched, but no GNSCallback
    callback = GNSCallback()
    # no checkpoints: transformers 5.25 cannot save one for a callback its checkpoint's state lacks (KeyError)
    resumed, _ = run(tmp_path, callback, num_train_epochs=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10"))
    records = [r for r in resumed.state.log_history if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 25)) and "examples_seen" not in records[9]
    assert all(math.isnan(r["examples_seen"]) and r["batch_size"] == 1 for r in records[10:])
    assert callback.samples == 14 and not callback.samples_from_start
    resumed.train()  # from the start: counted from the start
    records = [r for r in resumed.state.log_history if "loss" in r]
    assert [r["examples_seen"] for r in records] == list(range(1, 25)) and callback.samples_from_start


# ---------------------------------------------------------------------------------------------------------------
# the same examples as 8x1, 4x2 and 2x4 micro-batches: the same first-step estimate, whoever computes the loss


@pytest.mark.slow
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_causal_lm_split_invariance_with_and_without_label_smoothing(tmp_path, smoothing):
    data = padded_dataset(size=8)
    measured = [
        first_step(tmp_path, model_zoo.build("llama"), k, data, label_smoothing_factor=smoothing) for k in (1, 2, 4)
    ]
    assert_split_invariant(measured)
    assert measured[0]["effective_batch"] < 8  # unequal lengths: fewer effective examples than rows


def smoothed_own_loss_gradients(model, batch, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients of each example's own smoothed mean token loss over the norm weights (torch.func),
    and the examples' label-token counts."""
    names = [n for n, _ in model.named_parameters() if "norm" in n]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def own_loss(tracked, b):
        example = {k: batch[k][b : b + 1] for k in ("input_ids", "attention_mask")}
        logits = torch.func.functional_call(model, {**params, **tracked}, args=(), kwargs=example).logits[:, :-1]
        labels = batch["labels"][b : b + 1, 1:]
        mask = labels != -100
        neg_log_probs = -torch.log_softmax(logits[mask], -1)
        nll = neg_log_probs.gather(-1, labels[mask][:, None]).squeeze(-1)
        return ((1 - smoothing) * nll + smoothing * neg_log_probs.mean(-1)).mean()

    tracked = {n: params[n] for n in names}
    gradients = torch.stack(
        [torch.cat([g.flatten() for g in torch.func.grad(own_loss)(tracked, b).values()]) for b in range(8)]
    ).double()
    return gradients, (batch["labels"][:, 1:] != -100).sum(1).double()


@pytest.mark.slow
def test_label_smoothing_first_step_equals_torch_func(tmp_path):
    data = padded_dataset(size=8)
    model = model_zoo.build("llama")
    reference = copy.deepcopy(model)
    measured = first_step(tmp_path, model, 2, data, label_smoothing_factor=0.1)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    # the Trainer's random sampler shuffles the rows; the statistics are sums over examples, so order is irrelevant
    gradients, tokens = smoothed_own_loss_gradients(reference, batch, 0.1)
    weights = tokens / tokens.sum()
    small = (weights.square() * gradients.square().sum(1)).sum() / weights.square().sum()
    big = (weights[:, None] * gradients).sum(0).square().sum()
    assert measured["small"] == pytest.approx(small.item(), rel=1e-4)
    assert measured["big"] == pytest.approx(big.item(), rel=1e-4)
    assert measured["effective_batch"] == pytest.approx((1 / weights.square().sum()).item(), rel=1e-6)


@pytest.mark.slow
def test_compute_loss_func_token_mean_is_identified_and_others_are_refused(tmp_path):
    data = padded_dataset(size=8)

    def token_sum_over_items(outputs, labels, num_items_in_batch=None):
        return token_losses(outputs.logits, labels).sum() / num_items_in_batch

    own = first_step(tmp_path / "own", model_zoo.build("llama"), 2, data)
    custom = first_step(
        tmp_path / "custom", model_zoo.build("llama"), 2, data,
        trainer_kwargs={"compute_loss_func": token_sum_over_items},
    )  # fmt: skip
    assert_split_invariant([own, custom])

    def squared_error(outputs, labels, num_items_in_batch=None):  # not a weighted mean of cross-entropies
        return outputs.logits.float().square().mean()

    with pytest.raises(ExampleWeightError, match="could not tell how this loss"):
        first_step(
            tmp_path / "bad", model_zoo.build("llama"), 2, data, trainer_kwargs={"compute_loss_func": squared_error}
        )


def test_a_compute_loss_override_that_ignores_return_outputs_is_a_clear_error_at_the_first_step(tmp_path):
    """A user's compute_loss that always returns the loss alone, even when asked for (loss, outputs): the callback
    needs the outputs on the micro-batches where it observes the loss's weighting, so the first step stops with an
    error naming the override and the fix (it once crashed with "iteration over a 0-d tensor")."""

    class LossOnlyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss  # return_outputs ignored

    with pytest.raises(TypeError, match=r"LossOnlyTrainer.compute_loss\(..., return_outputs=True\) returned Tensor"):
        first_step(tmp_path, model_zoo.build("llama"), 2, padded_dataset(size=8), trainer_class=LossOnlyTrainer)


@pytest.mark.slow
def test_sequence_classification_split_invariance(tmp_path):
    """The model ignores num_items_in_batch (a mean per micro-batch) and the Trainer does not divide by the
    accumulation: the step's gradient is a sum of micro-batch means; the estimate must not depend on the split."""
    data = padded_dataset(size=8).remove_columns("labels")
    data = data.map(lambda row, i: {"labels": i % 3, "input_ids": [t if m else 0 for t, m in
                    zip(row["input_ids"], row["attention_mask"], strict=True)]}, with_indices=True)  # fmt: skip
    measured = [first_step(tmp_path, classification_model(), k, data) for k in (1, 2, 4)]
    assert_split_invariant(measured)
    assert measured[0]["effective_batch"] == pytest.approx(8.0)


@pytest.mark.slow
def test_trl_sft_trainer_split_invariance(tmp_path):
    trl = pytest.importorskip("trl")
    data = padded_dataset(size=8).remove_columns(["attention_mask", "labels"])
    data = data.map(lambda row: {"input_ids": row["input_ids"][: 3 + sum(row["input_ids"]) % 6]})  # unequal lengths

    def sft(k):
        return first_step(
            tmp_path / f"sft{k}", model_zoo.build("llama"), k, data, trainer_class=trl.SFTTrainer,
            args_class=trl.SFTConfig, max_length=None, trainer_kwargs={"processing_class": model_zoo.tokenizer()},
        )  # fmt: skip

    measured = [sft(k) for k in (1, 2, 4)]
    assert_split_invariant(measured)
    assert measured[0]["effective_batch"] < 8


@pytest.mark.slow
def test_trl_outputs_are_asked_for_only_when_the_weighting_is_identified(tmp_path):
    """TRL's SFTTrainer runs a second, no-grad forward whenever compute_loss is asked for the outputs (its fused LM
    head builds no logits): the callback asks on the first micro-batch (whose examples have unequal lengths, which
    confirms the weighting) and then once every verify_interval steps, not on every micro-batch, and TRL's
    deprecation notice for that request is not shown to the user."""
    import warnings

    trl = pytest.importorskip("trl")
    data = padded_dataset(size=24, length=32).remove_columns(["attention_mask", "labels"])
    data = data.map(lambda row, i: {"input_ids": row["input_ids"][: 3 + i]}, with_indices=True)  # all lengths differ
    model = model_zoo.build("llama")
    patch_model(model)
    forwards = {"grad": 0, "no_grad": 0}
    model.register_forward_pre_hook(
        lambda module, args: forwards.__setitem__(key := "grad" if torch.is_grad_enabled() else "no_grad",
                                                  forwards[key] + 1)
    )  # fmt: skip
    steps, accumulation, verify_interval = 5, 2, 2
    config = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=1e-3, optim="stable_spam", report_to="none", save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, max_length=None,
    )  # fmt: skip
    callback = GNSCallback(verify_interval=verify_interval)
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=model_zoo.tokenizer(), callbacks=[callback]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert forwards["grad"] == steps * accumulation
    assert forwards["no_grad"] == 1 + (steps - 1) // verify_interval  # identified at step 1, verified at 3 and 5
    assert not [w for w in caught if "return_outputs" in str(w.message)]
    history = callback.estimates.history
    assert len(history) == steps and all(math.isfinite(h["small"]) for h in history)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_estimate(tmp_path):
    data = padded_dataset(size=8)
    plain = first_step(tmp_path / "plain", model_zoo.build("llama"), 2, data)
    checkpointed = first_step(tmp_path / "ckpt", model_zoo.build("llama"), 2, data, gradient_checkpointing=True)
    assert_split_invariant([plain, checkpointed])


@pytest.mark.slow
def test_a_dead_run_is_reported_not_fed(tmp_path):
    """After the loss turns NaN, gns is logged as nan and the "gns" schedule stops deciding."""
    calls = {"n": 0}

    def loss_that_dies(outputs, labels, num_items_in_batch=None):
        calls["n"] += 1
        loss = token_losses(outputs.logits, labels).sum() / num_items_in_batch
        return loss * math.nan if calls["n"] > 8 else loss

    callback = GNSCallback(schedule="gns", min_batch_size=2, max_batch_size=16, update_interval=1, gns_multiplier=1e6)
    trainer, _ = run(tmp_path, callback, num_train_epochs=1, trainer_kwargs={"compute_loss_func": loss_that_dies})
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    sizes = [r["batch_size"] for r in records]
    dead = [i for i, r in enumerate(records) if sum(r["batch_size"] for r in records[: i + 1]) > 8]
    assert all(math.isnan(records[i]["gns"]) for i in dead)
    assert len({sizes[i] for i in dead}) == 1  # no more growth once the run is dead
    assert callback.estimates.estimator.skipped == len(dead)
