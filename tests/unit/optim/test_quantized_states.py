"""StableSPAM with 8- and 4-bit blockwise-quantized moments: formats bitsandbytes reads, accuracy, memory, resume."""

from __future__ import annotations

import io

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from hf_gns_spam import StableSPAM
from hf_gns_spam.optim.quantized_state import dequantize, moment_format, quantize, unpack_indices

BIG = (96, 64)  # 6144 elements: quantized
SMALL = (64,)  # under 4096 elements: float32, as bitsandbytes does


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("second_moment", [False, True])
def test_bitsandbytes_reads_the_stored_moments(bits, second_moment):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=generator)
    x = x.square() if second_moment else x
    fmt = moment_format(bits, second_moment)
    indices, absmax = quantize(x, fmt)
    ours = dequantize(indices, absmax, fmt, x.numel())
    if bits == 4:
        assert indices.numel() == 2500  # two per byte
    indices = unpack_indices(indices, fmt, x.numel())
    theirs = bnb_functional.dequantize_blockwise(indices, absmax=absmax, code=fmt.code("cpu"), blocksize=fmt.blocksize)
    torch.testing.assert_close(ours, theirs[: x.numel()], rtol=0, atol=0)
    # nearest rounding: no value is further from its original than the worst case of the map, block by block
    code = fmt.code("cpu")
    grid = torch.linspace(-1.0 if not second_moment else 0.0, 1.0, 20001)
    worst = (grid[:, None] - code[None, :]).abs().min(1).values.max()
    blocks_absmax = absmax.repeat_interleave(fmt.blocksize)[: x.numel()]
    assert ((ours - x).abs() <= worst * blocks_absmax * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize(
    ("signed", "max_exponent_bits", "total_bits"), [(True, 7, 8), (False, 7, 8), (True, 3, 4), (False, 3, 4)]
)
def test_own_dynamic_map_equals_bitsandbytes(signed, max_exponent_bits, total_bits):
    """The package builds bitsandbytes' dynamic maps itself (8/4-bit states without bitsandbytes): same values."""
    from hf_gns_spam.kernels.step_contract import create_dynamic_map

    ours = create_dynamic_map(signed, max_exponent_bits, total_bits)
    theirs = bnb_functional.create_dynamic_map(signed, max_exponent_bits, total_bits)
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs.float())


def test_four_bit_second_moment_has_no_zero_point():
    code = moment_format(4, second_moment=True).code("cpu")
    assert code.min() > 0  # small v never rounds to 0 (Li et al. 2023): no exploding m / (sqrt(v) + eps)
    fmt = moment_format(4, second_moment=True)
    v = torch.full((256,), 1e-6)
    v[0] = 1.0
    indices, absmax = quantize(v, fmt)
    assert dequantize(indices, absmax, fmt, 256).min() > 0


def problem() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Initial parameters (one quantized, one small) and the targets of a noisy quadratic."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator) for shape in (BIG, SMALL)]
    return params, [torch.randn(shape, generator=generator) for shape in (BIG, SMALL)]


def run_steps(params, optimizer, targets, first: int, last: int) -> None:
    """Steps first..last-1 of the noisy quadratic; the noise of step t depends on t only (replayable)."""
    for t in range(first, last):
        generator = torch.Generator().manual_seed(1000 + t)
        for p, target in zip(params, targets, strict=True):
            p.grad = (p.detach() - target) + 0.1 * torch.randn(p.shape, generator=generator)
        optimizer.step()


def train(bits: int, steps: int = 60, mode: str = "clean") -> tuple[list[torch.Tensor], StableSPAM]:
    initial, targets = problem()
    params = [p.clone().requires_grad_() for p in initial]
    optimizer = StableSPAM(params, lr=1e-2, state_bits=bits, mode=mode, reset_interval=25)
    run_steps(params, optimizer, targets, 0, steps)
    return params, optimizer


def objective(params: list[torch.Tensor]) -> float:
    return sum((p.detach() - t).square().sum().item() for p, t in zip(params, problem()[1], strict=True))


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_quantized_training_tracks_32_bit(mode):
    reference, _ = train(32, steps=200, mode=mode)
    start = objective(problem()[0])
    for bits in (8, 4):
        quantized, optimizer = train(bits, steps=200, mode=mode)
        state = optimizer.state[quantized[0]]
        assert state["exp_avg_q"].dtype == torch.uint8 and state["quantized_bits"] == bits
        assert "exp_avg" in optimizer.state[quantized[1]]  # the small tensor stays float32
        if bits == 8:  # bitsandbytes-style 8-bit moments: the same optimisation to within 1%
            assert objective(quantized) == pytest.approx(objective(reference), rel=0.01)
        else:  # 4-bit moments converge, more slowly on this noisy quadratic (see BENCHMARKS.md)
            assert objective(quantized) < 0.1 * start


def test_state_memory_per_parameter():
    bytes_per_parameter = {}
    for bits in (32, 16, 8, 4):
        p = torch.zeros(256, 256, requires_grad=True)
        optimizer = StableSPAM([p], state_bits=bits)
        p.grad = torch.randn_like(p)
        optimizer.step()
        # less the three float64 0-dim statistics and the int64 non-finite counter
        bytes_per_parameter[bits] = (optimizer.state_bytes() - 3 * 8 - 8) / p.numel()
    assert bytes_per_parameter[32] == 8.0 and bytes_per_parameter[16] == 4.0
    assert bytes_per_parameter[8] == pytest.approx(2 + 2 * 4 / 256)
    assert bytes_per_parameter[4] == pytest.approx(1 + 2 * 4 / 128)


@pytest.mark.parametrize("mode", ["clean", "faithful"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_state_round_trips_and_resumes_bit_identically(bits, mode):
    straight, _ = train(bits, steps=40, mode=mode)
    first, optimizer = train(bits, steps=15, mode=mode)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["state"][0]["exp_avg_q"].dtype == torch.uint8

    params = [p.clone().requires_grad_() for p in saved["params"]]
    resumed = StableSPAM(params, lr=1e-2, state_bits=bits, mode=mode, reset_interval=25)
    resumed.load_state_dict(saved["optimizer"])
    run_steps(params, resumed, problem()[1], 15, 40)  # crosses the reset at step 25
    for a, b in zip(params, straight, strict=True):
        assert torch.equal(a, b)
