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


def random_segments(rows: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, tokens] sequence ids numbered in row-major order: unequal lengths from 1 to ~tokens/3, each row cut
    into its own sequences (the last one ends with the row)."""
    ids, next_id = [], 0
    for _ in range(rows):
        row = []
        while len(row) < tokens:
            length = int(torch.randint(1, max(2, tokens // 3), (1,), generator=generator))
            row += [next_id] * min(length, tokens - len(row))
            next_id += 1
        ids.append(row)
    return torch.tensor(ids)


def run_segments(spec, x, weight, bias, dy, ids, scales, backend):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    statistics = torch.zeros(5, device=x.device, requires_grad=True)
    with norm_backend(backend):
        gns_norm(x, weight, bias, spec, statistics, scales, ids).backward(dy)
    return x.grad, weight.grad, None if bias is None else bias.grad, statistics.grad


SEGMENT_SHAPES = [(1, 4096, (), 4096), (2, 2048, (), 1024), (1, 2048, (8,), 128), (1, 512, (), 16384)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.rounding}-{s.offset}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("rows", "tokens", "heads", "hidden"), SEGMENT_SHAPES, ids=lambda v: str(v))
def test_segments_triton_matches_torch_on_gpu(spec, dtype, rows, tokens, heads, hidden):
    """Packed rows ([B, T, D], [B, T, H, D], chunked D): per-sequence statistics with scales, Triton against torch;
    deterministic; dx bitwise as without segments."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (rows, tokens, *heads, hidden)
    x = torch.randn(shape, device="cuda", generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=generator)).to(dtype)
    bias = (
        0.1 * torch.randn(hidden, device="cuda", generator=generator).to(dtype) if spec.kind == "layer_norm" else None
    )
    dy = torch.randn(shape, device="cuda", generator=generator).to(dtype)
    ids = random_segments(rows, tokens, torch.Generator().manual_seed(1)).cuda()
    scales = torch.rand(int(ids.max()) + 1, device="cuda", generator=generator) + 0.5
    expected = run_segments(spec, x, weight, bias, dy, ids, scales, "torch")
    actual = run_segments(spec, x, weight, bias, dy, ids, scales, "triton")
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, e in zip(("dx", "dw", "db", "statistics"), actual, expected, strict=True):
        if e is None:
            assert a is None
            continue
        scale = e.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - e.float()).abs().max() / scale).item() < tolerance, name
    torch.testing.assert_close(actual[3], expected[3], rtol=1e-4, atol=0.0)  # float32 sums in both
    assert actual[3][2].item() == int(ids.max()) + 1
    again = run_segments(spec, x, weight, bias, dy, ids, scales, "triton")
    assert all(a is None or torch.equal(a, b) for a, b in zip(actual, again, strict=True))
    plain = run(spec, x, weight, bias, dy, "triton")
    assert torch.equal(actual[0], plain[1])  # dx does not depend on the segments


def test_segments_backward_has_no_host_sync_on_gpu():
    """The Triton backward with segments reads nothing on the host (no tile table, no count, no id check)."""
    spec = NormSpec("rms_norm", 1e-6, 0.0, "llama")
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 1024, 512, device="cuda", generator=generator, dtype=torch.bfloat16).requires_grad_()
    weight = torch.ones(512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = random_segments(1, 1024, torch.Generator().manual_seed(1)).cuda()
    scales = torch.ones(int(ids.max()) + 1, device="cuda")
    statistics = torch.zeros(5, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    with norm_backend("triton"):
        y = gns_norm(x, weight, None, spec, statistics, scales, ids)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y.backward(dy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(statistics.grad).all() and statistics.grad[2].item() == int(ids.max()) + 1


def test_segments_invalid_ids_on_gpu():
    """On the GPU the Triton path does not check ids on the host: invalid ones give NaN statistics; the torch path
    (which reads them anyway) raises."""
    spec = NormSpec("layer_norm", 1e-5, 0.0, "layer_norm")
    x = torch.randn(2, 64, 256, device="cuda")
    weight = torch.ones(256, device="cuda")
    bias = torch.zeros(256, device="cuda")
    dy = torch.randn_like(x)
    ids = random_segments(2, 64, torch.Generator().manual_seed(1)).cuda()
    for bad in (ids.flip(1), ids - 1):
        *_, statistics = run_segments(spec, x, weight, bias, dy, bad, None, "triton")
        assert torch.isnan(statistics).all()
        with pytest.raises(ValueError):
            run_segments(spec, x, weight, bias, dy, bad, None, "torch")
    *_, statistics = run_segments(spec, x, weight, bias, dy, ids, torch.ones(3, device="cuda"), "triton")
    assert torch.isnan(statistics).all()  # not one scale per sequence
