"""patch_model on real Hugging Face architectures: identical outputs and gradients, reports, unpatching."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_gns_spam import patch_model, per_example_grad_stats, unpatch_model
from hf_gns_spam.patching import is_patched
from tests.support import model_zoo


def loss_and_grads(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), output.logits.detach(), grads


def assert_close_relative(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str, floor: float = 1e-12
) -> None:
    """max |actual − expected| <= rtol · max(max|expected|, floor)."""
    scale = expected.abs().max().float().clamp_min(floor)
    error = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol}"


@pytest.mark.parametrize("architecture", list(model_zoo.ARCHITECTURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_patched_model_equals_original(architecture, dtype):
    original = model_zoo.build(architecture).to(dtype)
    patched = copy.deepcopy(original)
    report = patch_model(patched)

    norm_modules = {n for n, m in original.named_modules() if "norm" in type(m).__name__.lower()}
    assert {p.name for p in report.patched} | {s.name for s in report.skipped} >= norm_modules
    assert len(report.patched) == model_zoo.EXPECTED_NORMS[architecture], str(report)
    assert all(type(patched.get_submodule(p.name)).__name__.endswith(p.original_class) for p in report.patched)

    inputs = model_zoo.batch(architecture)
    loss, logits, grads = loss_and_grads(original, inputs)
    patched_loss, patched_logits, patched_grads = loss_and_grads(patched, inputs)
    # fp32: rounding only. bf16: the models differ by a few bf16 roundings inside the norms (dx is computed in fp32
    # in one step, where autograd rounds intermediate results to bf16), which the layers above amplify.
    rtol = 1e-5 if dtype == torch.float32 else 5e-2
    assert_close_relative(patched_loss, loss, rtol, "loss")
    assert_close_relative(patched_logits, logits, rtol, "logits")
    assert patched_logits.dtype == logits.dtype
    assert set(patched_grads) == set(grads)
    # gradients that are zero in exact arithmetic (a key bias under softmax) are compared on the scale of the rest
    floor = 1e-3 * max(g.abs().max().float().item() for g in grads.values())
    for name, grad in grads.items():
        assert patched_grads[name].dtype == grad.dtype, name
        assert_close_relative(patched_grads[name], grad, rtol if dtype == torch.float32 else 1e-1, name, floor)
    stats = per_example_grad_stats(patched)
    assert len(stats) >= len(report.patched)
    assert all(s.count.item() == 3 and s.sum_sq.item() > 0 for s in stats.values())


@pytest.mark.parametrize("architecture", model_zoo.ONE_PER_NORM_VARIANT)
def test_each_norm_module_matches_its_original_exactly(architecture):
    """Module by module, in bf16 activations with fp32 and bf16 weights: same output dtype and values."""
    model = model_zoo.build(architecture)
    originals = {n: copy.deepcopy(m) for n, m in model.named_modules()}
    report = patch_model(model)
    generator = torch.Generator().manual_seed(0)
    for entry in report.patched:
        module, original = model.get_submodule(entry.name), originals[entry.name]
        features = module.weight.shape[0]
        for weight_dtype in (torch.float32, torch.bfloat16):
            for x_dtype in (torch.float32, torch.bfloat16):
                m, o = copy.deepcopy(module).to(weight_dtype), copy.deepcopy(original).to(weight_dtype)
                x = (torch.randn(2, 5, features, generator=generator) * 2).to(x_dtype)
                try:
                    expected = o(x)
                except RuntimeError:  # nn.LayerNorm on CPU refuses float32 weights with bf16 input
                    continue
                actual = m(x)
                assert actual.dtype == expected.dtype, (entry.name, weight_dtype, x_dtype)
                if weight_dtype == torch.float32 and x_dtype == torch.float32:
                    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
                else:  # at most one rounding step apart
                    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_patching_keeps_parameters_types_names_and_is_idempotent():
    model = model_zoo.build("gpt2")
    parameters = dict(model.named_parameters())
    state_keys = list(model.state_dict())
    report = patch_model(model)
    assert dict(model.named_parameters()) == parameters  # the same nn.Parameter objects
    assert list(model.state_dict()) == state_keys
    ln = model.get_submodule("transformer.h.0.ln_1")
    assert isinstance(ln, nn.LayerNorm) and "LayerNorm" in type(ln).__name__ and is_patched(ln)
    again = patch_model(model)
    assert [p.name for p in again.patched] == [p.name for p in report.patched]
    llama = model_zoo.build("llama")
    patch_model(llama)
    assert "RMSNorm" in type(llama.model.norm).__name__


def test_unpatch_restores_exact_behaviour():
    model = model_zoo.build("gemma")
    inputs = model_zoo.batch("gemma")
    reference_loss, reference_logits, reference_grads = loss_and_grads(model, inputs)
    classes = {n: type(m) for n, m in model.named_modules()}
    patch_model(model)
    assert unpatch_model(model) == model_zoo.EXPECTED_NORMS["gemma"]
    assert {n: type(m) for n, m in model.named_modules()} == classes
    loss, logits, grads = loss_and_grads(model, inputs)
    assert torch.equal(loss, reference_loss) and torch.equal(logits, reference_logits)
    assert all(torch.equal(grads[n], g) for n, g in reference_grads.items())


def test_include_and_exclude():
    model = model_zoo.build("llama")
    report = patch_model(model, include="model.layers.*", exclude=["*.post_attention_layernorm"])
    assert sorted(p.name for p in report.patched) == [
        "model.layers.0.input_layernorm",
        "model.layers.1.input_layernorm",
    ]
    assert {s.reason for s in report.skipped} == {"excluded by include/exclude"}
    assert len(report.skipped) == 3


class GatedRMSNorm(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states, gate=None):
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * hidden_states * (1 if gate is None else torch.sigmoid(gate))


class WeightlessRMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.eps = 1e-6

    def forward(self, hidden_states):
        return hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)


class HeadwiseRMSNorm(nn.Module):
    def __init__(self, heads: int, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, features))
        self.eps = 1e-6

    def forward(self, hidden_states):
        return hidden_states


class PermutingLayerNorm(nn.LayerNorm):
    def forward(self, hidden_states):
        return super().forward(hidden_states.transpose(1, 2)).transpose(1, 2)


class ScaledTanhNorm(nn.Module):
    """Looks like an RMSNorm (1-D weight, eps, one input) but computes something else."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.eps = 1e-6

    def forward(self, hidden_states):
        return self.weight * torch.tanh(hidden_states)


