"""What the fused Stable-SPAM step (:mod:`hf_gns_spam.kernels.stable_spam_step`) receives, shared with the optimizer.

* :class:`StepHyperparameters`: one parameter group's scalar hyperparameters at one step;
* the names of the entries of a parameter's optimizer state (:data:`MOMENTS`, :data:`QUANTIZED_KEYS`,
  :data:`STATISTICS`, ...);
* the table of the optimizer-state formats, :data:`STATE_FORMATS`: one :class:`StateFormat` per ``state_bits``
  value, with every fact of that format (below).

The state-format table is the one home of those facts. Its readers: the optimizer's state initialisation and its
moment load/store (:mod:`hf_gns_spam.optim.stable_spam`), the torch quantizer
(:mod:`hf_gns_spam.optim.quantized_state`), checkpoint validation (:mod:`hf_gns_spam.optim.checkpoint`), the
DTensor state conversion (:mod:`hf_gns_spam.optim.sharded_step`), the fused step's launcher (buffer keys, dtypes,
lengths, block size, code maps), the hyperparameter table (valid ``state_bits``) and the Trainer registration
(:mod:`hf_gns_spam.integrations.trainer_optimizer`: the ``optim=`` names). It lives at the kernels' layer because the
kernels may import nothing above it (``tests/unit/test_layers.py``), and it imports torch only inside the functions that
need it, because the Trainer registration reads it during ``import hf_gns_spam``, which imports no torch.

The rows (n = the tensor's number of elements):

* 32: unquantized; ``exp_avg``, ``exp_avg_sq`` of the parameter's shape in float32 (float64 for float64
  parameters), 8 bytes per parameter; Trainer ``optim="stable_spam"``.
* 16: unquantized; the same in bfloat16, 4 bytes per parameter; Trainer ``optim="stable_spam"`` with
  ``optim_args="state_bits=16"``.
* 8 (bitsandbytes' 8-bit Adam): ``*_q`` n uint8 indices, ``*_absmax`` ⌈n/256⌉ float32; m with the signed, v with the
  unsigned dynamic map; 2 + 8/256 bytes per parameter; ``optim="stable_spam_8bit"``.
* 4 (Li et al., NeurIPS 2023): ``*_q`` ⌈n/2⌉ bytes of two 4-bit indices, ``*_absmax`` ⌈n/128⌉ float32; m with the
  signed 4-bit dynamic map, v with the linear map without a zero point, (1..16)/16; 1 + 8/128 bytes per parameter;
  ``optim="stable_spam_4bit"``.

A quantized format keeps tensors under :data:`MIN_QUANTIZED_NUMEL` elements in the 32-bit format (as bitsandbytes
does; :meth:`StateFormat.for_numel`), and marks a quantized state with ``state["quantized_bits"] = bits``. Every
state also holds the per-tensor statistics (:data:`STATISTICS`, 0-dim float64, float32 on MPS) and the non-finite
counter (:data:`NONFINITE_GRAD_STEPS`, 0-dim int64), whatever its format.

Adding a state format: a new row of :data:`STATE_FORMATS` (and a new value of :data:`StateBits`) is all an
unquantized format (a new moment dtype) or a quantized one with 8- or 4-bit indices and an existing code map needs;
the optimizer, its checkpoints, the Trainer names and the fused step's checks follow from the row (the fused step
takes unquantized moments in the dtypes it loads, ``_MOMENT_DTYPES`` there, and leaves other tensors to the torch
path). A new code map is a new branch of :func:`_code`, here. A new index width (say 2 bits, four indices per byte)
is the row plus the fused step's packed-index code in :mod:`hf_gns_spam.kernels.stable_spam_step` (``_dequantize``,
``_store_quantized`` and the element-pair layout of ``_update_quantized_moments`` implement one and two indices per
byte; its launcher sends other widths to the torch path); the torch quantizer packs any ``8 // bits`` indices per
byte. So at most two source files: this one and the kernel's quantize/dequantize code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "ABSMAX",
    "CLIP_MAX_EMA",
    "DEFAULT_STATE_BITS",
    "EXP_AVG",
    "EXP_AVG_SQ",
    "INDICES",
    "MIN_QUANTIZED_NUMEL",
    "MOMENTS",
    "NONFINITE_GRAD_STEPS",
    "NORM_EMA",
    "NORM_SQ_EMA",
    "QUANTIZED_BITS",
    "QUANTIZED_KEYS",
    "STATE_FORMATS",
    "STATISTICS",
    "MomentBuffer",
    "QuantizedFormat",
    "StateBits",
    "StateFormat",
    "StepHyperparameters",
    "moment_format",
]

# The optimizer state's moment entries per parameter: read by the optimizer, its checkpoints and the fused step.
EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"
MOMENTS = ((EXP_AVG, False), (EXP_AVG_SQ, True))  # (state key, is it the second moment)
QUANTIZED_BITS = "quantized_bits"  # present (the format's bits) when the moments are stored quantized
INDICES, ABSMAX = "_q", "_absmax"  # suffixes of a quantized moment's two buffers: code indices, per-block absmax
QUANTIZED_KEYS = tuple(key + suffix for key, _ in MOMENTS for suffix in (INDICES, ABSMAX))

# The per-tensor statistics, 0-dim tensors in each parameter's state whatever its format.
CLIP_MAX_EMA = "clip_max_ema"  # T, AdaClip's EMA of max|g|
NORM_EMA = "norm_ema"  # μ, AdaGN's EMA of ‖g̃‖
NORM_SQ_EMA = "norm_sq_ema"  # ν, AdaGN's EMA of ‖g̃‖²
STATISTICS = (CLIP_MAX_EMA, NORM_EMA, NORM_SQ_EMA)
NONFINITE_GRAD_STEPS = "nonfinite_grad_steps"  # int64: steps in which the gradient had a NaN or ±inf entry

#: The values of ``state_bits``, for type checkers: the keys of :data:`STATE_FORMATS` (a test holds them equal).
StateBits = Literal[32, 16, 8, 4]
#: The constructor's ``state_bits``; its format's Trainer name fixes nothing (``optim_args`` may set state_bits).
DEFAULT_STATE_BITS = 32
#: Quantized formats keep tensors with fewer elements in the 32-bit format (bitsandbytes' rule).
MIN_QUANTIZED_NUMEL = 4096
_SMALL_TENSOR_BITS = 32  # the format of those small tensors


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
    """One moment's blockwise code (bitsandbytes' layout): a flat tensor x of n elements is cut into blocks of
    ``blocksize`` elements; each block stores its absmax a = max|x| (float32) and each element the index of the
    nearest value of the sorted code map c (2**bits values), x ≈ c[index]·a. Indices are uint8, ``8 // bits`` per
    byte (the first element in the high bits)."""

    bits: int  # bits per index
    blocksize: int  # elements per absmax
    map_name: str  # "dynamic_signed", "dynamic_unsigned", "linear_no_zero" (see _code)

    @property
    def indices_per_byte(self) -> int:
        return 8 // self.bits

    def indices_numel(self, numel: int) -> int:
        """uint8 elements of the index buffer of a tensor of ``numel`` elements: ⌈numel / indices_per_byte⌉."""
        return -(-numel // self.indices_per_byte)

    def absmax_numel(self, numel: int) -> int:
        """float32 elements of the absmax buffer of a tensor of ``numel`` elements: ⌈numel / blocksize⌉."""
        return -(-numel // self.blocksize)

    @property
    def bytes_per_element(self) -> float:
        """Storage per element of a large tensor: 1/indices_per_byte (index) + 4/blocksize (absmax)."""
        return 1 / self.indices_per_byte + 4 / self.blocksize

    def code(self, device: torch.device | str) -> torch.Tensor:
        """The sorted code map (2**bits float32 values)."""
        return _code(self.bits, self.map_name).to(device)


@dataclass(frozen=True)
class MomentBuffer:
    """One tensor of a parameter's moments as a format stores it: its state key, dtype and element count (the
    parameter's shape for unquantized moments, flat for quantized buffers)."""

    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class StateFormat:
    """One ``state_bits`` value: how Adam's moments m and v of a parameter tensor are stored, and its Trainer name.

    Unquantized (``moment_formats`` None): m and v have the parameter's shape and a dtype of ``moment_dtypes``, the
    parameter's compute dtype (float32, float64 for float64 parameters) when listed there, else the first one.
    Quantized: m and v are stored as :class:`QuantizedFormat` ``moment_formats`` (m's, v's), four flat buffers
    ``exp_avg_q``, ``exp_avg_absmax``, ``exp_avg_sq_q``, ``exp_avg_sq_absmax`` plus ``state["quantized_bits"]``;
    tensors under ``min_quantized_numel`` elements use the 32-bit format instead (:meth:`for_numel`).
    """

    bits: int  # the state_bits value
    trainer_name: str | None  # TrainingArguments(optim=...) that selects it; None: only through optim_args
    moment_dtypes: tuple[str, ...] = ()  # torch dtype names of unquantized moments
    moment_formats: tuple[QuantizedFormat, QuantizedFormat] | None = None
    min_quantized_numel: int = 0

    @property
    def is_quantized(self) -> bool:
        return self.moment_formats is not None

    def for_numel(self, numel: int) -> StateFormat:
        """The format a tensor of ``numel`` elements (the whole tensor's, for a shard) gets: this one, or the 32-bit
        one for a tensor under ``min_quantized_numel`` elements."""
        return STATE_FORMATS[_SMALL_TENSOR_BITS] if numel < self.min_quantized_numel else self

    def moment_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype of unquantized moments of a parameter whose update runs in ``compute_dtype``."""
        import torch

        if str(compute_dtype).removeprefix("torch.") in self.moment_dtypes:
            return compute_dtype
        return getattr(torch, self.moment_dtypes[0])

    @property
    def moment_keys(self) -> tuple[str, ...]:
        """The moments' tensor keys in a parameter's state, in :meth:`moment_buffers` order."""
        return QUANTIZED_KEYS if self.is_quantized else tuple(key for key, _ in MOMENTS)

    def moment_buffers(self, numel: int, compute_dtype: torch.dtype) -> tuple[MomentBuffer, ...]:
        """The moments' tensors of a parameter (or shard) of ``numel`` elements computing in ``compute_dtype``."""
        return _moment_buffers(self, numel, compute_dtype)

    def bytes_per_parameter(self, compute_dtype: torch.dtype) -> float:
        """Bytes of both moments per element of a large tensor (no partial block): 2·itemsize unquantized,
        Σ over m and v of 1/indices_per_byte + 4/blocksize quantized (8 bits: 2.03125; 4 bits: 1.0625)."""
        if self.moment_formats is None:
            return 2 * self.moment_dtype(compute_dtype).itemsize
        return sum(fmt.bytes_per_element for fmt in self.moment_formats)

    @property
    def trainer_spelling(self) -> str:
        """How a Trainer user selects this format (for error messages)."""
        default = STATE_FORMATS[DEFAULT_STATE_BITS].trainer_name
        if self.bits == DEFAULT_STATE_BITS:
            return f"optim='{default}' without state_bits in optim_args"
        if self.trainer_name is not None:
            return f"optim='{self.trainer_name}'"
        return f"optim='{default}', optim_args='state_bits={self.bits}'"

    @property
    def trainer_fixed_kwargs(self) -> dict[str, int]:
        """The constructor keywords its Trainer name fixes: none for the default format (optim_args may then set
        state_bits), ``state_bits`` for the others."""
        return {} if self.bits == DEFAULT_STATE_BITS else {"state_bits": self.bits}


