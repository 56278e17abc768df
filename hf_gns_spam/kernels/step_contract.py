"""What the fused Stable-SPAM step (:mod:`hf_gns_spam.kernels.stable_spam_step`) receives, shared with the optimizer.

* :class:`StepHyperparameters`: one parameter group's scalar hyperparameters at one step;
* :class:`QuantizedFormat` and :func:`moment_format`: the blockwise formats of Adam's moments at 8 and 4 bits
  (bitsandbytes' layout; :mod:`hf_gns_spam.optim.quantized_state` quantizes and dequantizes with them);
* the names of the moments' entries in the optimizer state (:data:`MOMENTS`, :data:`QUANTIZED_KEYS`, ...).

This module imports nothing from the package's upper layers, so the kernels and the optimizer both read it from here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "ABSMAX",
    "EXP_AVG",
    "EXP_AVG_SQ",
    "INDICES",
    "MOMENTS",
    "QUANTIZED_BITS",
    "QUANTIZED_KEYS",
    "QuantizedFormat",
    "StepHyperparameters",
    "moment_format",
]

# The optimizer state's moment entries per parameter: read by the optimizer, its checkpoints and the fused step.
EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"
MOMENTS = ((EXP_AVG, False), (EXP_AVG_SQ, True))  # (state key, is it the second moment)
QUANTIZED_BITS = "quantized_bits"  # present (8 or 4) when the moments are stored quantized
INDICES, ABSMAX = "_q", "_absmax"  # suffixes of a quantized moment's two buffers: code indices, per-block absmax
QUANTIZED_KEYS = tuple(key + suffix for key, _ in MOMENTS for suffix in (INDICES, ABSMAX))


@dataclass(frozen=True)
class StepHyperparameters:
    """The hyperparameters of one group at one step, with s(t) already applied to β1 and γ1."""

    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    gamma1: float
    gamma2: float
    gamma3: float
    eps: float
    faithful: bool
    is_reset_step: bool


@dataclass(frozen=True)
class QuantizedFormat:
    bits: int  # 8: one index per byte; 4: two indices per byte
    blocksize: int
    map_name: str  # "dynamic_signed", "dynamic_unsigned", "linear_no_zero"

    def code(self, device: torch.device) -> torch.Tensor:
        """The sorted code map (2**bits float32 values)."""
        return _code(self.bits, self.map_name).to(device)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' ``functional.create_dynamic_map`` (MIT licence), copied value for value so that the 8- and
    4-bit states need no bitsandbytes: 256 sorted float32 values, maps of fewer bits padded with zeros."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.cache
def _code(bits: int, map_name: str) -> torch.Tensor:
    if map_name == "linear_no_zero":
        values = torch.arange(1, 2**bits + 1, dtype=torch.float32) / 2**bits
    else:
        # bitsandbytes pads maps of fewer than 8 bits with zeros to 256 entries: keep the distinct values
        values = create_dynamic_map(signed=map_name == "dynamic_signed", total_bits=bits).float().unique()
    if values.numel() > 2**bits:
        raise RuntimeError(f"{map_name} map has {values.numel()} values, more than {bits} bits can index")
    return values.sort().values.contiguous()


def moment_format(bits: int, second_moment: bool) -> QuantizedFormat:
    """The storage format of Adam's first (m) or second (v) moment at 8 or 4 bits."""
    if bits == 8:
        return QuantizedFormat(8, 256, "dynamic_unsigned" if second_moment else "dynamic_signed")
    if bits == 4:
        return QuantizedFormat(4, 128, "linear_no_zero" if second_moment else "dynamic_signed")
    raise ValueError(f"quantized moments have 8 or 4 bits, not {bits}")
