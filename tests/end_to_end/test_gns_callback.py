"""GNSCallback inside a real Trainer.train(): logging, and the per-step small/big against torch.func."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import TrainerCallback

from hf_gns_spam import GNSCallback, StableSPAM, patch_model, per_example_grad_stats
from hf_gns_spam.gns.arguments import GNSConfig
from hf_gns_spam.gns.estimates import METRIC_NAMES, TOTAL_METRIC_NAMES
from hf_gns_spam.gns.estimator import GradientNoiseScale, unbiased_estimates
from hf_gns_spam.gns.whole_model import StoredMicroBatch, embedding_parameters, weighted_squared_norms
from tests.support import model_zoo
from tests.support.data import padded_dataset
from tests.support.first_step import first_trainer_step
from tests.support.recording import TrainingForwards
from tests.support.references import per_example_gradients, per_example_norm_gradients, weighted_small_big
from tests.support.trainers import make_trainer


def test_metrics_are_merged_into_the_trainers_log_records(tmp_path):
    model = model_zoo.build("llama")
    patch_model(model)
    callback = GNSCallback()
    trainer = make_trainer(tmp_path, model, callback, num_train_epochs=2)
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 8  # 16 examples / (2 x 2) per step x 2 epochs
    for record in records:
        assert {"loss", "grad_norm", "learning_rate", *METRIC_NAMES} <= set(record)
        assert record["batch_size"] == 4 and record["grad_accum_steps"] == 2
        assert math.isfinite(record["gns_trace_sigma"]) and record["gns_trace_sigma"] > 0
    assert callback.estimates.estimator.updates == 8 and callback.estimates.estimator.skipped == 0
    assert records[-1]["gns_tokens"] == pytest.approx(records[-1]["gns"] * callback.estimates.tokens_per_example)


def test_without_patched_norms_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="patch_model"):
        make_trainer(tmp_path, model_zoo.build("llama"), GNSCallback())


def test_impossible_schedules_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs min_batch_size and max_batch_size"):
        GNSCallback(schedule="gns")
    with pytest.raises(ValueError, match="max_batch_size=4 < min_batch_size=8"):
        GNSCallback(schedule="linear", min_batch_size=8, max_batch_size=4)
    with pytest.raises(ValueError, match="schedule must be None or one of 'linear', 'gns'"):
        GNSCallback(schedule="cosine", min_batch_size=8, max_batch_size=16)
    model = model_zoo.build("llama")
    patch_model(model)
    with pytest.raises(ValueError, match=r"min_batch_size=3 must be a positive multiple of .* = 2"):
        make_trainer(tmp_path, model, GNSCallback(schedule="linear", min_batch_size=3, max_batch_size=8))


def test_the_torch_free_checks_take_the_callbacks_arguments():
    """GNSConfig (which the launcher builds without torch) is what GNSCallback builds from its options, keyword or
    positional, with the same checks: the same message from both; the callback saves it whole."""
    callback = GNSCallback("gns", 8, 64, gns_multiplier=1.5)
    assert callback.config == GNSConfig(schedule="gns", min_batch_size=8, max_batch_size=64, gns_multiplier=1.5)
    assert callback.state()["args"] == callback.config.as_dict()
    assert {name: getattr(callback, name) for name in callback.config.as_dict()} == callback.config.as_dict()
    with pytest.raises(TypeError, match="unexpected keyword argument 'gns_multiplyer'"):
        GNSCallback(gns_multiplyer=2.0)
    for kwargs, message in [
        ({"ema_decay": 1.5, "validate_every": 2}, r"ema_decay must be in \[0, 1\), got 1.5$"),  # not 1.5² = 2.25
        ({"lr_batch_power": -0.5}, r"lr_batch_power must be in \[0, 1\]"),
        ({"verify_interval": 0}, "verify_interval must be an int >= 1 \\(optimizer steps\\), got 0"),
        ({"verify_interval": math.nan}, "verify_interval must be an int >= 1 .*, got nan"),  # never re-verified
        ({"schedule": "gns", "min_batch_size": 4, "max_batch_size": 8, "update_interval": 2.5}, "update_interval must"),
        ({"schedule": "gns", "min_batch_size": 4, "max_batch_size": 8, "gns_multiplier": math.inf}, "finite number"),
        ({"min_batch_size": 16, "max_batch_size": 8}, "max_batch_size=8 < min_batch_size=16"),  # without a schedule
        ({"schedule": "gns", "min_batch_size": 4, "max_batch_size": 8, "max_growth": 1.0}, r"max_growth must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            GNSConfig(**kwargs)
        with pytest.raises(ValueError, match=message):
            GNSCallback(**kwargs)


@pytest.mark.parametrize("architecture", model_zoo.BOTH_NORM_KINDS)
def test_first_step_small_and_big_equal_torch_func(tmp_path, architecture):
    """The first optimizer step's small and big from the callback, recomputed from per-example gradients."""
    initial, callback, _, batch, weights = first_trainer_step(tmp_path, architecture)
    per_example = per_example_norm_gradients(initial, batch)
    small, big, effective_batch = weighted_small_big(per_example, weights)
    measured = callback.estimates.history[0]
    assert measured["batch_size"] == 4
    assert measured["small"] == pytest.approx(small, rel=1e-4)
    assert measured["big"] == pytest.approx(big, rel=1e-4)
    assert measured["effective_batch"] == pytest.approx(effective_batch, rel=1e-6)


