"""A user's ``compute_loss`` override through the real Trainer with a GNSCallback, at 8x1, 4x2 and 2x4 micro-batches
x accumulation. At initialisation every example's loss is about log V, so the loss's value matches several
weightings; the gradient observed at the logits decides. A loss that weights the examples as the model's own loss
does, and a mean of per-sequence means (an example mean of the micro-batch), are identified exactly; per-example
importance weights, position-weighted tokens and a loss with a term beyond the label cross-entropies are refused
at the first step, never accepted."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from hf_gns_spam.gns.example_weights import ExampleWeightError
from tests.support import model_zoo
from tests.support.data import padded_dataset
from tests.support.first_step import assert_split_invariant, first_step
from tests.support.references import per_example_norm_gradients, token_losses, weighted_small_big


def label_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != -100).sum(1)


def token_sum_over_items(logits, labels, num_items_in_batch):
    """The model's own loss written out: Σ token losses / label tokens of the accumulated batch."""
    return token_losses(logits, labels).sum() / num_items_in_batch


def mean_of_sequence_means(logits, labels, num_items_in_batch):
    return (token_losses(logits, labels).sum(1) / label_tokens(labels)).mean()


def importance_weighted(logits, labels, num_items_in_batch):
    """Per-example importance weights in [0.5, 3] (from the first token, as a data-dependent weight would be)."""
    importance = 0.5 + 2.5 * (labels[:, 0] % 7) / 6
    return (importance * token_losses(logits, labels).sum(1)).sum() / num_items_in_batch


def position_weighted(logits, labels, num_items_in_batch):
    """A position-weighted token mean of the micro-batch, scaled by its share of the batch's label tokens (so
    that its value is the token mean's where every token's loss is the same)."""
    weights = (0.5 + torch.arange(1, labels.shape[1], dtype=torch.float32) / labels.shape[1]) * (labels[:, 1:] != -100)
    weighted_mean = (token_losses(logits, labels) * weights).sum() / weights.sum()
    return weighted_mean * label_tokens(labels).sum() / num_items_in_batch


def with_z_loss(logits, labels, num_items_in_batch):
    """A token mean plus a z-loss on the log-partition: not a weighted sum of label cross-entropies."""
    z = torch.logsumexp(logits[:, :-1].float(), dim=-1).square() * (labels[:, 1:] != -100)
    return token_sum_over_items(logits, labels, num_items_in_batch) + 1e-4 * z.sum() / num_items_in_batch


def trainer_with(loss_function):
    class CustomLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = loss_function(outputs.logits, labels, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    return CustomLossTrainer


@pytest.mark.slow
def test_an_override_that_weights_as_the_model_does_is_exact(tmp_path):
    data = padded_dataset(size=8)
    measured = [first_step(tmp_path / "own", model_zoo.build("llama"), 2, data)]
    for accumulation in (1, 2, 4):
        trainer_class = trainer_with(token_sum_over_items)
        measured.append(first_step(tmp_path / f"custom{accumulation}", model_zoo.build("llama"), accumulation, data,
                                   trainer_class=trainer_class))  # fmt: skip
    assert_split_invariant(measured)
    assert measured[0]["effective_batch"] < 8  # unequal lengths: the token mean weights the examples unequally


@pytest.mark.slow
def test_a_mean_of_sequence_means_is_identified_as_an_example_mean(tmp_path):
    """Its value is within 2e-3 of the token mean at initialisation; the gradient tells them apart, and every
    example then weighs 1/8 of the step (effective batch 8, where the token mean gives fewer)."""
    data = padded_dataset(size=8)
    measured = [
        first_step(tmp_path / f"means{k}", model_zoo.build("llama"), k, data,
                   trainer_class=trainer_with(mean_of_sequence_means))
        for k in (1, 2, 4)
    ]  # fmt: skip
    assert_split_invariant(measured)
    # the truth: the 8 examples (the whole dataset: every split's first step), each weighing 1/8, with the gradient
    # of its own mean-token loss from float64 torch.func
    batch = {k: torch.tensor(v) for k, v in data[:8].items()}
    model = model_zoo.build("llama")
    small, big, effective_batch = weighted_small_big(per_example_norm_gradients(model, batch), torch.full((8,), 0.125))
    for record in measured:
        assert record["small"] == pytest.approx(small, rel=1e-4)
        assert record["big"] == pytest.approx(big, rel=1e-4)
        assert record["effective_batch"] == pytest.approx(effective_batch, rel=1e-6) == 8.0


@pytest.mark.parametrize("accumulation", [1, 2, 4])
@pytest.mark.parametrize(
    ("loss_function", "message"),
    [
        (importance_weighted, "weights the label tokens otherwise|could not tell how this loss"),
        (position_weighted, "weights the label tokens otherwise|could not tell how this loss"),
        (with_z_loss, "not a weighted sum of the label tokens' cross-entropy gradients"),
    ],
)
def test_other_weightings_are_refused_at_the_first_step(tmp_path, loss_function, message, accumulation):
    data = padded_dataset(size=8)
    with pytest.raises(ExampleWeightError, match=message):
        first_step(tmp_path, model_zoo.build("llama"), accumulation, data, trainer_class=trainer_with(loss_function))


def test_the_loss_values_alone_would_have_been_accepted():
    """The control that makes the refusals above meaningful: at initialisation each of these losses is within the
    loss-value tolerance (2e-3) of the token mean on the same micro-batch, so matching values alone accepts them."""
    model = model_zoo.build("llama")
    batch = {k: torch.tensor(v) for k, v in padded_dataset(size=8)[:8].items()}
    labels = batch.pop("labels")
    logits = model(**batch).logits
    items = label_tokens(labels).sum()
    reference = float(token_sum_over_items(logits, labels, items))
    for loss_function in (mean_of_sequence_means, position_weighted, with_z_loss):
        value = float(loss_function(logits, labels, items))
        assert value != reference and abs(value - reference) <= 2e-3 * reference, loss_function.__name__
