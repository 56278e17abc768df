"""Every combination of requires-grad on the input, the weight and the bias of a patched norm, for both norm kinds
and both backends: the gradients equal the original module's, and the statistics are taken only for a trainable
weight (a frozen weight with a trainable bias once crashed: the unneeded gradients aliased each other)."""

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
    for name, parameter in patched.named_parameters():
        reference = dict(original.named_parameters())[name]
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-5, atol=1e-6)
        else:
            assert parameter.grad is None
    stats = per_example_grad_stats(patched)
    measured = stats["weight"].sum_sq.item()
    assert (measured > 0) == weight_grad  # no statistics for a frozen weight (nothing is measured, nothing costs)


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