@pytest.mark.slow
def test_qlora_trains_with_stable_spam_and_the_callback(tmp_path, has_avx512bf16):
    """bitsandbytes 4-bit base weights + LoRA through the real Trainer, evaluated after every step: the patched norms
    are frozen there and measured all the same (tests/end_to_end/test_gns_frozen_norms.py checks the values)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    has_avx512bf16(True)  # the 4-bit layers as on a CPU with AVX512-BF16, whatever this CPU is
    model_zoo.build("llama").save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    assert len(patch_model(model).patched) == 5
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    callback = GNSCallback()
    trainer = make_trainer(
        tmp_path, model, callback, max_steps=3, learning_rate=1e-2,
        eval_dataset=padded_dataset(), eval_strategy="steps", eval_steps=1,
    )  # fmt: skip
    trainer.train()  # evaluation after every step: on a CPU with AVX512-BF16 it must not repack the 4-bit weights
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) and r["batch_size"] == 4 for r in records)
    assert sum("eval_loss" in r for r in trainer.state.log_history) == 3
    assert not any(math.isnan(r["gns"]) for r in records) and callback.estimates.estimator.skipped == 0  # measured
    assert isinstance(trainer.optimizer.optimizer, StableSPAM)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)


def test_a_trainer_with_other_internals_is_refused_when_the_hooks_are_installed():
    from hf_gns_spam.integrations.trainer_loop import wrap_trainer_class
    from hf_gns_spam.integrations.trainer_optimizer import TrainerIntegrationError

    class Trains:
        def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None): ...

    class RenamedArguments(Trains):
        def set_initial_training_values(self, training_args, dataloader): ...

        def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume, trial): ...

    with pytest.raises(TrainerIntegrationError, match=r"set_initial_training_values takes \('training_args'"):
        wrap_trainer_class(RenamedArguments)

    class Missing(Trains):
        def set_initial_training_values(self, args, dataloader): ...

    with pytest.raises(TrainerIntegrationError, match=r"Trainer._init_training_state does not exist"):
        wrap_trainer_class(Missing)

    class TrainsWithOtherArguments(Missing):
        def train(self, checkpoint=None, trial=None, ignore_keys_for_eval=None): ...

    with pytest.raises(TrainerIntegrationError, match=r"Trainer.train takes \('checkpoint'"):
        wrap_trainer_class(TrainsWithOtherArguments)


def test_deepspeed_is_a_clear_error_not_a_silent_missing_estimate(tmp_path):
    model = model_zoo.build("llama")
    patch_model(model)
    trainer = make_trainer(tmp_path, model, GNSCallback(), max_steps=1)
    trainer.is_deepspeed_enabled = True  # what the Trainer sets under DeepSpeed (not installed here)
    with pytest.raises(ValueError, match="GNSCallback does not work with DeepSpeed"):
        trainer.train()


# ---------------------------------------------------------------------------------------------- validate_every
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "5"])
def test_validate_every_refuses_bad_values(value):
    with pytest.raises(ValueError, match="validate_every must be None"):
        GNSCallback(validate_every=value)


class SnapshotAfterStep(TrainerCallback):
    """The trainable parameters after optimizer step ``step`` (those the next step's examples see)."""

    def __init__(self, step: int) -> None:
        self.step, self.state_dict = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}


# the embeddings by the architectures' own names (not from embedding_parameters, which is under test): LLaMA's
# token embeddings and its LM head (one Parameter when tied), GPT-2's token and position embeddings (its head is wte)
EMBEDDING_NAMES = {
    "llama": ["model.embed_tokens.weight", "lm_head.weight"],
    "llama_tied": ["model.embed_tokens.weight"],
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight"],
}


def build_variant(variant: str, seed: int = 0) -> torch.nn.Module:
    """model_zoo's LLaMA (untied head), LLaMA with a tied head, or GPT-2 (tied, with wpe)."""
    if variant == "llama_tied":
        return model_zoo.build("llama", seed, tie_word_embeddings=True)
    return model_zoo.build(variant, seed)


