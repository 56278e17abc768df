"""The compiled Triton norm kernels on a CUDA device against the pure-torch path (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from hf_gns_spam.ops.gns_norm import NormSpec, gns_norm, norm_backend
from hf_gns_spam.ops.norm_reference import STATISTICS_SIZE
from tests.support import model_zoo
from tests.support.marks import GPU_ONLY

pytestmark = GPU_ONLY

SPECS = [
    NormSpec("rms_norm", 1e-6, 0.0, "input_dtype_first"),
    NormSpec("rms_norm", 1e-6, 1.0, "float32_product"),
    NormSpec("rms_norm", 1e-6, 0.0, "weight_dtype_first"),
    NormSpec("layer_norm", 1e-5, 0.0, "float32_product"),
]


def run(spec: NormSpec, x: torch.Tensor, weight: torch.Tensor, bias, dy: torch.Tensor, backend: str):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    statistics = torch.zeros(STATISTICS_SIZE, device=x.device, requires_grad=True)
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
    bias = 0.1 * torch.randn(hidden, device="cuda", generator=generator).to(dtype) if spec.variant.bias else None
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


def run_segments(spec, x, weight, bias, dy, ids, backend):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    statistics = torch.zeros(STATISTICS_SIZE, device=x.device, requires_grad=True)
    with norm_backend(backend):
        gns_norm(x, weight, bias, spec, statistics, ids).backward(dy)
    return x.grad, weight.grad, None if bias is None else bias.grad, statistics.grad


SEGMENT_SHAPES = [(1, 4096, (), 4096), (2, 2048, (), 1024), (1, 2048, (8,), 128), (1, 512, (), 16384)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.rounding}-{s.offset}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("rows", "tokens", "heads", "hidden"), SEGMENT_SHAPES, ids=lambda v: str(v))
def test_segments_triton_matches_torch_on_gpu(spec, dtype, rows, tokens, heads, hidden):
    """Packed rows ([B, T, D], [B, T, H, D], chunked D): per-sequence statistics, Triton against torch;
    deterministic; dx bitwise as without segments."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (rows, tokens, *heads, hidden)
    x = torch.randn(shape, device="cuda", generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=generator)).to(dtype)
    bias = 0.1 * torch.randn(hidden, device="cuda", generator=generator).to(dtype) if spec.variant.bias else None
    dy = torch.randn(shape, device="cuda", generator=generator).to(dtype)
    ids = random_segments(rows, tokens, torch.Generator().manual_seed(1)).cuda()
    expected = run_segments(spec, x, weight, bias, dy, ids, "torch")
    actual = run_segments(spec, x, weight, bias, dy, ids, "triton")
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, e in zip(("dx", "dw", "db", "statistics"), actual, expected, strict=True):
        if e is None:
            assert a is None
            continue
        scale = e.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - e.float()).abs().max() / scale).item() < tolerance, name
    torch.testing.assert_close(actual[3], expected[3], rtol=1e-4, atol=0.0)  # float32 sums in both
    assert actual[3][2].item() == int(ids.max()) + 1
    again = run_segments(spec, x, weight, bias, dy, ids, "triton")
    assert all(a is None or torch.equal(a, b) for a, b in zip(actual, again, strict=True))
    plain = run(spec, x, weight, bias, dy, "triton")
    assert torch.equal(actual[0], plain[1])  # dx does not depend on the segments


def test_segments_backward_has_no_host_sync_on_gpu():
    """The Triton backward with segments reads nothing on the host (no tile table, no count, no id check)."""
    spec = NormSpec("rms_norm", 1e-6, 0.0, "input_dtype_first")
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 1024, 512, device="cuda", generator=generator, dtype=torch.bfloat16).requires_grad_()
    weight = torch.ones(512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = random_segments(1, 1024, torch.Generator().manual_seed(1)).cuda()
    statistics = torch.zeros(STATISTICS_SIZE, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    with norm_backend("triton"):
        y = gns_norm(x, weight, None, spec, statistics, ids)
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
    spec = NormSpec("layer_norm", 1e-5, 0.0, "float32_product")
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


def model_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, dict, dict]:
    """(loss, the norms' weight gradients, the per-example statistics) of one forward/backward, on the CPU."""
    from hf_gns_spam import per_example_grad_stats

    loss = model(**inputs).loss
    loss.backward()
    stats = {n: (s.sum_sq.item(), s.count.item()) for n, s in per_example_grad_stats(model).items()}
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if n in stats}
    return loss.item(), grads, stats


