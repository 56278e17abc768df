"""Blockwise-quantized storage of Adam's moments in bitsandbytes' formats (the quantized rows of the state-format
table, :data:`hf_gns_spam.kernels.step_contract.STATE_FORMATS`: ``state_bits`` 8 and 4).

A moment tensor x (float32, flattened) is split into blocks of ``blocksize`` elements; each block stores its
absmax a = max|x| (float32) and, per element, the index of the nearest value of a code map c (a table of values in
[-1, 1] or [0, 1]): x ≈ c[index] · a. This is the layout of ``bitsandbytes.functional.quantize_blockwise``, so
``bitsandbytes.functional.dequantize_blockwise(indices, absmax=absmax, code=code, blocksize=blocksize)`` reads a
stored moment (after :func:`unpack_indices` for fewer than 8 bits, which keeps ``8 // bits`` indices per byte, the
first element in the high bits).

The formats themselves (block sizes, code maps, why 4-bit v has no zero point) are the table's
(:func:`moment_format`). Tensors with fewer than :data:`MIN_QUANTIZED_NUMEL` elements keep float32 moments, as
bitsandbytes does.
"""

from __future__ import annotations

import torch

from hf_gns_spam.kernels.step_contract import MIN_QUANTIZED_NUMEL, QuantizedFormat, moment_format

__all__ = ["MIN_QUANTIZED_NUMEL", "QuantizedFormat", "dequantize", "moment_format", "quantize", "unpack_indices"]


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    padding = (-x.numel()) % blocksize
    return torch.nn.functional.pad(x.reshape(-1), (0, padding)).view(-1, blocksize)


def quantize(x: torch.Tensor, fmt: QuantizedFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices uint8, ``fmt.indices_per_byte`` per byte; absmax float32 per block) of the float tensor ``x``."""
    blocks = _blocks(x.float(), fmt.blocksize)
    absmax = blocks.abs().amax(1)
    normalized = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    code = fmt.code(x.device)
    # nearest code value: the index of the first midpoint above the value
    indices = torch.bucketize(normalized, (code[1:] + code[:-1]) / 2).to(torch.uint8).reshape(-1)[: x.numel()]
    return _pack_indices(indices, fmt), absmax


def dequantize(indices: torch.Tensor, absmax: torch.Tensor, fmt: QuantizedFormat, numel: int) -> torch.Tensor:
    """The float32 tensor (flat, ``numel`` elements) that :func:`quantize` stored."""
    values = fmt.code(indices.device)[unpack_indices(indices, fmt, numel).long()]
    return (_blocks(values, fmt.blocksize) * absmax[:, None]).reshape(-1)[:numel]


def _shifts(fmt: QuantizedFormat, device: torch.device) -> torch.Tensor:
    """The left shift of each of a byte's ``indices_per_byte`` indices, the first element in the high bits:
    bits·(indices_per_byte − 1 − j) for the j-th."""
    return torch.arange(fmt.indices_per_byte - 1, -1, -1, dtype=torch.uint8, device=device) * fmt.bits


def _pack_indices(indices: torch.Tensor, fmt: QuantizedFormat) -> torch.Tensor:
    """``indices_per_byte`` consecutive indices per byte (one: the indices themselves); a last partial byte is
    padded with index 0."""
    if fmt.indices_per_byte == 1:
        return indices
    padding = (-indices.numel()) % fmt.indices_per_byte
    groups = torch.nn.functional.pad(indices, (0, padding)).view(-1, fmt.indices_per_byte)
    return (groups << _shifts(fmt, indices.device)).sum(1, dtype=torch.uint8)


def unpack_indices(packed: torch.Tensor, fmt: QuantizedFormat, numel: int) -> torch.Tensor:
    """One uint8 index per element (``numel`` of them) from ``fmt.indices_per_byte`` indices per byte."""
    if fmt.indices_per_byte == 1:
        return packed[:numel]
    mask = (1 << fmt.bits) - 1
    return ((packed[:, None] >> _shifts(fmt, packed.device)) & mask).reshape(-1)[:numel]