STATE_FORMATS: dict[int, StateFormat] = {
    fmt.bits: fmt
    for fmt in (
        StateFormat(32, "stable_spam", moment_dtypes=("float32", "float64")),
        StateFormat(16, None, moment_dtypes=("bfloat16",)),
        # bitsandbytes' 8-bit Adam
        StateFormat(
            8,
            "stable_spam_8bit",
            moment_formats=(QuantizedFormat(8, 256, "dynamic_signed"), QuantizedFormat(8, 256, "dynamic_unsigned")),
            min_quantized_numel=MIN_QUANTIZED_NUMEL,
        ),
        # Li et al. 2023: a zero point in v's map rounds small second moments to 0 and m/(√v + ε) explodes
        StateFormat(
            4,
            "stable_spam_4bit",
            moment_formats=(QuantizedFormat(4, 128, "dynamic_signed"), QuantizedFormat(4, 128, "linear_no_zero")),
            min_quantized_numel=MIN_QUANTIZED_NUMEL,
        ),
    )
}


def moment_format(bits: int, second_moment: bool) -> QuantizedFormat:
    """The :class:`QuantizedFormat` of Adam's first (m) or second (v) moment in the quantized format ``bits``."""
    fmt = STATE_FORMATS.get(bits)
    if fmt is None or fmt.moment_formats is None:
        quantized = [b for b, f in STATE_FORMATS.items() if f.is_quantized]
        raise ValueError(f"quantized moments have one of {quantized} bits, not {bits}")
    return fmt.moment_formats[second_moment]


