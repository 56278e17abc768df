"""hf_gns_spam.metrics: the shipped accuracy module through ``evaluate``, and next-token accuracy in the Trainer,
against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_gns_spam.metrics import causal_lm_accuracy, load_metric

IGNORE = -100


@pytest.fixture(scope="module")
def accuracy():
    """HF_HUB_OFFLINE=1 (conftest): the Hub's module cannot load, so this is the package's own."""
    return load_metric("accuracy", keep_in_memory=True)


def test_offline_load_metric_falls_back_to_the_shipped_module(accuracy):
    assert "hf_gns_spam" in accuracy.description
    with pytest.raises(FileNotFoundError):
        load_metric("no_such_metric_anywhere")


def test_shipped_accuracy_equals_a_direct_count(accuracy):
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    weights = rng.random(200)
    correct = [p == r for p, r in zip(predictions.tolist(), references.tolist(), strict=True)]
    assert accuracy.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(
        sum(correct) / 200
    )
    weighted = sum(w for w, c in zip(weights.tolist(), correct, strict=True) if c)
    result = accuracy.compute(predictions=predictions, references=references, sample_weight=weights)
    assert result["accuracy"] == pytest.approx(weighted / weights.sum())
    result = accuracy.compute(predictions=predictions, references=references, normalize=False, sample_weight=weights)
    assert result["accuracy"] == pytest.approx(weighted)
    # the documented example of the Hub's module
    assert accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0]) == {"accuracy": 0.5}


def next_token_accuracy(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of label tokens (t ≥ 1, not -100) that are the argmax of the logits at t − 1, counted directly."""
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    hits = total = 0
    for b in range(input_ids.shape[0]):
        for t in range(1, input_ids.shape[1]):
            if labels[b, t] != IGNORE:
                total += 1
                hits += int(logits[b, t - 1].argmax() == labels[b, t])
    return hits / total


def test_causal_lm_accuracy_in_trainer_evaluate_equals_the_direct_count(tmp_path, accuracy, llama_factory):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = llama_factory().eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 64, (10, 12), generator=generator)
    # labels right about half of the time: the model's own next-token prediction at random positions
    with torch.no_grad():
        predicted = model(input_ids=input_ids).logits.argmax(-1)
    labels = torch.randint(0, 64, (10, 12), generator=generator)
    agree = torch.rand(10, 11, generator=generator) < 0.5
    labels[:, 1:] = torch.where(agree, predicted[:, :-1], labels[:, 1:])
    labels[::3, 8:] = IGNORE  # padded ends (unequal lengths)
    labels[1, 2:5] = IGNORE  # masked tokens inside a row (EOS masked as padding)
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})
    compute_metrics, preprocess_logits_for_metrics = causal_lm_accuracy(accuracy)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(
        model=model,
        args=args,
        eval_dataset=data,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    evaluation = trainer.evaluate()
    expected = next_token_accuracy(model, input_ids, labels)
    assert 0.3 < expected < 0.8
    assert evaluation["eval_accuracy"] == pytest.approx(expected, abs=1e-12)
