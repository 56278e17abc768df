"""Shared fixtures: offline Hugging Face settings, a tiny LLaMA built from a config, a small learnable dataset."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Triton kernels run on CPU tensors under the Triton interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

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
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB_SIZE, (num_examples, 1), generator=gen)
    strides = torch.randint(1, 4, (num_examples, 1), generator=gen)
    input_ids = (starts + strides * torch.arange(SEQUENCE_LENGTH)) % VOCAB_SIZE
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": input_ids.tolist()})


@pytest.fixture
def llama_factory():
    return tiny_llama


@pytest.fixture
def dataset_factory():
    return counting_dataset


@pytest.fixture
def has_avx512bf16(monkeypatch):
    """``has_avx512bf16(True)``: bitsandbytes believes the CPU has AVX512-BF16 (or not, with False) from then on,
    so that 4-bit layers built afterwards take (or skip) its AVX512-BF16 CPU branch on any CPU."""

    def set_cpu_kind(value: bool) -> None:
        import bitsandbytes.functional
        import bitsandbytes.nn.modules

        monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: value)
        monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: value)

    return set_cpu_kind
