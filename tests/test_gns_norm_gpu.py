"""The compiled Triton norm kernels on a CUDA device against the pure-torch path (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from hf_gns_spam.ops.gns_norm import NormSpec, gns_norm, norm_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPECS = [
    NormSpec("rms_norm", 1e-6, 0.0, "llama"),
    NormSpec("rms_norm", 1e-6, 1.0, "fp32"),
    NormSpec("rms_norm", 1e-6, 0.0, "t5"),
    NormSpec("layer_norm", 1e-5, 0.0, "layer_norm"),
]


def run(spec: NormSpec, x: torch.Tensor, weight: torch.Tensor, bias, dy: torch.Tensor, backend: str):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    statistics = torch.zeros(5, device=x.device, requires_grad=True)
    with norm_backend(backend):
        y = gns_norm(x, weight, bias, spec, statistics)
        y.backward(dy)
    return y, x.grad, weight.grad, None if bias is None else bias.grad, statistics.grad


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.rounding}-{s.offset}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("examples", "tokens", "hidden"), [(4, 512, 1024), (2, 8192, 4096), (2, 256, 16384)])
def test_triton_matches_torch_on_gpu(spec, dtype, examples, tokens, hidden):
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(examples, tokens, hidden, device="cuda", generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=generator)).to(dtype)
    bias = (
        0.1 * torch.randn(hidden, device="cuda", generator=generator).to(dtype) if spec.kind == "layer_norm" else None
    )
    dy = torch.randn(x.shape, device="cuda", generator=generator).to(dtype)
    expected = run(spec, x, weight, bias, dy, "torch")
    actual = run(spec, x, weight, bias, dy, "triton")
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, e in zip(("y", "dx", "dw", "db", "statistics"), actual, expected, strict=True):
        if e is None:
            assert a is None
            continue
        assert a.dtype == e.dtype, name
        scale = e.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - e.float()).abs().max() / scale).item() < tolerance, name