@pytest.mark.parametrize("variant", sorted(EMBEDDING_NAMES))
def test_embedding_parameters_are_the_embeddings_and_the_head_once(variant):
    model = build_variant(variant)
    by_identity = {id(p): n for n, p in model.named_parameters()}  # a tied Parameter under its first name
    assert sorted(by_identity[id(p)] for p in embedding_parameters(model)) == sorted(EMBEDDING_NAMES[variant])
    head, tokens = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head is tokens) == (variant != "llama")


@pytest.mark.parametrize("variant", sorted(EMBEDDING_NAMES))
def test_whole_model_estimate_on_a_validation_step_equals_torch_func(tmp_path, variant):
    """validate_every=2 on padded data with accumulation 2: step 2's logged gns_total, |G|² and tr Σ equal the
    estimates from per-example gradients of ALL trainable parameters computed independently with torch.func, and
    gns_total_no_embeddings etc. those of all but the embeddings (float64 reference)."""
    model = build_variant(variant)
    patch_model(model)
    callback = GNSCallback(validate_every=2)
    trainer = make_trainer(tmp_path, model, callback, max_steps=2)
    snapshot = SnapshotAfterStep(1)
    trainer.add_callback(snapshot)
    recorded = TrainingForwards(model)
    trainer.train()
    micro_batches, num_items = recorded.forwards, recorded.num_items
    assert len(micro_batches) == 4 and len(callback.estimates.total_history) == 1

    reference = build_variant(variant)  # unpatched, at the parameters step 2 started from
    reference.load_state_dict(snapshot.state_dict)
    batch = {k: torch.cat([m[k] for m in micro_batches[2:]]) for k in micro_batches[0]}
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    assert len(names) > 10  # embeddings, attention, MLP, norms (and GPT-2's biases)
    without_embeddings = [n for n in names if n not in EMBEDDING_NAMES[variant]]
    assert len(without_embeddings) == len(names) - len(EMBEDDING_NAMES[variant])
    tokens = (batch["labels"][:, 1:] != -100).sum(1).double()
    assert num_items[2] == num_items[3]
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert not set(TOTAL_METRIC_NAMES) & set(records[0])  # step 1 was not validated
    logged = records[1]
    assert {*METRIC_NAMES, *TOTAL_METRIC_NAMES} <= set(logged)
    measured = callback.estimates.total_history[0]
    assert measured["step"] == 2
    for prefix, suffix, parameters in (
        ("gns_total", "", names),
        ("gns_total_no_embeddings", "_no_embeddings", without_embeddings),
    ):
        per_example = per_example_gradients(reference, batch, parameters)
        small, big, effective_batch = weighted_small_big(per_example, tokens / num_items[2])
        grad_sq, trace_sigma = unbiased_estimates(small, big, effective_batch)
        assert measured[f"small{suffix}"] == pytest.approx(small, rel=1e-4), prefix
        assert measured[f"big{suffix}"] == pytest.approx(big, rel=1e-4), prefix
        assert measured["effective_batch"] == pytest.approx(effective_batch, rel=1e-6)
        # one update of the EMA, bias-corrected: the step's own estimates
        assert logged[f"{prefix}_grad_sq"] == pytest.approx(grad_sq, rel=1e-4), prefix
        assert logged[f"{prefix}_trace_sigma"] == pytest.approx(trace_sigma, rel=1e-4), prefix
        assert logged[prefix] == pytest.approx(trace_sigma / grad_sq if grad_sq > 0 else math.inf, rel=1e-4), prefix
        assert measured[prefix] == logged[prefix]
    assert measured["small_no_embeddings"] < measured["small"]  # the embeddings have per-example gradients
    # the recomputed gradients restricted to the norms give the norms' own small (from their statistics)
    assert measured["norms_small_recomputed"] == pytest.approx(measured["norms_small"], rel=1e-4)
    assert measured["gns"] == logged["gns"]


def test_checkpoints_keep_the_no_embeddings_estimate_and_old_ones_start_it_fresh(tmp_path):
    model = model_zoo.build("llama")
    patch_model(model)
    callback = GNSCallback(validate_every=1, ema_decay=0.5)
    make_trainer(tmp_path, model, callback, max_steps=2).train()
    assert callback.estimates.total_no_embeddings_estimator.updates == 2
    state = callback.state()
    restored = GNSCallback.from_state(state)
    restored._restore(state["attributes"])
    assert restored.estimates.total_no_embeddings_estimator == callback.estimates.total_no_embeddings_estimator
    assert restored.estimates.total_metrics() == callback.estimates.total_metrics()

    old = copy.deepcopy(state)  # a checkpoint from before the estimate without embeddings
    del old["attributes"]["total_no_embeddings_estimator_state"]
    restored = GNSCallback.from_state(old)
    restored._restore(old["attributes"])
    assert restored.estimates.total_estimator == callback.estimates.total_estimator
    assert restored.estimates.total_no_embeddings_estimator == GradientNoiseScale(ema_decay=0.5)


