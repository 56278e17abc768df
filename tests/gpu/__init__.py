"""Tests on a CUDA device (compiled Triton); they skip without one."""