class Rescale(nn.Module):
    """A Gemma-style RMSNorm under a name that says nothing (as in trust_remote_code models)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(features))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        normalized = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (normalized * (1.0 + self.weight.float())).type_as(x)


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gated_norm = GatedRMSNorm(8)
        self.weightless_norm = WeightlessRMSNorm()
        self.head_norm = HeadwiseRMSNorm(2, 8)
        self.permuted_layernorm = PermutingLayerNorm(8)
        self.tanh_norm = ScaledTanhNorm(8)
        self.plain_layernorm_no_affine = nn.LayerNorm(8, elementwise_affine=False)
        self.plain_layernorm_no_bias = nn.LayerNorm(8, bias=False)
        self.torch_rmsnorm = nn.RMSNorm(8, eps=1e-5)
        self.scale = Rescale(8)


def test_unsupported_norms_are_skipped_with_a_reason():
    model = Zoo()
    report = patch_model(model)
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {
        "gated_norm": "forward takes more than one input (gated norm)",
        "weightless_norm": "weightless (no parameters to measure)",
        "head_norm": "2-D weight (per-head norm)",
        "permuted_layernorm": "nn.LayerNorm subclass that overrides forward",
        "tanh_norm": "output matches no supported normalization formula",
        "plain_layernorm_no_affine": "weightless (no parameters to measure)",
    }
    assert sorted(p.name for p in report.patched) == ["plain_layernorm_no_bias", "scale", "torch_rmsnorm"]
    assert model.scale._gns_spec.offset == 1.0 and model.scale._gns_spec.rounding == "float32_product"
    x = torch.randn(2, 3, 8)
    reference = nn.RMSNorm(8, eps=1e-5)
    torch.testing.assert_close(model.torch_rmsnorm(x), reference(x))
