"""Every combination of requires-grad on the input, the weight and the bias of a patched norm, for both norm kinds
and both backends: the gradients equal the original module's; a frozen parameter gets no gradient, its sink gets the
gradient it would have had, and the statistics cover it (LoRA freezes the norms) whenever the backward passes
through the module; a frozen norm with an input that carries no gradient is not measured (measuring it would add a
backward through the layers below). A frozen weight with a trainable bias once crashed: the unneeded gradients
aliased each other."""

from __future__ import annotations

import copy
import itertools
import threading

import pytest
import torch
from torch import nn

from hf_gns_spam import patch_model, per_example_grad_stats
from hf_gns_spam.ops import gns_norm as gns_norm_module
from hf_gns_spam.ops.gns_norm import norm_backend
from hf_gns_spam.stats import norm_gradients


class LlamaStyleRMSNorm(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states.float() * torch.rsqrt(variance + self.variance_epsilon)).to(
            hidden_states.dtype
        )


def make_norm(kind: str) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.LayerNorm(16) if kind == "layer_norm" else LlamaStyleRMSNorm(16)
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.normal_()
    return norm


COMBINATIONS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize(("input_grad", "weight_grad", "bias_grad"), COMBINATIONS)
def test_every_requires_grad_combination(backend, kind, input_grad, weight_grad, bias_grad):
    if kind == "rms_norm" and bias_grad:
        pytest.skip("no bias")
    if not (input_grad or weight_grad or bias_grad):
        pytest.skip("nothing to differentiate")
    original = make_norm(kind)
    patched = copy.deepcopy(original)
    patch_model(patched)
    for module in (original, patched):
        module.weight.requires_grad_(weight_grad)
        if kind == "layer_norm":
            module.bias.requires_grad_(bias_grad)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    inputs = [x.clone().requires_grad_(input_grad) for _ in range(2)]
    (original(inputs[0]) * dy).sum().backward()
    with norm_backend(backend):
        (patched(inputs[1]) * dy).sum().backward()
    if input_grad:
        torch.testing.assert_close(inputs[1].grad, inputs[0].grad, rtol=1e-5, atol=1e-6)
    trainable = dict(original.named_parameters())
    # the independent reference: every parameter trainable, one example (row of x) at a time, in float64
    reference = copy.deepcopy(original).double().requires_grad_(True)
    per_example = {name: [] for name, _ in reference.named_parameters()}
    for row in range(x.shape[0]):
        reference.zero_grad()
        (reference(x[row : row + 1].double()) * dy[row : row + 1].double()).sum().backward()
        for name, parameter in reference.named_parameters():
            per_example[name].append(parameter.grad.clone())
    measured_anything = input_grad or weight_grad or bias_grad
    stats, gradients = per_example_grad_stats(patched), norm_gradients(patched)
    for name, parameter in patched.named_parameters():
        expected_gradient = torch.stack(per_example[name]).sum(0).float()
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, trainable[name].grad, rtol=1e-5, atol=1e-6)
            assert not gradients[name].frozen
        else:
            assert parameter.grad is None and gradients[name].frozen
            torch.testing.assert_close(gradients[name].gradient, expected_gradient, rtol=1e-5, atol=1e-5)
        expected_sum_sq = sum(g.square().sum() for g in per_example[name]).item()
        assert stats[name].sum_sq.item() == pytest.approx(expected_sum_sq if measured_anything else 0.0, rel=1e-5)
        assert stats[name].count.item() == (x.shape[0] if measured_anything else 0)


def test_a_frozen_norm_whose_input_carries_no_gradient_is_not_measured():
    """A frozen norm on a frozen input (the first norm after frozen embeddings) stays out of the backward: its
    output carries no gradient, so measuring it costs nothing and gives nothing."""
    patched = make_norm("rms_norm")
    patch_model(patched)
    patched.weight.requires_grad_(False)
    output = patched(torch.randn(2, 3, 16))
    assert not output.requires_grad
    assert per_example_grad_stats(patched)["weight"].count.item() == 0
    assert norm_gradients(patched)["weight"].gradient is None


def test_the_backend_switch_is_per_thread(monkeypatch):
    """The backend switch is a context variable: the forward and backward inside the block use it, another thread
    keeps its own setting."""
    used = []
    real = gns_norm_module._implementation

    def recording(backend):
        used.append(backend)
        return real(backend)

    monkeypatch.setattr(gns_norm_module, "_implementation", recording)
    patched = make_norm("layer_norm")
    patch_model(patched)
    with norm_backend("triton"):
        patched(torch.randn(2, 3, 16)).sum().backward()
    assert used == ["triton", "triton"]
    seen = []
    with norm_backend("triton"):
        thread = threading.Thread(target=lambda: seen.append(gns_norm_module._backend.get()))
        thread.start()
        thread.join()
    assert seen == ["auto"]
