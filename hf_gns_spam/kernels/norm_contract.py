"""The contract the GNS-aware normalization kernels implement, shared with the pure-torch reference.

What a normalization computes (:class:`NormSpec`, one row of :mod:`hf_gns_spam.kernels.norm_variants` and an eps),
which dtype it returns, how sequences of a packed batch are laid out (``segment_ids``), and the layout of the
per-example statistics vector every backward returns::

    statistics = [Σ_e ‖G_w[e]‖², Σ_e ‖G_b[e]‖², E]

(slots :data:`WEIGHT_SUM_SQ`, :data:`BIAS_SUM_SQ`, :data:`EXAMPLES`), with G_w[e], G_b[e] example e's contributions
to the weight and bias gradients and E the number of examples. This module imports nothing but torch (and the
variant table), so it sits at the bottom of the package's layers: the Triton kernels
(:mod:`hf_gns_spam.kernels.gns_norm`), the reference (:mod:`hf_gns_spam.ops.norm_reference`) and everything above
read it from here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

import torch

from hf_gns_spam.kernels.norm_variants import HALF_DTYPES, NormVariant, find_variant

__all__ = [
    "BIAS_SUM_SQ",
    "EXAMPLES",
    "HALF_DTYPES",
    "SEGMENT_ID_DTYPES",
    "STATISTICS_SIZE",
    "WEIGHT_SUM_SQ",
    "NormSpec",
    "check_segment_layout",
    "check_segment_values",
    "output_dtype",
    "per_example_statistics",
    "segment_shape",
]

# the statistics vector's slots
WEIGHT_SUM_SQ, BIAS_SUM_SQ, EXAMPLES = range(3)

STATISTICS_SIZE = 3
SEGMENT_ID_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class NormSpec:
    """What a normalization module computes: enough to reproduce its output, dtype and gradients.

    (``kind``, ``offset``, ``rounding``) must be a row of :data:`~hf_gns_spam.kernels.norm_variants.VARIANTS`
    (:attr:`variant`); ``eps`` is the module's own. :meth:`encode` and :meth:`decode` carry a spec, every field,
    through the ``torch.library`` operator as one string, made once here (``torch.compile`` cannot trace the JSON
    encoder, and reads the stored string as a constant)."""

    kind: str
    eps: float
    offset: float = 0.0  # the weight enters as (offset + w): 1.0 for Gemma-style zero-centred weights
    rounding: str = "float32_product"
    _encoded: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        find_variant(self.kind, self.offset, self.rounding)
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.init}
        object.__setattr__(self, "_encoded", json.dumps(fields, sort_keys=True))

    @staticmethod
    def of(variant: NormVariant, eps: float) -> NormSpec:
        """The spec of a row of the variant table with this eps."""
        kind, offset, rounding = variant.key
        return NormSpec(kind=kind, eps=eps, offset=offset, rounding=rounding)

    @property
    def variant(self) -> NormVariant:
        """The row of the variant table this spec computes."""
        return find_variant(self.kind, self.offset, self.rounding)

    def encode(self) -> str:
        """Every field as one string (JSON; floats round-trip exactly), what the operator takes (:meth:`decode`)."""
        return self._encoded

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def decode(encoded: str) -> NormSpec:
        """The spec :meth:`encode` gave ``encoded`` (validated again)."""
        return NormSpec(**json.loads(encoded))


def output_dtype(spec: NormSpec, x_dtype: torch.dtype, weight_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the original module returns for this input and weight dtype (x's dtype without a weight)."""
    return x_dtype if weight_dtype is None else spec.variant.rounding.output_dtype(x_dtype, weight_dtype)


def segment_shape(x_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``segment_ids`` must have for an input of shape ``x_shape``: ``x_shape[:2]``, ``[N]`` for 2-D."""
    return tuple(x_shape[:2]) if len(x_shape) >= 3 else tuple(x_shape[:1])


def check_segment_layout(segment_ids: torch.Tensor, x: torch.Tensor) -> None:
    """Raise unless ``segment_ids`` is an int32/int64 tensor of shape :func:`segment_shape` on x's device.

    Reads no values (no host synchronisation; traceable by ``torch.compile``)."""
    if not isinstance(segment_ids, torch.Tensor):
        raise TypeError(f"segment_ids must be a tensor, got {type(segment_ids).__name__}")
    if segment_ids.dtype not in SEGMENT_ID_DTYPES:
        raise TypeError(f"segment_ids must have dtype int32 or int64, got {segment_ids.dtype}")
    expected = segment_shape(x.shape)
    if tuple(segment_ids.shape) != expected:
        raise ValueError(
            f"segment_ids must have shape {list(expected)} (x.shape[:2]; [N] for a 2-D x) for x of shape "
            f"{list(x.shape)}, got {list(segment_ids.shape)}"
        )
    if segment_ids.device != x.device:
        raise ValueError(f"segment_ids must be on x's device {x.device}, got {segment_ids.device}")


def check_segment_values(segment_ids: torch.Tensor) -> int:
    """Raise unless the ids are ≥ 0 and non-decreasing in row-major order; return E = max + 1 (0 for no ids).
    Reads the values: a host synchronisation off the CPU."""
    flat = segment_ids.reshape(-1)
    if flat.numel() == 0:
        return 0
    decreasing = flat[1:] < flat[:-1]
    if bool(decreasing.any()):
        position = int(decreasing.nonzero()[0, 0]) + 1
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(position), segment_ids.shape))
        raise ValueError(
            "segment_ids must be non-decreasing in row-major order (each sequence's tokens contiguous, sequences "
            f"in order): segment_ids{list(index)} = {int(flat[position])} follows {int(flat[position - 1])}"
        )
    if int(flat[0]) < 0:
        raise ValueError(f"segment_ids must be ≥ 0, got {int(flat[0])}")
    return int(flat[-1]) + 1


def per_example_statistics(
    weight_per_example: torch.Tensor | None,
    bias_per_example: torch.Tensor | None,
    num_examples: int,
    device: torch.device,
) -> torch.Tensor:
    """The float32 statistics vector (module docstring) from the per-example gradients G[b], shape [B, D]."""
    statistics = torch.zeros(STATISTICS_SIZE, dtype=torch.float32, device=device)
    statistics[EXAMPLES] = num_examples
    for slot, per_example in ((WEIGHT_SUM_SQ, weight_per_example), (BIAS_SUM_SQ, bias_per_example)):
        if per_example is not None:
            statistics[slot] = per_example.float().square().sum(-1).sum()  # Σ_b of the [B] squared norms
    return statistics
