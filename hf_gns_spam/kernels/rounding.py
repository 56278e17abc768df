"""Float32 → low-precision stores that round the same way on a GPU and in the Triton interpreter.

GPUs (and torch) round float32 to bfloat16 to nearest even; the Triton interpreter, which runs the kernels on CPU
tensors in the tests, truncates. :func:`cast` does the round-to-nearest-even on the bits when ``MANUAL_BF16`` is set
(:func:`interpreting`), so the kernels give the same bits in both places.
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

__all__ = ["bfloat16_bits", "cast", "interpreting"]


@functools.cache
def interpreting() -> bool:
    """Whether kernels run in the Triton interpreter (``TRITON_INTERPRET`` set before triton was imported; read once,
    as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def bfloat16_bits(v):
    """The bits (uint16) of float32 ``v`` rounded to nearest even in bfloat16; NaN stays NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).to(tl.uint16)
    return tl.where(v != v, ((bits >> 16) | 0x40).to(tl.uint16), rounded)  # a quiet NaN of v's sign and payload


@triton.jit
def cast(v, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """float32 ``v`` rounded to nearest even in ``dtype`` (on the bits for bfloat16 when ``MANUAL_BF16``)."""
    if MANUAL_BF16 and dtype == tl.bfloat16:
        out = bfloat16_bits(v).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out