@functools.lru_cache(maxsize=1024)
def _moment_buffers(fmt: StateFormat, numel: int, compute_dtype: torch.dtype) -> tuple[MomentBuffer, ...]:
    """:meth:`StateFormat.moment_buffers`, cached: the fused step's checks ask for them at every step."""
    import torch

    if fmt.moment_formats is None:
        dtype = fmt.moment_dtype(compute_dtype)
        return tuple(MomentBuffer(key, dtype, numel) for key, _ in MOMENTS)
    return tuple(
        buffer
        for (key, _), code in zip(MOMENTS, fmt.moment_formats, strict=True)
        for buffer in (
            MomentBuffer(key + INDICES, torch.uint8, code.indices_numel(numel)),
            MomentBuffer(key + ABSMAX, torch.float32, code.absmax_numel(numel)),
        )
    )


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' ``functional.create_dynamic_map`` (MIT licence), copied value for value so that the 8- and
    4-bit states need no bitsandbytes: 256 sorted float32 values, maps of fewer bits padded with zeros."""
    import torch

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
    """The code map ``map_name`` with 2**bits values: bitsandbytes' signed or unsigned dynamic map of ``bits`` bits,
    or ``linear_no_zero``, (1..2**bits)/2**bits."""
    import torch

    if map_name == "linear_no_zero":
        values = torch.arange(1, 2**bits + 1, dtype=torch.float32) / 2**bits
    else:
        # bitsandbytes pads maps of fewer than 8 bits with zeros to 256 entries: keep the distinct values
        values = create_dynamic_map(signed=map_name == "dynamic_signed", total_bits=bits).float().unique()
    if values.numel() > 2**bits:
        raise RuntimeError(f"{map_name} map has {values.numel()} values, more than {bits} bits can index")
    return values.sort().values.contiguous()
