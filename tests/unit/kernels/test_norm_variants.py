"""The norm variant table (``hf_gns_spam/kernels/norm_variants.py``) and its users cannot drift apart.

For every row: ``NormSpec`` accepts it (and carries it through the operator's string), the pure-torch reference
computes exactly what a module of that family computes, the Triton kernels (interpreter, tiny shapes) agree with the
reference, and ``patch_model``'s probe recognises a module built to compute it. A module of the package that compares
a kind or a rounding with a string literal, instead of reading the table, fails :func:`test_only_the_table_names_the
variants`.
"""

from __future__ import annotations

import ast

import pytest
import torch
from torch import nn

from hf_gns_spam import patch_model
from hf_gns_spam.kernels.gns_norm import gns_norm_backward, gns_norm_forward
from hf_gns_spam.kernels.norm_contract import NormSpec
from hf_gns_spam.kernels.norm_variants import KINDS, ROUNDINGS, VARIANTS, NormVariant
from hf_gns_spam.ops.norm_reference import norm_backward, norm_forward
from tests.support.paths import PACKAGE

TABLE = PACKAGE / "kernels" / "norm_variants.py"
FEATURES = 8


def rms(hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """x̂ = x / √(mean(x²) + eps) in float32, as the Hugging Face RMSNorms write it."""
    hidden = hidden.float()
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)


class _Norm(nn.Module):
    """A weight (ones, or zeros for a zero-centred one) and ``variance_epsilon``: what the probe looks for."""

    def __init__(self, features: int, eps: float = 1e-6, zero_centred: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(features) if zero_centred else torch.ones(features))
        self.variance_epsilon = eps


class LlamaStyleRMSNorm(_Norm):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weight * rms(hidden, self.variance_epsilon).to(hidden.dtype)


class Olmo2StyleRMSNorm(_Norm):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (rms(hidden, self.variance_epsilon) * self.weight).to(hidden.dtype)


class T5StyleLayerNorm(_Norm):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normalized = rms(hidden, self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normalized = normalized.to(self.weight.dtype)
        return self.weight * normalized


class GemmaStyleRMSNorm(_Norm):
    def __init__(self, features: int) -> None:
        super().__init__(features, zero_centred=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (rms(hidden, self.variance_epsilon) * (1.0 + self.weight.float())).type_as(hidden)


class HandWrittenLayerNorm(_Norm):
    def __init__(self, features: int) -> None:
        super().__init__(features, eps=1e-5)
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        centred = h - h.mean(-1, keepdim=True)
        normalized = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (normalized * self.weight.float() + self.bias.float()).to(hidden.dtype)


#: A module of each row's family, written as the family writes it (a new row needs its module here).
MODULES: dict[tuple[str, float, str], type[_Norm]] = {
    ("rms_norm", 0.0, "input_dtype_first"): LlamaStyleRMSNorm,
    ("rms_norm", 0.0, "float32_product"): Olmo2StyleRMSNorm,
    ("rms_norm", 0.0, "weight_dtype_first"): T5StyleLayerNorm,
    ("rms_norm", 1.0, "float32_product"): GemmaStyleRMSNorm,
    ("layer_norm", 0.0, "float32_product"): HandWrittenLayerNorm,
}


def variant_id(variant: NormVariant) -> str:
    return variant.label.replace(", rounding ", "-")


def module_for(variant: NormVariant, dtype: torch.dtype, seed: int = 0) -> _Norm:
    """The row's module with random parameters (around its weight's centre) in ``dtype``."""
    module = MODULES[variant.key](FEATURES)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module.to(dtype)


def test_every_row_has_a_module_and_every_module_a_row():
    assert sorted(MODULES) == sorted(variant.key for variant in VARIANTS)
    assert len(set(MODULES)) == len(VARIANTS)  # no two rows compute the same (kind, offset, rounding)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_normspec_accepts_the_row_and_carries_it_through_the_operator(variant):
    spec = NormSpec.of(variant, 1e-6)
    assert spec.variant is variant and spec.kind in KINDS and spec.rounding in ROUNDINGS
    assert NormSpec.decode(spec.encode()) == spec


def test_normspec_refuses_what_no_row_computes():
    with pytest.raises(ValueError, match="no normalization variant"):
        NormSpec("layer_norm", 1e-5, offset=1.0)
    with pytest.raises(ValueError, match="no normalization variant"):
        NormSpec("rms_norm", 1e-6, rounding="llama")  # the rounding's name before the table


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16_w", "fp32_w"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_the_reference_computes_what_the_family_computes(variant, weight_dtype):
    """Bit for bit, output dtype included, on bfloat16 inputs (where the roundings differ)."""
    module = module_for(variant, weight_dtype)
    x = torch.randn(2, 3, FEATURES, generator=torch.Generator().manual_seed(1)).bfloat16()
    spec = NormSpec.of(variant, module.variance_epsilon)
    with torch.no_grad():
        expected = module(x)
        actual = norm_forward(spec, x, module.weight, getattr(module, "bias", None))[0]
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_the_kernels_compute_the_row_as_the_reference_does(variant):
    """Forward and backward of the Triton kernels (interpreter) against the reference, bfloat16 x and w."""
    module = module_for(variant, torch.bfloat16)
    weight, bias = module.weight.detach(), getattr(module, "bias", None)
    bias = None if bias is None else bias.detach()
    spec = NormSpec.of(variant, module.variance_epsilon)
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 3, FEATURES, generator=generator) + 0.5).bfloat16()
    y_ref, mean_ref, rstd_ref = norm_forward(spec, x, weight, bias)
    y, mean, rstd = gns_norm_forward(spec, x, weight, bias)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn(x.shape, generator=generator).to(y.dtype)
    has_bias = bias is not None
    expected = norm_backward(spec, dy, x, weight, bias, mean_ref, rstd_ref, True, True, has_bias)
    actual = gns_norm_backward(spec, dy, x, weight, bias, mean, rstd, True, True, has_bias)
    for name, got, want in zip(("dx", "dw", "db", "statistics"), actual, expected, strict=True):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2, msg=name)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_the_probe_recognises_the_row(variant):
    module = module_for(variant, torch.float32)
    report = patch_model(module)
    assert len(report.patched) == 1, report
    patched = report.patched[0]
    assert patched.spec == NormSpec.of(variant, module.variance_epsilon)
    assert patched.kind == variant.label


def literal_strings(node: ast.expr) -> list[str]:
    """The string constants of ``node`` and of a tuple, list or set literal of them."""
    elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)]


def test_only_the_table_names_the_variants():
    """No module of the package but the table compares anything with a kind or rounding name (today's or the names
    the roundings had before the table): a variant is told apart through the table's fields."""
    names = set(KINDS) | set(ROUNDINGS) | {"llama", "fp32", "t5"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == TABLE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                literals = [s for operand in (node.left, *node.comparators) for s in literal_strings(operand)]
                if names & set(literals):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, f"compare with a variant's name outside {TABLE.name}: {offenders}"
