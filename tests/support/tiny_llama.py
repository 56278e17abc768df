"""The model and data of the ``llama_factory`` and ``dataset_factory`` fixtures (tests/conftest.py): a 2-layer LLaMA
of vocabulary 64 and counting sequences it can learn. Imported by the conftest: it imports torch alone at the
top (transformers and datasets when called)."""

from __future__ import annotations

import torch

from tests.support.data import column_dataset

VOCAB_SIZE = 64
SEQUENCE_LENGTH = 16


def tiny_llama(seed: int = 0):
    """A 2-layer LlamaForCausalLM with hidden size 32, randomly initialised from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def counting_dataset(num_examples: int = 64, seed: int = 0):
    """Sequences that count up by a per-example stride modulo the vocabulary: learnable, so the loss must fall."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB_SIZE, (num_examples, 1), generator=gen)
    strides = torch.randint(1, 4, (num_examples, 1), generator=gen)
    input_ids = (starts + strides * torch.arange(SEQUENCE_LENGTH)) % VOCAB_SIZE
    return column_dataset({"input_ids": input_ids.tolist(), "labels": input_ids.tolist()})
