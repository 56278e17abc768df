"""Blockwise-quantized storage of Adam's moments in bitsandbytes' formats (``state_bits`` 8 and 4).

A moment tensor x (float32, flattened) is split into blocks of ``blocksize`` elements; each block stores its
absmax a = max|x| (float32) and, per element, the index of the nearest value of a code map c (a table of values in
[-1, 1] or [0, 1]): x ≈ c[index] · a. This is the layout of ``bitsandbytes.functional.quantize_blockwise``, so
``bitsandbytes.functional.dequantize_blockwise(indices, absmax=absmax, code=code, blocksize=blocksize)`` reads a
stored moment (after :func:`unpack_nibbles` for 4 bits, which keeps two indices per byte).

Formats (:func:`moment_format`):

* 8 bits, as bitsandbytes' 8-bit Adam: m with the signed dynamic map, v with the unsigned dynamic map, blocks of
  256; about 2.03 bytes per parameter for both moments.
* 4 bits (Li et al., NeurIPS 2023, "Memory Efficient Optimizers with 4-bit States"): m with the signed 4-bit
  dynamic map, blocks of 128; v with a linear map without a zero point, c = (1..16)/16, blocks of 128. A zero point
  in v's map rounds small second moments to 0, and Adam's update m/(√v + ε) then explodes; the paper measured
  exactly that failure and that excluding zero fixes it. About 1.06 bytes per parameter.

Tensors with fewer than :data:`MIN_QUANTIZED_NUMEL` elements keep float32 moments, as bitsandbytes does.
"""

from __future__ import annotations

import torch

from hf_gns_spam.kernels.step_contract import QuantizedFormat, moment_format

__all__ = ["MIN_QUANTIZED_NUMEL", "QuantizedFormat", "dequantize", "moment_format", "quantize", "unpack_nibbles"]

MIN_QUANTIZED_NUMEL = 4096


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    padding = (-x.numel()) % blocksize
    return torch.nn.functional.pad(x.reshape(-1), (0, padding)).view(-1, blocksize)


def quantize(x: torch.Tensor, fmt: QuantizedFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices uint8 — packed two per byte for 4 bits —, absmax float32 per block) of the float tensor ``x``."""
    blocks = _blocks(x.float(), fmt.blocksize)
    absmax = blocks.abs().amax(1)
    normalized = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    code = fmt.code(x.device)
    # nearest code value: the index of the first midpoint above the value
    indices = torch.bucketize(normalized, (code[1:] + code[:-1]) / 2).to(torch.uint8).reshape(-1)[: x.numel()]
    if fmt.bits == 4:
        indices = _pack_nibbles(indices)
    return indices, absmax


def dequantize(indices: torch.Tensor, absmax: torch.Tensor, fmt: QuantizedFormat, numel: int) -> torch.Tensor:
    """The float32 tensor (flat, ``numel`` elements) that :func:`quantize` stored."""
    if fmt.bits == 4:
        indices = unpack_nibbles(indices, numel)
    values = fmt.code(indices.device)[indices.long()]
    return (_blocks(values, fmt.blocksize) * absmax[:, None]).reshape(-1)[:numel]


def _pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    if indices.numel() % 2:
        indices = torch.nn.functional.pad(indices, (0, 1))
    pairs = indices.view(-1, 2)
    return pairs[:, 0] << 4 | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """One uint8 index per element from two 4-bit indices per byte (high nibble first)."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:numel]