@pytest.mark.parametrize("architecture", model_zoo.BOTH_NORM_KINDS_AND_OFFSET)
def test_patched_model_on_cuda_equals_the_cpu_path(architecture):
    """A patched model (padded batch) on CUDA, Triton kernels, against the same model on the CPU, torch path, both
    float32: loss, the norms' gradients and their per-example statistics agree to float32 rounding."""
    import copy

    from hf_gns_spam import patch_model

    model = model_zoo.build(architecture)
    patch_model(model)
    inputs = model_zoo.batch(architecture, batch_size=4, length=32)
    cpu_loss, cpu_grads, cpu_stats = model_step(copy.deepcopy(model), inputs)
    gpu_loss, gpu_grads, gpu_stats = model_step(model.cuda(), {k: v.cuda() for k, v in inputs.items()})
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    assert gpu_grads.keys() == cpu_grads.keys() and gpu_grads
    for name, grad in gpu_grads.items():
        torch.testing.assert_close(grad, cpu_grads[name], rtol=1e-4, atol=1e-6)
    assert gpu_stats.keys() == cpu_stats.keys() and gpu_stats
    for name, (sum_sq, count) in gpu_stats.items():
        assert count == cpu_stats[name][1] == 4
        assert sum_sq == pytest.approx(cpu_stats[name][0], rel=1e-4), name


def test_patched_bf16_model_kernels_equal_the_torch_path_on_cuda():
    """bfloat16 LLaMA on CUDA: the Triton kernels against the torch reference on the same device (same roundings
    by contract): loss and statistics to bfloat16 rounding of the activations around them."""
    import copy

    from hf_gns_spam import patch_model

    model = model_zoo.build("llama").to("cuda", torch.bfloat16)
    patch_model(model)
    inputs = {k: v.cuda() for k, v in model_zoo.batch("llama", batch_size=4, length=64).items()}
    with norm_backend("torch"):
        torch_loss, _, torch_stats = model_step(copy.deepcopy(model), inputs)
    with norm_backend("triton"):
        triton_loss, _, triton_stats = model_step(model, inputs)
    assert triton_loss == pytest.approx(torch_loss, rel=1e-2)
    for name, (sum_sq, count) in triton_stats.items():
        assert count == torch_stats[name][1] == 4
        assert sum_sq == pytest.approx(torch_stats[name][0], rel=5e-2), name


def test_torch_compile_of_a_patched_llama_on_cuda():
    """torch.compile (inductor) of a patched LLaMA on CUDA: the Triton norm kernels inside the compiled graph give
    the eager model's loss, gradients and statistics."""
    import copy

    from hf_gns_spam import patch_model

    model = model_zoo.build("llama").cuda()
    patch_model(model)
    eager = copy.deepcopy(model)
    inputs = {k: v.cuda() for k, v in model_zoo.batch("llama", batch_size=4, length=32).items()}
    eager_loss, eager_grads, eager_stats = model_step(eager, inputs)
    compiled_loss, compiled_grads, compiled_stats = model_step(torch.compile(model), inputs)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, eager_grads[name.removeprefix("_orig_mod.")], rtol=1e-3, atol=1e-5)
    assert len(compiled_stats) == len(eager_stats)
    for name, (sum_sq, count) in eager_stats.items():
        compiled_sum_sq, compiled_count = compiled_stats.get(name, compiled_stats.get(f"_orig_mod.{name}"))
        assert compiled_count == count == 4
        assert compiled_sum_sq == pytest.approx(sum_sq, rel=1e-3), name
