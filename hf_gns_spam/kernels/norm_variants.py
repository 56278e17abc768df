"""The normalization variants the package computes: one row per family of modules, the one home of a variant.

A variant is a kind (whether the mean is subtracted), an offset (the weight enters as ``offset + w``), a rounding
(where the module rounds x̂ on its way to the product with the weight) and whether a bias may be added. Per row, in
float32 up to the rounding::

    kind "layer_norm": μ = mean(x),  r = 1/√(mean((x − μ)²) + eps),  x̂ = (x − μ)·r
    kind "rms_norm":   μ = 0,        r = 1/√(mean(x²) + eps),         x̂ = x·r

and, with x̂' the x̂ that meets the weight (also the one in the weight gradient's per-example terms dy ⊙ x̂')::

    "float32_product"     x̂' = x̂;  y = x̂' ⊙ (offset + w) + b in float32, cast once to x's dtype
    "input_dtype_first"   x̂' = x̂ rounded to x's dtype;  y = w ⊙ x̂' in torch's promoted dtype of (w, x)
    "weight_dtype_first"  x̂' = x̂ rounded to w's dtype when that is half precision, else x̂;
                          y = w ⊙ x̂' in torch's promoted dtype of (w, x̂')

Without a weight, y = x̂ in x's dtype. The table (:data:`VARIANTS`, in probe order)::

    formula        kind        offset  rounding            bias  kernel AFFINE  modules
    rms_norm(w)    rms_norm    0       input_dtype_first   no    MULTIPLY       LlamaRMSNorm, Mistral, Qwen2, ...
    rms_norm(w)    rms_norm    0       float32_product     no    SCALE_SHIFT    Olmo2RMSNorm
    rms_norm(w)    rms_norm    0       weight_dtype_first  no    MULTIPLY       T5LayerNorm
    rms_norm(1+w)  rms_norm    1       float32_product     no    SCALE_SHIFT    GemmaRMSNorm (zero-centred w)
    layer_norm     layer_norm  0       float32_product     yes   SCALE_SHIFT    nn.LayerNorm, hand-written ones

The kernel's AFFINE constexpr says how :mod:`hf_gns_spam.kernels.gns_norm` forms y (SCALE_SHIFT:
x̂' ⊙ (offset + w) + b in float32; MULTIPLY: w ⊙ x̂' in float32, exact for half-precision operands, cast once, which
is the module's half-precision multiply); the rounding of x̂ reaches the kernel as the dtype
:meth:`Rounding.rounded_dtype` names (its ROUND_DTYPE constexpr, float32 for none).

Everything that depends on a variant reads it here: :class:`~hf_gns_spam.kernels.norm_contract.NormSpec` accepts exactly
the rows' (kind, offset, rounding); the reference (:mod:`hf_gns_spam.ops.norm_reference`) computes a row with its
:class:`Kind` and :class:`Rounding` (no comparison with a name); the kernels' launchers take the AFFINE and ROUND_DTYPE
constexprs from it; the probe of ``patch_model`` (:mod:`hf_gns_spam.patching`) tries the rows, grouped by formula, in
this order; the operator's bias check, the report's description (:attr:`NormVariant.label`), the compile count of
``tests/unit/kernels/test_kernel_compile.py`` and ``tests/unit/kernels/test_norm_variants.py`` (which fails when a row
and one of its users drift apart) read it too.

Adding a variant touches at most two source files: this one (its row; a new :class:`Rounding` or :class:`Kind` here too)
and :mod:`hf_gns_spam.kernels.gns_norm`, only when the kernels lack its maths: a product that is neither AFFINE form
above (a branch of ``_affine``) or a rounding through a dtype ``_TRITON_DTYPES`` does not map. A row of an existing
kind, offset form and rounding touches this file alone. ``tests/unit/kernels/test_norm_variants.py`` then runs the row
through everything above; it asks for one module of the new family (``MODULES``), which the probe must recognise.
This module imports nothing but torch, so that the contracts load without triton.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "HALF_DTYPES",
    "KERNEL_AFFINE_MULTIPLY",
    "KERNEL_AFFINE_NONE",
    "KERNEL_AFFINE_SCALE_SHIFT",
    "KINDS",
    "ROUNDINGS",
    "VARIANTS",
    "Kind",
    "NormVariant",
    "Rounding",
    "find_variant",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)

#: The kernels' AFFINE constexpr: no weight (y = x̂), y = x̂' ⊙ (offset + w) + b in float32, y = w ⊙ x̂' in float32.
KERNEL_AFFINE_NONE = 0
KERNEL_AFFINE_SCALE_SHIFT = 1
KERNEL_AFFINE_MULTIPLY = 2


@dataclass(frozen=True)
class Kind:
    """What is normalized: ``centred`` kinds subtract the row's mean μ (layer_norm), the others take μ = 0 (rms_norm).
    ``float32_under_autocast``: the module runs in float32 under autocast whatever its input (F.layer_norm is on
    autocast's float32 list), so the patched module casts its input and parameters to float32 there."""

    name: str
    centred: bool
    float32_under_autocast: bool


@dataclass(frozen=True)
class Rounding:
    """Where a module rounds x̂ on its way to the product with the weight, and how it forms that product.

    ``rounded_dtype(x_dtype, weight_dtype)`` is the dtype x̂ is rounded through before the product (float32: not
    rounded), ``output_dtype(x_dtype, weight_dtype)`` the dtype of y, ``product(x̂', weight, bias, offset)`` y before
    the cast to it (the reference's formula) and ``kernel_affine`` the kernels' AFFINE constexpr for the same
    product."""

    name: str
    rounded_dtype: Callable[[torch.dtype, torch.dtype], torch.dtype]
    output_dtype: Callable[[torch.dtype, torch.dtype], torch.dtype]
    product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]
    kernel_affine: int


