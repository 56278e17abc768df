"""Shared fixtures: offline Hugging Face settings, a tiny LLaMA built from a config, a small learnable dataset.

Fixtures only: helpers that test files import live in tests/support/."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Triton kernels run on CPU tensors under the Triton interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.support.tiny_llama import counting_dataset, tiny_llama

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
