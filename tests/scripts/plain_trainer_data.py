"""The data of plain_trainer.py, imported from the script's own folder."""

import torch
from datasets import Dataset


def counting_dataset(num_examples: int, length: int = 16, vocab_size: int = 64) -> Dataset:
    """Sequences that count up by a per-example stride modulo the vocabulary (learnable)."""
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, vocab_size, (num_examples, 1), generator=generator)
    strides = torch.randint(1, 4, (num_examples, 1), generator=generator)
    input_ids = ((starts + strides * torch.arange(length)) % vocab_size).tolist()
    return Dataset.from_dict({"input_ids": input_ids, "labels": input_ids})