def _float32_product(x_hat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offset: float):
    """y = x̂ ⊙ (offset + w) + b in float32."""
    y = x_hat * (offset + weight.float())
    return y if bias is None else y + bias.float()


def _weight_product(x_hat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offset: float):
    """y = w ⊙ x̂' in torch's promoted dtype of the two (the rows of this product have no offset and no bias)."""
    return weight * x_hat


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("layer_norm", centred=True, float32_under_autocast=True),
        Kind("rms_norm", centred=False, float32_under_autocast=False),
    )
}

ROUNDINGS: dict[str, Rounding] = {
    rounding.name: rounding
    for rounding in (
        Rounding(
            "float32_product",
            rounded_dtype=lambda x_dtype, weight_dtype: torch.float32,
            output_dtype=lambda x_dtype, weight_dtype: x_dtype,
            product=_float32_product,
            kernel_affine=KERNEL_AFFINE_SCALE_SHIFT,
        ),
        Rounding(
            "input_dtype_first",
            rounded_dtype=lambda x_dtype, weight_dtype: x_dtype,
            output_dtype=lambda x_dtype, weight_dtype: torch.promote_types(weight_dtype, x_dtype),
            product=_weight_product,
            kernel_affine=KERNEL_AFFINE_MULTIPLY,
        ),
        Rounding(
            "weight_dtype_first",
            rounded_dtype=lambda x_dtype, weight_dtype: weight_dtype if weight_dtype in HALF_DTYPES else torch.float32,
            output_dtype=lambda x_dtype, weight_dtype: (
                weight_dtype if weight_dtype in HALF_DTYPES else torch.promote_types(weight_dtype, torch.float32)
            ),
            product=_weight_product,
            kernel_affine=KERNEL_AFFINE_MULTIPLY,
        ),
    )
}


@dataclass(frozen=True)
class NormVariant:
    """One row of the table: a family of normalization modules (module docstring).

    ``formula`` names the maths up to the rounding ("rms_norm(1+w)"), ``bias`` whether a bias may be added,
    ``modules`` which modules compute it."""

    formula: str
    kind: Kind
    offset: float
    rounding: Rounding
    bias: bool
    modules: str

    @property
    def key(self) -> tuple[str, float, str]:
        """(kind, offset, rounding): the fields of a NormSpec that select this row."""
        return self.kind.name, self.offset, self.rounding.name

    @property
    def label(self) -> str:
        """How a patched module of this variant is described (``PatchReport``): "rms_norm(1+w), rounding
        float32_product"."""
        return f"{self.formula}, rounding {self.rounding.name}"


VARIANTS: tuple[NormVariant, ...] = (
    NormVariant(
        "rms_norm(w)", KINDS["rms_norm"], 0.0, ROUNDINGS["input_dtype_first"], bias=False,
        modules="LlamaRMSNorm (Mistral, Qwen2, Phi3, ...): x̂ cast to the input's dtype, then times w",
    ),
    NormVariant(
        "rms_norm(w)", KINDS["rms_norm"], 0.0, ROUNDINGS["float32_product"], bias=False,
        modules="Olmo2RMSNorm: x̂ ⊙ w in float32, then cast",
    ),
    NormVariant(
        "rms_norm(w)", KINDS["rms_norm"], 0.0, ROUNDINGS["weight_dtype_first"], bias=False,
        modules="T5LayerNorm: x̂ cast to a half-precision weight's dtype, then times w",
    ),
    NormVariant(
        "rms_norm(1+w)", KINDS["rms_norm"], 1.0, ROUNDINGS["float32_product"], bias=False,
        modules="GemmaRMSNorm: zero-centred weights, x̂ ⊙ (1 + w) in float32, then cast",
    ),
    NormVariant(
        "layer_norm", KINDS["layer_norm"], 0.0, ROUNDINGS["float32_product"], bias=True,
        modules="nn.LayerNorm / F.layer_norm and hand-written LayerNorms",
    ),
)  # fmt: skip

_BY_KEY: dict[tuple[str, float, str], NormVariant] = {variant.key: variant for variant in VARIANTS}


def find_variant(kind: str, offset: float, rounding: str) -> NormVariant:
    """The row for (kind, offset, rounding); ValueError naming the rows when there is none."""
    variant = _BY_KEY.get((kind, float(offset), rounding))
    if variant is None:
        rows = ", ".join(f"(kind={k!r}, offset={o}, rounding={r!r})" for k, o, r in _BY_KEY)
        raise ValueError(
            f"no normalization variant has kind={kind!r}, offset={offset}, rounding={rounding!r}; the variants "
            f"(hf_gns_spam.kernels.norm_variants) are {rows}"
        )
    return variant
