"""Marks shared by whole test files."""

from __future__ import annotations

import os

import pytest
import torch

#: Marks of the GPU test files: they need CUDA, and compiled Triton (with the default TRITON_INTERPRET=1 that
#: tests/conftest.py sets, the kernels would be interpreted on the host, slowly, and the compiled kernels never run).
GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        reason="interpreted Triton: run the GPU tests with TRITON_INTERPRET=0",
    ),
]
