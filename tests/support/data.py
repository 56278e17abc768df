"""The datasets the tests train and measure on, built in memory (no downloads); ``datasets.Dataset`` where it is
installed, a small stand-in where it is not (the GPU image)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tests.support import model_zoo

if TYPE_CHECKING:
    from datasets import Dataset


class ColumnDataset(torch.utils.data.Dataset):
    """What the tests use of ``datasets.Dataset`` where datasets is not installed (the GPU image): rows as dicts,
    ``dataset["column"]`` as the column's list."""

    def __init__(self, columns: dict):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        return {name: values[key] for name, values in self.columns.items()}


def column_dataset(columns: dict):
    """``datasets.Dataset.from_dict(columns)``, or a :class:`ColumnDataset` without datasets."""
    try:
        from datasets import Dataset
    except ImportError:
        return ColumnDataset(columns)
    return Dataset.from_dict(columns)


def padded_dataset(size: int = 16, length: int = 8, seed: int = 0):
    """Right-padded sequences with 3..length real tokens; padded labels are -100."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, model_zoo.VOCAB, (size, length), generator=generator)
    lengths = torch.randint(3, length + 1, (size,), generator=generator)
    attention_mask = (torch.arange(length) < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return column_dataset(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels.tolist()}
    )


def preference_data(size: int = 8, seed: int = 0) -> Dataset:
    """Prompts and completions of unequal lengths, as word-level strings of the test tokenizer."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)

    def words(length: int) -> str:
        return " ".join(f"t{int(i)}" for i in torch.randint(3, model_zoo.VOCAB, (length,), generator=generator))

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(size):
        lengths = torch.randint(1, 6, (3,), generator=generator).tolist()
        rows["prompt"].append(words(lengths[0] + 1))
        rows["chosen"].append(" " + words(lengths[1]))
        rows["rejected"].append(" " + words(lengths[2]))
    return Dataset.from_dict(rows)
