"""W4A4 fake quantization (``hf_gns_spam.fake_quant``) against a float64 element-by-element transcription of the
paper's quantizers, its grid properties, the straight-through gradients and the swap on a real model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_gns_spam.fake_quant import (
    DEFAULT_TARGET_MODULES,
    FakeQuantLinear,
    apply_fake_quantization,
    fake_quantize_activation,
    fake_quantize_weight,
    remove_fake_quantization,
)
from tests.support import model_zoo


def reference_weight(row: list[float], bits: int, group: int) -> list[float]:
    """Asymmetric min-max, one group at a time, in Python floats (float64)."""
    out = []
    for start in range(0, len(row), group):
        values = row[start : start + group]
        low, high = min(values), max(values)
        scale = max((high - low) / (2**bits - 1), torch.finfo(torch.float32).tiny)
        zero = round(-low / scale)
        out += [(min(max(round(v / scale) + zero, 0), 2**bits - 1) - zero) * scale for v in values]
    return out


def reference_activation(row: list[float], bits: int, group: int, keep: int) -> list[float]:
    """Symmetric absmax over all but the ``keep`` largest magnitudes, which stay exact."""
    out = []
    top = 2 ** (bits - 1) - 1
    for start in range(0, len(row), group):
        values = row[start : start + group]
        kept = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[: min(keep, len(values) - 1)])
        absmax = max((abs(v) for i, v in enumerate(values) if i not in kept), default=0.0)
        scale = max(absmax / top, torch.finfo(torch.float32).tiny)
        out += [v if i in kept else min(max(round(v / scale), -top), top) * scale for i, v in enumerate(values)]
    return out


@pytest.mark.parametrize(("columns", "group"), [(64, 16), (50, 16), (40, 256), (33, 8)])
@pytest.mark.parametrize("bits", [4, 3])
def test_weight_quantizer_matches_the_reference(columns, group, bits):
    weight = torch.randn(6, columns, generator=torch.Generator().manual_seed(columns))
    quantized = fake_quantize_weight(weight, bits, group)
    expected = [reference_weight(row, bits, min(group, columns)) for row in weight.double().tolist()]
    torch.testing.assert_close(quantized.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("columns", "group", "keep"), [(64, 16, 2), (50, 16, 2), (40, 256, 0), (33, 8, 1)])
def test_activation_quantizer_matches_the_reference(columns, group, keep):
    x = torch.randn(3, 5, columns, generator=torch.Generator().manual_seed(columns)) * 2
    x[0, 0, 3] = 40.0  # an outlier
    quantized = fake_quantize_activation(x, 4, group, keep)
    expected = [reference_activation(row, 4, min(group, columns), keep) for row in x.reshape(-1, columns).tolist()]
    torch.testing.assert_close(
        quantized.reshape(-1, columns).double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5
    )
    if keep:
        assert quantized[0, 0, 3] == 40.0  # kept exactly


def test_weight_grid_error_and_round_trip():
    """Each group lands on at most 2^b levels of one affine grid, within half a step of the input, and quantizing
    the quantized weight again changes nothing."""
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    quantized = fake_quantize_weight(weight, 4, 32)
    for w, q in zip(weight.reshape(-1, 32), quantized.reshape(-1, 32), strict=True):
        scale = float(w.max() - w.min()) / 15
        assert len(torch.unique(q)) <= 16
        assert float((w - q).abs().max()) <= scale / 2 + 1e-6
        levels = (q - q.min()) / scale
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    torch.testing.assert_close(fake_quantize_weight(quantized, 4, 32), quantized, rtol=0, atol=1e-6)


def test_activation_round_trip_and_dtype():
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(1))
    once = fake_quantize_activation(x, 4, 32, keep_outliers=0)
    torch.testing.assert_close(fake_quantize_activation(once, 4, 32, keep_outliers=0), once, rtol=0, atol=1e-6)
    assert fake_quantize_activation(x.bfloat16(), 4, 32).dtype == torch.bfloat16
    assert fake_quantize_weight(x.bfloat16(), 4, 32).dtype == torch.bfloat16
    zeros = torch.zeros(2, 32)
    assert torch.equal(fake_quantize_activation(zeros), zeros) and torch.equal(fake_quantize_weight(zeros), zeros)


def test_straight_through_gradients():
    """∂L/∂x = ∂L/∂y · ŵ, ∂L/∂w = (∂L/∂y)ᵀ · x̂, ∂L/∂b = Σ ∂L/∂y, in float64 by hand."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 20).double()
    layer = FakeQuantLinear.from_linear(linear, bits=4, group_size=16, keep_outliers=2)
    x = torch.randn(2, 7, 48, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 7, 20, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    w_hat = fake_quantize_weight(linear.weight, 4, 16)
    x_hat = fake_quantize_activation(x.detach(), 4, 16, 2)
    torch.testing.assert_close(layer(x).detach(), x_hat @ w_hat.T + linear.bias.detach())
    torch.testing.assert_close(x.grad, upstream @ w_hat)
    torch.testing.assert_close(linear.weight.grad, upstream.reshape(-1, 20).T @ x_hat.reshape(-1, 48))
    torch.testing.assert_close(linear.bias.grad, upstream.sum((0, 1)))
    assert not torch.equal(w_hat, linear.weight.detach())  # the forward really is quantized


def test_apply_keeps_parameters_and_trains():
    model = model_zoo.build("llama")
    names_before = [name for name, _ in model.named_parameters()]
    parameters_before = {name: p for name, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    full_precision = model(input_ids=ids, labels=ids).loss.item()

    swapped = apply_fake_quantization(model)
    layers = model.config.num_hidden_layers
    assert len(swapped) == 7 * layers
    assert {name.rsplit(".", 1)[-1] for name in swapped} == set(DEFAULT_TARGET_MODULES)
    assert [name for name, _ in model.named_parameters()] == names_before
    assert all(p is parameters_before[name] for name, p in model.named_parameters())
    assert type(model.lm_head) is nn.Linear  # not a target

    output = model(input_ids=ids, labels=ids)
    assert math.isfinite(output.loss.item()) and output.loss.item() != full_precision
    output.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert all(model.get_submodule(name).weight.grad.abs().sum() > 0 for name in swapped)

    with pytest.raises(ValueError, match="already fake-quantized"):
        apply_fake_quantization(model)
    assert remove_fake_quantization(model) == swapped
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert all(p is parameters_before[name] for name, p in model.named_parameters())
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(full_precision, abs=1e-6)


def test_apply_refuses_what_it_cannot_quantize():
    gpt2 = model_zoo.build("gpt2")
    with pytest.raises(ValueError, match="target_modules="):
        apply_fake_quantization(gpt2)
    with pytest.raises(ValueError, match="Conv1D"):
        apply_fake_quantization(gpt2, target_modules=("c_attn",))
    with pytest.raises(ValueError, match="bits"):
        apply_fake_quantization(model_zoo.build("llama"), bits=1)
    with pytest.raises(ValueError, match="keep_outliers"):
        fake_quantize_activation(torch.ones(2, 4), keep_outliers=-1)
