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

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    try:
        import triton.runtime.interpreter as _interpreter
    except ImportError:
        _interpreter = None
    if _interpreter is not None and hasattr(_interpreter, "_patch_lang_tensor"):
        # Triton 3.6's interpreter turns a scalar into int() without squeezing its 1-element array, so
        # ``range(tensor, ...)`` in a kernel fails ("only 0-dimensional arrays ..."); later releases squeeze.
        _patch_lang_tensor = _interpreter._patch_lang_tensor

        def _patch_lang_tensor_with_scalar_index(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

        _interpreter._patch_lang_tensor = _patch_lang_tensor_with_scalar_index

#: Marks of the GPU test files: they need CUDA, and compiled Triton (with the default TRITON_INTERPRET=1 set above,
#: the kernels would be interpreted on the host, slowly, and the compiled kernels never run).
GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        reason="interpreted Triton: run the GPU tests with TRITON_INTERPRET=0",
    ),
]

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
    pytest.importorskip("bitsandbytes")

    def set_cpu_kind(value: bool) -> None:
        import bitsandbytes.functional
        import bitsandbytes.nn.modules

        monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: value)
        monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: value)

    return set_cpu_kind
