"""Packed and padding-free batches: an example is a sequence. The statistics of sequences laid end to end in one
row (position_ids restarting at each) equal those of the same sequences as a padded batch."""

from __future__ import annotations

import pytest
import torch

from hf_gns_spam import patch_model
from hf_gns_spam.sequences import sequence_ids
from tests.support import model_zoo
from tests.support.first_step import assert_split_invariant, first_step
from tests.support.references import assert_same_statistics, snapshot

LENGTHS = (5, 1, 7, 3)


def sequences(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model_zoo.VOCAB, (n,), generator=generator).tolist() for n in LENGTHS]


def padded_batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    length = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def packed_batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """One row, as DataCollatorWithFlattening lays it out."""
    return {
        "input_ids": torch.tensor([[token for r in rows for token in r]]),
        "position_ids": torch.tensor([[p for r in rows for p in range(len(r))]]),
        "use_cache": False,  # transformers keeps packed sequences apart only without a cache (a training setup)
    }


def test_sequence_ids_from_position_ids_and_cumulative_lengths():
    batch = packed_batch(sequences())
    expected = torch.tensor([[0] * 5 + [1] + [2] * 7 + [3] * 3])
    assert torch.equal(sequence_ids(batch), expected)
    del batch["use_cache"]
    cumulative = torch.tensor([0, 5, 6, 13, 16])
    assert torch.equal(sequence_ids({"input_ids": batch["input_ids"], "cu_seq_lens_q": cumulative}), expected)
    assert sequence_ids(padded_batch(sequences())) is None  # no position ids: a row is an example
    ordinary = {"input_ids": torch.zeros(2, 4), "position_ids": torch.arange(4).expand(2, 4)}
    assert sequence_ids(ordinary) is None  # one sequence per row
    with pytest.raises(ValueError, match="cu_seq_lens_q covers 15 tokens but the batch has 16"):
        sequence_ids({"input_ids": batch["input_ids"], "cu_seq_lens_q": torch.tensor([0, 5, 6, 13, 15])})


@pytest.mark.parametrize("architecture", model_zoo.BOTH_NORM_KINDS)
def test_packed_row_statistics_equal_the_padded_batch(architecture):
    """The sum of the squared per-sequence gradients of Σ(logits·R) over the packed row equals the padded batch's
    (R fixed random weights per token, the same for a token wherever it sits)."""
    rows = sequences()
    padded, packed = model_zoo.build(architecture), model_zoo.build(architecture)
    patch_model(padded)
    patch_model(packed)
    weights = torch.randn(sum(LENGTHS), model_zoo.VOCAB, generator=torch.Generator().manual_seed(2))
    padded_logits = padded(**padded_batch(rows)).logits
    mask = padded_batch(rows)["attention_mask"].bool()
    (padded_logits[mask] * weights).sum().backward()
    packed_logits = packed(**packed_batch(rows)).logits[0]
    torch.testing.assert_close(packed_logits, padded_logits[mask])  # the model keeps the sequences apart
    (packed_logits * weights).sum().backward()
    measured, expected = snapshot(packed), snapshot(padded)
    assert all(count == len(LENGTHS) for _, count in measured.values())
    assert_same_statistics(measured, expected)


@pytest.mark.slow
def test_trl_padding_free_and_packing_give_the_padded_batch_estimate(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": sequences() + sequences(seed=1)})  # 8 sequences of unequal lengths

    def sft(name: str, **config):
        return first_step(
            tmp_path / name, model_zoo.build("llama"), 1, data, trainer_class=trl.SFTTrainer,
            args_class=trl.SFTConfig, trainer_kwargs={"processing_class": model_zoo.tokenizer()}, **config,
        )  # fmt: skip

    padded = sft("padded", max_length=None)
    padding_free = sft("padding_free", padding_free=True, max_length=None)
    packed = sft("packed", packing=True, max_length=64)
    assert_split_invariant([padding_free, packed])
    # the padded batch runs attention over padded rows: its float32 gradients differ by ~1e-4 (the statistics
    # themselves are exact, test_packed_row_statistics_equal_the_padded_batch)
    assert_split_invariant([padded, packed], rel=1e-3)
    assert padded["batch_size"] == padding_free["batch_size"] == packed["batch_size"] == 8