def test_validation_leaves_training_bit_identical(tmp_path):
    """Parameters after 4 steps, the norms' estimate and the log records are the same with and without
    validate_every; dropout is on, so a recomputation that drew from the RNG would change the trajectory."""

    def run(validate_every):
        model = model_zoo.build("llama")
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.2
        patch_model(model)
        callback = GNSCallback(validate_every=validate_every)
        trainer = make_trainer(tmp_path / str(validate_every), model, callback, max_steps=4)
        trainer.train()
        return model, callback, [r for r in trainer.state.log_history if "loss" in r]

    plain_model, plain, plain_records = run(None)
    model, validated, records = run(2)
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert list(validated.estimates.history) == list(plain.estimates.history) and len(plain.estimates.history) == 4
    assert validated.estimates.estimator.state_dict() == plain.estimates.estimator.state_dict()
    assert [r["step"] for r in records if "gns_total" in r] == [2, 4]
    assert not any(set(TOTAL_METRIC_NAMES) & set(r) for r in plain_records)
    for with_total, without in zip(records, plain_records, strict=True):
        assert {k: v for k, v in with_total.items() if k not in TOTAL_METRIC_NAMES} == without
    assert validated.estimates.total_estimator.updates == 2 and math.isfinite(records[-1]["gns_total_trace_sigma"])


def test_recomputation_leaves_grads_statistics_mode_and_rng_alone():
    """weighted_squared_norms after a real backward: .grad, the norms' statistics, the train mode and the RNG
    state are as they were, and its Σ α²‖g‖² equals torch.func's over all trainable parameters."""
    model = model_zoo.build("llama")
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.2
    patch_model(model)
    model.train()
    batch = model_zoo.batch("llama", batch_size=3)
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = {n: (s.sum_sq.clone(), s.count.clone()) for n, s in per_example_grad_stats(model).items()}
    rng = torch.get_rng_state()
    tokens = (batch["labels"][:, 1:] != -100).sum(1).float()
    weights = tokens / tokens.sum()
    stored = StoredMicroBatch({k: v for k, v in batch.items()}, batch["labels"], None, tokens, weights=weights)
    sums = weighted_squared_norms(model, [stored], shifted=True)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    for name, s in per_example_grad_stats(model).items():
        assert torch.equal(s.sum_sq, stats[name][0]) and torch.equal(s.count, stats[name][1]), name

    reference = model_zoo.build("llama")  # dropout off: the recomputation's masks are random
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    model.eval()
    eval_sums = weighted_squared_norms(model, [stored], shifted=True)
    expected = (weights.double().square() * per_example_gradients(reference, batch, names).square().sum(1)).sum()
    assert float(eval_sums["all"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(sums["all"]) != float(eval_sums["all"])  # dropout was on in training mode


def test_validation_under_fsdp_is_a_clear_error(tmp_path):
    model = model_zoo.build("llama")
    patch_model(model)
    trainer = make_trainer(tmp_path, model, GNSCallback(validate_every=1), max_steps=1)
    trainer.is_fsdp_enabled = True  # what the Trainer sets with an FSDP plugin
    with pytest.raises(ValueError, match=r"validate_every=\.\.\.\) does not work with FSDP"):
        trainer.train()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["label_smoothing", "sequence_classification"])
def test_recomputed_gradients_reproduce_the_norms_statistics(tmp_path, case):
    """On every validation step, the recomputed per-example gradients restricted to the norms give the norms' own
    small (from the statistics of the real backward): the own losses (label smoothing, a classifier's
    cross-entropy) and the weights are those the training loss was made of."""
    data, overrides = padded_dataset(size=8), {}
    if case == "label_smoothing":
        model, overrides = model_zoo.build("llama"), {"label_smoothing_factor": 0.1}
    else:
        pytest.importorskip("datasets")  # remove_columns/map below
        from tests.support.model_zoo import classification_model

        data = data.remove_columns("labels").map(lambda row, i: {"labels": i % 3}, with_indices=True)
        model = classification_model()
    patch_model(model)
    callback = GNSCallback(validate_every=1)
    trainer = make_trainer(tmp_path, model, callback, max_steps=2, **overrides)
    trainer.train_dataset = data
    trainer.train()
    assert len(callback.estimates.total_history) == 2
    for measured in callback.estimates.total_history:
        assert measured["norms_small_recomputed"] == pytest.approx(measured["norms_small"], rel=1e-4)
        assert measured["small"] > measured["norms_small"] and math.isfinite(measured["trace_sigma"])
