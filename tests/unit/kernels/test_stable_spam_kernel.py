"""The fused Triton Stable-SPAM step against the torch path ``stable_spam._update_tensor`` (Triton interpreter on CPU).

Both paths run inside :class:`StableSPAM` (the Triton one by replacing ``_update_tensor`` with a call to
``triton_update_tensor``), so they see the same hyperparameters, step counters, resets and cosine factor. After every
step the parameters, both moments and the three statistics are compared.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import hf_gns_spam.optim.stable_spam as stable_spam_module
from hf_gns_spam import StableSPAM
from hf_gns_spam.kernels.stable_spam_step import (
    _quantization_tables,
    _quantize,
    _store_quantized,
    triton_update_supported,
    triton_update_tensor,
    workspace_numel,
)
from hf_gns_spam.kernels.step_contract import STATE_FORMATS, StepHyperparameters
from hf_gns_spam.optim.quantized_state import dequantize, moment_format, quantize, unpack_indices
from hf_gns_spam.optim.stable_spam import _update_tensor
from tests.support.host_sync import forbid_host_sync
from tests.support.optimizer_runs import assert_close_scaled

SHAPES = [(), (7,), (33, 65), (3, 4, 129)]  # 2145 elements: two blocks of the default 2048
STATE_KEYS = ("exp_avg", "exp_avg_sq", "clip_max_ema", "norm_ema", "norm_sq_ema", "nonfinite_grad_steps")
STEPS = 20
ZERO_STEP = 5  # every gradient is zero at this step
SPIKE_STEP = 9  # one entry of every gradient ×100


def gradient_stream(shapes, steps: int = STEPS, seed: int = 0) -> list[list[torch.Tensor]]:
    """float32 Gaussian gradients with a varying scale, an all-zero step, a 100× single-entry spike step, and one
    tensor whose gradient is zero at a second step (so a zero-norm tensor meets a non-zero one)."""
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for t in range(1, steps + 1):
        grads = []
        for i, shape in enumerate(shapes):
            g = torch.randn(shape, generator=gen) * (1.0 + 0.5 * (t % 3))
            if t == ZERO_STEP or (t == 12 and i == 1):
                g.zero_()
            if t == SPIKE_STEP:
                g.view(-1)[(7 * t + i) % g.numel()] *= 100.0
            grads.append(g)
        stream.append(grads)
    return stream


def initial_params(shapes, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def run(
    use_triton: bool,
    shapes,
    param_dtype: torch.dtype = torch.float32,
    block: int | None = None,
    max_programs: int | None = None,
    **kwargs,
) -> list[list[dict[str, torch.Tensor]]]:
    """Run StableSPAM over the gradient stream; per step, per tensor: clones of the parameter and its state."""
    params = [p.to(param_dtype).requires_grad_() for p in initial_params(shapes)]
    opt = StableSPAM(params, **kwargs)
    launch = {} if block is None else {"block": block, "max_programs": max_programs}

    def triton_path(param, state, work, spikes, hp, stat_step, adam_step, one):
        triton_update_tensor(param, state, hp, stat_step, adam_step, **launch)

    history = []
    with pytest.MonkeyPatch.context() as mp:
        if use_triton:
            mp.setattr(stable_spam_module, "_update_tensor", triton_path)
        for grads in gradient_stream(shapes):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.to(param_dtype)
            opt.step()
            history.append(
                [{"param": p.detach().clone(), **{k: opt.state[p][k].clone() for k in STATE_KEYS}} for p in params]
            )
    return history


def compare(triton_history, torch_history, param_rtol: float, moment_rtol: float, stat_rtol: float) -> None:
    for step, (tri_step, ref_step) in enumerate(zip(triton_history, torch_history, strict=True), start=1):
        for index, (tri, ref) in enumerate(zip(tri_step, ref_step, strict=True)):
            for key, rtol in (
                ("param", param_rtol),
                ("exp_avg", moment_rtol),
                ("exp_avg_sq", moment_rtol),
                ("clip_max_ema", stat_rtol),
                ("norm_ema", stat_rtol),
                ("norm_sq_ema", stat_rtol),
            ):
                assert_close_scaled(tri[key], ref[key], rtol, f"step {step}, tensor {index}, {key}")


BASE = {"lr": 1e-2, "reset_interval": 7, "weight_decay": 0.1, "total_steps": STEPS}


@pytest.mark.parametrize("state_bits", [32, 16])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_matches_torch_step(mode, param_dtype, state_bits):
    """20 steps with resets at 7 and 14, a zero-gradient step, a spike, weight decay and the cosine factor."""
    kwargs = {**BASE, "mode": mode, "state_bits": state_bits}
    expected = run(False, SHAPES, param_dtype, **kwargs)
    actual = run(True, SHAPES, param_dtype, **kwargs)
    # float32 everywhere: rounding-level differences only (reduction order, fma); a bfloat16 store can round the
    # other way after such a difference (one bfloat16 ulp, 2^-8 relative).
    param_rtol = 1e-6 if param_dtype == torch.float32 else 1e-2
    if state_bits == 16:  # a moment rounded the other way moves the update by 2^-8 of itself
        param_rtol = max(param_rtol, 1e-4)
    moment_rtol = 1e-6 if (param_dtype == torch.float32 and state_bits == 32) else 1e-2
    stat_rtol = 1e-6 if param_dtype == torch.float32 else 1e-3
    compare(actual, expected, param_rtol, moment_rtol, stat_rtol)


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_small_blocks_grid_stride_loops_and_bitwise_determinism(mode):
    """Small blocks, at most 3 programs: the larger tensors loop over several blocks per program and the reductions
    combine several partial results. Two Triton runs are bitwise equal."""
    shapes = [(7,), (33, 65), (5000,)]
    kwargs = {**BASE, "mode": mode}
    expected = run(False, shapes, **kwargs)
    actual = run(True, shapes, block=1024, max_programs=3, **kwargs)
    compare(actual, expected, 1e-6, 1e-6, 1e-6)
    again = run(True, shapes, block=1024, max_programs=3, **kwargs)
    for a_step, b_step in zip(actual, again, strict=True):
        for a, b in zip(a_step, b_step, strict=True):
            for key in a:
                assert torch.equal(a[key], b[key]), key


def test_default_hyperparameters_no_reset_no_decay():
    """Library defaults (reset_interval 1000, no weight decay, no cosine factor) on fp16 parameters too."""
    for dtype, rtol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
        expected = run(False, SHAPES[:3], dtype, lr=1e-2)
        actual = run(True, SHAPES[:3], dtype, lr=1e-2)
        compare(actual, expected, rtol, 1e-6 if dtype == torch.float32 else 1e-3, 1e-6 if rtol == 1e-6 else 1e-3)


def fresh_state(param: torch.Tensor, moment_dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "exp_avg": (torch.randn(param.shape, generator=gen) * 0.1).to(moment_dtype),
        "exp_avg_sq": (torch.rand(param.shape, generator=gen) * 0.01).to(moment_dtype),
        "clip_max_ema": torch.tensor(1.5, dtype=torch.float64),
        "norm_ema": torch.tensor(2.0, dtype=torch.float64),
        "norm_sq_ema": torch.tensor(5.0, dtype=torch.float64),
        "nonfinite_grad_steps": torch.tensor(0),
    }


def torch_update(param, state, hp, stat_step, adam_step):
    """``_update_tensor`` with scratch buffers as ``StableSPAM._step_tensors`` passes them."""
    n = param.numel()
    work = torch.empty(n, dtype=torch.float32).view(param.shape)
    spikes = torch.empty(n, dtype=torch.bool).view(param.shape)
    _update_tensor(param, state, work, spikes, hp, stat_step, adam_step, torch.ones((), dtype=torch.float32))


@pytest.mark.parametrize("shape", [(), (300,)])
@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("reset", [False, True])
def test_direct_call_with_large_ema_weights(shape, faithful, reset):
    """Direct calls on a warm state: EMA weights ≥ 0.5 (torch.lerp's other branch), a bf16 parameter with a float32
    gradient, a spike, and a zero gradient (clean mode: statistics, moments and value stay; decay applies)."""
    hp = StepHyperparameters(
        lr=3e-2,
        weight_decay=0.05,
        beta1=0.3,
        beta2=0.45,
        gamma1=0.2,
        gamma2=0.4,
        gamma3=0.35,
        eps=1e-6,
        faithful=faithful,
        is_reset_step=reset,
    )
    gen = torch.Generator().manual_seed(3)
    for param_dtype, moment_dtype, rtol in (
        (torch.float32, torch.float32, 1e-6),
        (torch.bfloat16, torch.float32, 1e-2),
        (torch.float32, torch.bfloat16, 1e-2),
    ):
        init = torch.randn(shape, generator=gen).to(param_dtype)
        grad = torch.randn(shape, generator=gen)
        grad.view(-1)[0] *= 100.0
        for g in (grad, torch.zeros(shape)):
            ref, tri = init.clone(), init.clone()
            ref.grad_dtype = tri.grad_dtype = None  # allow a float32 gradient on a bf16 tensor
            ref.grad, tri.grad = g.clone(), g.clone()  # float32 gradient, also for the bf16 parameter
            ref_state, tri_state = fresh_state(init, moment_dtype, 4), fresh_state(init, moment_dtype, 4)
            torch_update(ref, ref_state, hp, stat_step=5, adam_step=3)
            triton_update_tensor(tri, tri_state, hp, stat_step=5, adam_step=3, block=128, max_programs=2)
            assert_close_scaled(tri, ref, rtol, "param")
            for key in STATE_KEYS:
                assert_close_scaled(tri_state[key], ref_state[key], rtol, key)
            if not g.any() and not faithful:
                before = fresh_state(init, moment_dtype, 4)
                for key in ("norm_ema", "norm_sq_ema"):
                    assert torch.equal(tri_state[key], before[key]), key
                if not reset:
                    assert torch.equal(tri_state["exp_avg"], before["exp_avg"])
                    assert torch.equal(tri_state["exp_avg_sq"], before["exp_avg_sq"])
                assert torch.equal(tri, (init.float() * (1 - hp.lr * hp.weight_decay)).to(param_dtype))


def test_workspace_is_reused_and_checked():
    param = torch.randn(1000).requires_grad_()
    param.grad = torch.randn(1000)
    hp = StepHyperparameters(1e-2, 0.0, 0.9, 0.999, 0.7, 0.9, 0.999, 1e-8, False, False)
    ref = param.detach().clone()
    ref.grad = param.grad.clone()
    ref_state, state = fresh_state(param, torch.float32, 0), fresh_state(param, torch.float32, 0)
    workspace = torch.full((workspace_numel(1000, block=128, max_programs=4) + 3,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        triton_update_tensor(param, state, hp, 1, 1, workspace=workspace, block=128, max_programs=4)
    torch_update(ref, ref_state, hp, 1, 1)
    assert_close_scaled(param.detach(), ref, 1e-6, "param")
    with pytest.raises(ValueError, match="workspace"):
        triton_update_tensor(param, state, hp, 1, 1, workspace=torch.empty(3), block=128, max_programs=4)


def test_unsupported_tensors_are_refused_without_touching_them():
    hp = StepHyperparameters(1e-2, 0.0, 0.9, 0.999, 0.7, 0.9, 0.999, 1e-8, False, False)
    double = torch.randn(4, 4, dtype=torch.float64)
    double.grad = torch.randn(4, 4, dtype=torch.float64)
    state64 = {k: v.double() for k, v in fresh_state(double, torch.float32, 0).items()}
    strided = torch.randn(4, 4).t()
    strided.grad = torch.randn(4, 4).t()
    no_grad = torch.randn(4)
    ok = torch.randn(4, 4)
    ok.grad = torch.randn(4, 4)
    for param, state in (
        (double, state64),
        (strided, fresh_state(strided, torch.float32, 0)),
        (no_grad, fresh_state(no_grad, torch.float32, 0)),
        (ok, {"exp_avg": torch.zeros(4, 4)}),
    ):
        assert not triton_update_supported(param, state)
        before = param.clone()
        with pytest.raises(ValueError, match="does not support"):
            triton_update_tensor(param, state, hp, 1, 1)
        assert torch.equal(param, before)
    assert triton_update_supported(ok, fresh_state(ok, torch.float32, 0))
    quantized = torch.randn(5000, requires_grad=True)
    quantized.grad = torch.randn(5000)
    opt = StableSPAM([quantized], state_bits=8)
    state = opt._init_state(quantized, opt.param_groups[0])
    assert "quantized_bits" in state and triton_update_supported(quantized, state)
    with pytest.raises(ValueError, match="multiple of the 8-bit quantization block"):
        triton_update_tensor(quantized, state, hp, 1, 1, block=128)
    state["exp_avg_sq_absmax"] = state["exp_avg_sq_absmax"][:-1]  # one block short
    assert not triton_update_supported(quantized, state)
    with pytest.raises(ValueError, match="exp_avg_sq_absmax"):
        triton_update_tensor(quantized, state, hp, 1, 1)


@pytest.mark.parametrize("state_bits", [32, 8, 4])
@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_no_host_synchronisation(mode, state_bits, monkeypatch):
    """No .item(), bool(), .tolist(), boolean-mask indexing… on tensors anywhere in the Triton step (the (64, 64)
    tensor has 8/4-bit quantized moments when state_bits asks for them)."""
    params = [torch.randn(s, requires_grad=True) for s in [(8, 8), (8,), (2, 3, 4), (64, 64)]]
    for bits in (8, 4):  # the optimizer's state initialisation builds the code maps once (bitsandbytes' tolist)
        for second_moment in (False, True):
            moment_format(bits, second_moment).code(torch.device("cpu"))
    opt = StableSPAM(params, reset_interval=2, mode=mode, weight_decay=0.1, total_steps=5, state_bits=state_bits)
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad.zero_()
    calls = []

    def triton_path(param, state, work, spikes, hp, stat_step, adam_step, one):
        calls.append(param.shape)
        triton_update_tensor(param, state, hp, stat_step, adam_step)

    monkeypatch.setattr(stable_spam_module, "_update_tensor", triton_path)

    with forbid_host_sync(monkeypatch, "the Triton step"):
        for _ in range(3):
            opt.step()
    assert len(calls) == 12
    assert ("quantized_bits" in opt.state[params[3]]) == (state_bits != 32)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("moments", ["fp32", "8bit", "4bit"])
@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("faithful", [False, True])
def test_non_finite_gradient_entries_count_as_zero_in_both_paths(special, faithful, moments):
    """A NaN or ±inf gradient entry is treated as 0 by both paths: each gives bitwise what it gives with that entry
    set to 0 (everything finite, the quantization block included), both agree to rounding, and both count the step
    in ``nonfinite_grad_steps``."""
    hp = StepHyperparameters(1e-2, 0.1, 0.9, 0.999, 0.7, 0.9, 0.999, 1e-8, faithful, False)
    numel = 300 if moments == "fp32" else 4097
    init = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    zeroed = grad.clone()
    grad[5], zeroed[5] = special, 0.0

    def state():
        if moments == "fp32":
            return fresh_state(init, torch.float32, 0)
        return random_quantized_state(numel, 8 if moments == "8bit" else 4, seed=2)

    keys = STATE_KEYS if moments == "fp32" else Q_STATE_KEYS
    results = {}
    for name, update in (
        ("torch", lambda p, st: torch_update(p, st, hp, 3, 3)),
        ("triton", lambda p, st: triton_update_tensor(p, st, hp, 3, 3, block=512, max_programs=2)),
    ):
        for label, g in (("special", grad), ("zero", zeroed)):
            param, param_state = init.clone(), state()
            param.grad = g.clone()
            update(param, param_state)
            results[name, label] = (param, param_state)
        (param, param_state), (param0, state0) = results[name, "special"], results[name, "zero"]
        assert torch.isfinite(param).all() and torch.equal(param, param0), name
        assert param_state["nonfinite_grad_steps"].item() == 1 and state0["nonfinite_grad_steps"].item() == 0
        for key in keys:
            if key != "nonfinite_grad_steps":
                assert torch.equal(param_state[key], state0[key]), (name, key)
    assert_close_scaled(results["triton", "special"][0], results["torch", "special"][0], 1e-6, "param")
    for key in ("clip_max_ema", "norm_ema", "norm_sq_ema", "nonfinite_grad_steps"):
        assert_close_scaled(results["triton", "special"][1][key], results["torch", "special"][1][key], 1e-6, key)


def test_optimizer_dispatches_supported_tensors_to_the_kernel(monkeypatch):
    """StableSPAM.step with the Triton path switched on (as on CUDA): same result as the torch path; float64
    tensors fall back to torch, 8/4-bit quantized moments go through the kernel too."""
    import hf_gns_spam.optim.stable_spam as stable_spam_module
    from hf_gns_spam import StableSPAM
    from hf_gns_spam.kernels import stable_spam_step

    kernel_calls = []
    original_update = stable_spam_step.triton_update_tensors

    def counting_update(params, *args, **kwargs):
        kernel_calls.extend(param.shape for param in params)
        return original_update(params, *args, **kwargs)

    monkeypatch.setattr(stable_spam_step, "triton_update_tensors", counting_update)

    def run(use_triton: bool, state_bits: int, dtype: torch.dtype) -> list[torch.Tensor]:
        monkeypatch.setattr(stable_spam_module, "_use_triton", lambda param: use_triton)
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in ((80, 64), (9,))]
        optimizer = StableSPAM(params, lr=1e-2, reset_interval=4, state_bits=state_bits)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(dtype)
            optimizer.step()
        return [p.detach().float() for p in params]

    # (state_bits, dtype, kernel calls per step: the (80, 64) tensor is quantized at 8/4 bits (the (9,) one stays
    # float32), both go through the kernel; fp64 is torch-only)
    for state_bits, dtype, calls in (
        (32, torch.float32, 2),
        (16, torch.float32, 2),
        (8, torch.float32, 2),
        (4, torch.float32, 2),
        (32, torch.float64, 0),
    ):
        kernel_calls.clear()
        triton_result = run(True, state_bits, dtype)
        assert len(kernel_calls) == 6 * calls, (state_bits, dtype)
        for kernel, reference in zip(triton_result, run(False, state_bits, dtype), strict=True):
            scale = reference.abs().max()
            assert ((kernel - reference).abs().max() / scale).item() < 1e-6, (state_bits, dtype)


def warm_state(param: torch.Tensor, state_bits: int, seed: int) -> dict:
    """The optimizer's own state for ``param`` under ``state_bits``, with non-zero moments and statistics."""
    optimizer = StableSPAM([param], state_bits=state_bits)
    state = optimizer._init_state(param, optimizer.param_groups[0])
    gen = torch.Generator().manual_seed(seed)
    if "quantized_bits" in state:
        for key in ("exp_avg", "exp_avg_sq"):
            fmt = moment_format(state_bits, key == "exp_avg_sq")
            values = torch.rand(param.numel(), generator=gen) * 0.01 - (0.005 if key == "exp_avg" else 0.0)
            state[key + "_q"], state[key + "_absmax"] = quantize(values, fmt)
    else:
        for key in ("exp_avg", "exp_avg_sq"):
            state[key].copy_(torch.rand(param.shape, generator=gen) * 0.01)
    for key, value in (("clip_max_ema", 1.5), ("norm_ema", 2.0), ("norm_sq_ema", 5.0)):
        state[key].fill_(value)
    return state


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("state_bits", [32, 16, 8])
@pytest.mark.parametrize("faithful", [False, True])
def test_one_launch_for_many_tensors_equals_one_tensor_at_a_time(param_dtype, state_bits, faithful, monkeypatch):
    """``triton_update_tensors`` over tensors of many sizes (empty, one element, a partial last block, several blocks
    per program), a non-contiguous gradient, a gradient of another dtype and a parameter that does not start on 16
    bytes gives bitwise what ``triton_update_tensor`` gives for each tensor alone, with one launch of each kernel per
    format: here the aligned tensors, the misaligned one (the only one large enough for 8-bit moments) and the one
    with the other gradient dtype."""
    from hf_gns_spam.kernels import stable_spam_step

    gen = torch.Generator().manual_seed(3)
    buffer = torch.randn(5000, generator=gen).to(param_dtype)
    params = [torch.randn(shape, generator=gen).to(param_dtype) for shape in [(0,), (1,), (7,), (33, 65), (3000,)]]
    params.append(buffer[1:4097])  # starts 2 or 4 bytes into its storage: not aligned
    grads = [torch.randn(p.shape, generator=gen).to(param_dtype) for p in params]
    grads[3] = torch.randn(65, 33, generator=gen).to(param_dtype).t()  # non-contiguous
    grads[4] = grads[4].float() if param_dtype != torch.float32 else grads[4].bfloat16()  # another dtype
    grads[4].view(-1)[17] = float("nan")
    hp = StepHyperparameters(1e-2, 0.1, 0.9, 0.999, 0.7, 0.9, 0.999, 1e-8, faithful, False)
    launch = {"block": 512, "max_programs": 3}
    states = [warm_state(p, state_bits, seed) for seed, p in enumerate(params)]
    alone = [(p.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}) for p, st in
             zip(params, states, strict=True)]  # fmt: skip
    with torch.no_grad():
        for (param, state), grad in zip(alone, grads, strict=True):
            triton_update_tensor(param, state, hp, 4, 3, grad=grad, **launch)
        launches = []

        class CountingKernel:
            def __getitem__(self, grid):
                launches.append(grid)
                return original[grid]

        original = stable_spam_step._max_abs_kernel
        monkeypatch.setattr(stable_spam_step, "_max_abs_kernel", CountingKernel())
        stable_spam_step.triton_update_tensors(params, states, hp, 4, 3, grads=grads, **launch)
    assert len(launches) == 3, launches  # K1 launches: one per format
    assert sum(grid[1] for grid in launches) == len(params)
    for (param, state), (expected, expected_state) in zip(zip(params, states, strict=True), alone, strict=True):
        assert torch.equal(param, expected), param.shape
        for key, value in expected_state.items():
            if torch.is_tensor(value):
                assert torch.equal(state[key], value), (param.shape, key)


# --------------------------------------------------------------------------------------------------------------------
# Blockwise-quantized moments (state_bits 8 and 4)
# --------------------------------------------------------------------------------------------------------------------

# 4550 = 17·256 + 198 = 35·128 + 70 elements: a partial last quantization block; 4097: a one-element last block
# and an odd count (the 4-bit tail byte holds one index).
Q_SHAPES = [(70, 65), (4097,)]
Q_STEPS = 8
Q_ZERO_STEP = 3  # every gradient is zero
Q_SPIKE_STEP = 6  # one entry ×100
Q_BASE = {"lr": 1e-2, "reset_interval": 4, "weight_decay": 0.1, "total_steps": Q_STEPS}  # resets at steps 4 and 8
Q_STATE_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax", *STATE_KEYS[2:])


def run_quantized(use_triton: bool, state_bits: int, param_dtype: torch.dtype, **kwargs):
    """StableSPAM over Q_STEPS steps with the Triton step switched on or off (as ``_use_triton`` does on CUDA);
    per step, per tensor: clones of the parameter and its state."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(shape, generator=gen).to(param_dtype).requires_grad_() for shape in Q_SHAPES]
    opt = StableSPAM(params, state_bits=state_bits, **Q_BASE, **kwargs)
    history = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stable_spam_module, "_use_triton", lambda param: use_triton)
        for t in range(1, Q_STEPS + 1):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen) * (1.0 + 0.5 * (t % 3))
                if t == Q_ZERO_STEP:
                    g.zero_()
                if t == Q_SPIKE_STEP:
                    g.view(-1)[11 * i + 5] *= 100.0
                p.grad = g.to(param_dtype)
            opt.step()
            history.append(
                [{"param": p.detach().clone(), **{k: opt.state[p][k].clone() for k in Q_STATE_KEYS}} for p in params]
            )
    assert all(opt.state[p]["quantized_bits"] == state_bits for p in params)
    return history


def index_mismatches(actual: torch.Tensor, expected: torch.Tensor, bits: int, numel: int) -> int:
    """Elements whose stored code index differs (4-bit indices unpacked first)."""
    assert actual.dtype == expected.dtype == torch.uint8 and actual.shape == expected.shape
    fmt = moment_format(bits, False)  # both moments have the same index width
    actual, expected = unpack_indices(actual, fmt, numel), unpack_indices(expected, fmt, numel)
    return int((actual != expected).sum())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_quantized_matches_torch_step(mode, param_dtype, bits):
    """8/4-bit moments through the optimizer, Triton step against the torch path: 8 steps with resets at 4 and 8,
    an all-zero gradient step, a spike, weight decay and the cosine factor.

    The kernel's float32 moments differ from torch's by rounding only (the norm's reduction order: ~1e-7 relative
    with float32 gradients, ~1e-6 with bfloat16 ones), and a value within that rounding of a midpoint between two
    codes can land on the neighbouring code; such an element then carries its different moment on (and its
    parameter moves by a code step's worth of update from the next step on). Here at most a few per thousand
    indices differ, with float32 parameters about one in 10^5; float32 parameters agree to 1e-6 until an index of
    their tensor has differed, to 1e-4 after. That the quantization itself adds no difference is checked bitwise by
    the next two tests."""
    expected = run_quantized(False, bits, param_dtype, mode=mode)
    actual = run_quantized(True, bits, param_dtype, mode=mode)
    exact = param_dtype == torch.float32
    absmax_rtol = 1e-6 if exact else 1e-5  # v ~ ĝ²: twice the relative difference of the norms
    diverged = [False] * len(Q_SHAPES)  # an index of the tensor differed at an earlier step
    for step, (tri_step, ref_step) in enumerate(zip(actual, expected, strict=True), start=1):
        for index, (tri, ref) in enumerate(zip(tri_step, ref_step, strict=True)):
            what = f"step {step}, tensor {index}"
            numel = ref["param"].numel()
            param_rtol = (1e-4 if diverged[index] else 1e-6) if exact else 1e-2
            assert_close_scaled(tri["param"], ref["param"], param_rtol, f"{what}, param")
            for key in STATE_KEYS[2:]:
                assert_close_scaled(tri[key], ref[key], 1e-6 if exact else 1e-5, f"{what}, {key}")
            for moment in ("exp_avg", "exp_avg_sq"):
                mismatches = index_mismatches(tri[f"{moment}_q"], ref[f"{moment}_q"], bits, numel)
                assert mismatches <= (1e-3 if exact else 5e-3) * numel, f"{what}, {moment}: {mismatches} indices"
                diverged[index] |= mismatches > 0
                a, e = tri[f"{moment}_absmax"].double(), ref[f"{moment}_absmax"].double()
                assert a.shape == e.shape and torch.isfinite(a).all(), f"{what}, {moment}_absmax"
                # a block whose largest element took another code earlier keeps a different absmax
                far = int(((a - e).abs() > absmax_rtol * e.abs()).sum())
                assert far <= (0 if exact else 2), f"{what}, {moment}_absmax: {far} blocks"


def random_quantized_state(numel: int, bits: int, seed: int) -> dict[str, torch.Tensor]:
    """A warm quantized state: random code indices, random positive absmax with some all-zero blocks."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {"quantized_bits": bits}
    for key, second_moment in (("exp_avg", False), ("exp_avg_sq", True)):
        fmt = moment_format(bits, second_moment)
        indices = torch.randint(0, 2**bits, (numel,), generator=gen, dtype=torch.uint8)
        if bits == 4:
            indices = indices.view(-1, 1) if numel % 2 == 0 else torch.cat([indices, indices.new_zeros(1)])
            indices = indices.view(-1, 2)
            indices = indices[:, 0] << 4 | indices[:, 1]
        absmax = torch.rand(-(-numel // fmt.blocksize), generator=gen) * (0.1 if second_moment else 0.01)
        absmax[1::7] = 0.0
        state[f"{key}_q"], state[f"{key}_absmax"] = indices.contiguous(), absmax
    state.update({k: v for k, v in fresh_state(torch.empty(0), torch.float32, 0).items() if k in STATE_KEYS[2:]})
    return state


def dequantized_state(state: dict[str, torch.Tensor], numel: int) -> dict[str, torch.Tensor]:
    """The same state with float32 moments (what the torch path works on between dequantize and quantize)."""
    bits = state["quantized_bits"]
    out = {k: state[k].clone() for k in STATE_KEYS[2:]}
    for key, second_moment in (("exp_avg", False), ("exp_avg_sq", True)):
        fmt = moment_format(bits, second_moment)
        out[key] = dequantize(state[f"{key}_q"], state[f"{key}_absmax"], fmt, numel)
    return out


def clone_state(state):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("reset", [False, True])
def test_quantized_kernel_is_dequantize_float_kernel_quantize_bitwise(bits, faithful, reset):
    """The quantized kernel equals, bit for bit, ``quantize(float32 kernel(dequantize(state)))``: dequantization,
    the update and the requantization (absmax, normalisation, nearest code) add no rounding of their own. Several
    quantization blocks per program, a grid-stride loop over 3 programs, a one-element last block, an odd count,
    all-zero blocks; a spike gradient and a zero one. Two runs are bitwise equal; on the zero gradient in clean mode
    (a skipped tensor: its moments are requantized unchanged) parameter and state equal the torch path's bitwise."""
    numel = 4097
    hp = StepHyperparameters(3e-2, 0.05, 0.8, 0.95, 0.6, 0.9, 0.7, 1e-6, faithful, reset)
    gen = torch.Generator().manual_seed(7)
    init = torch.randn(numel, generator=gen)
    grad = torch.randn(numel, generator=gen)
    grad[3] *= 100.0
    for g in (grad, torch.zeros(numel)):
        q_state = random_quantized_state(numel, bits, seed=8)
        f_state = dequantized_state(q_state, numel)
        results = []
        for _ in range(2 if g.any() else 1):  # determinism: the spike gradient's run twice
            param, state = init.clone(), clone_state(q_state)
            param.grad = g.clone()
            triton_update_tensor(param, state, hp, stat_step=5, adam_step=3, block=512, max_programs=3)
            results.append((param, state))
        float_param = init.clone()
        float_param.grad = g.clone()
        triton_update_tensor(float_param, f_state, hp, stat_step=5, adam_step=3, block=512, max_programs=3)
        param, state = results[0]
        for param_again, state_again in results[1:]:
            for key in Q_STATE_KEYS:
                assert torch.equal(state[key], state_again[key]), f"not deterministic: {key}"
            assert torch.equal(param, param_again)
        assert torch.equal(param, float_param)
        for key in STATE_KEYS[2:]:
            assert torch.equal(state[key], f_state[key]), key
        for key, second_moment in (("exp_avg", False), ("exp_avg_sq", True)):
            indices, absmax = quantize(f_state[key], moment_format(bits, second_moment))
            assert torch.equal(state[f"{key}_q"], indices), key
            assert torch.equal(state[f"{key}_absmax"], absmax), key
        if not g.any() and not faithful:  # a skipped tensor: nothing left to round differently
            ref_param, ref_state = init.clone(), clone_state(q_state)
            ref_param.grad = g.clone()
            torch_update(ref_param, ref_state, hp, stat_step=5, adam_step=3)
            assert torch.equal(param, ref_param)
            for key in Q_STATE_KEYS:
                assert torch.equal(state[key], ref_state[key]), key


@triton.jit
def _quantize_rows_kernel(
    X, Q, ABSMAX, MIDPOINTS, n, BITS: tl.constexpr, INDICES_PER_BYTE: tl.constexpr, QBLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """The update kernel's requantization of the first ROWS·QBLOCK elements of X (one program)."""
    half: tl.constexpr = QBLOCK // 2
    rows = tl.arange(0, ROWS)
    pair_offsets = tl.arange(0, half)
    idx = rows[:, None, None] * QBLOCK + tl.join(pair_offsets * 2, pair_offsets * 2 + 1)[None, :, :]
    pairs = rows[:, None] * half + pair_offsets[None, :]
    mask = idx < n
    index, absmax = _quantize(tl.load(X + idx, mask=mask, other=0.0), MIDPOINTS, BITS)
    _store_quantized(Q, ABSMAX, index, absmax, rows, idx, mask, pairs, n, INDICES_PER_BYTE, QBLOCK)


@pytest.mark.parametrize("second_moment", [False, True], ids=["m", "v"])
@pytest.mark.parametrize("bits", [8, 4])
def test_requantization_matches_bucketize_on_ties(bits, second_moment):
    """The kernel's nearest-code search against ``quantize`` (torch.bucketize, right=False) on every midpoint
    exactly (ties take the lower code), one float32 ulp either side of it, every code, ±0, ±inf, NaN, negative
    values, an all-zero block, a block scaled by 2^-3 (exact normalisation), and an odd partial last block."""
    fmt = moment_format(bits, second_moment)
    code = fmt.code(torch.device("cpu"))
    midpoints = (code[1:] + code[:-1]) / 2
    values = torch.cat(
        [
            midpoints,
            torch.nextafter(midpoints, torch.tensor(2.0)),
            torch.nextafter(midpoints, torch.tensor(-2.0)),
            code,
            -midpoints,
            torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -0.9999999, 1e-30, -1e-30]),
        ]
    )
    payload = fmt.blocksize - 1  # each block starts with 1.0, so its absmax is 1 and normalized values are exact
    chunks = list(values.split(payload))
    blocks = [torch.cat([torch.ones(1), c, torch.zeros(payload - c.numel())]) for c in chunks]
    blocks += [blocks[0] * 2.0**-3, torch.zeros(fmt.blocksize)]
    special = torch.cat([torch.ones(1), torch.linspace(-1, 1, fmt.blocksize - 1)])
    for value in (float("nan"), float("inf"), -float("inf")):
        block = special.clone()
        block[5] = value
        blocks.append(block)
    x = torch.cat([*blocks, values[: fmt.blocksize // 2 + 1]])  # odd partial last block
    n = x.numel()
    rows = triton.next_power_of_2(-(-n // fmt.blocksize))
    expected_q, expected_absmax = quantize(x, fmt)
    q = torch.full_like(expected_q, 0xAB)
    absmax = torch.full_like(expected_absmax, -1.0)
    tables = _quantization_tables(STATE_FORMATS[bits], x.device)
    midpoint_table = tables[(2 + int(second_moment)) * 2**bits :]
    assert torch.equal(midpoint_table[: 2**bits - 1], midpoints)
    _quantize_rows_kernel[(1,)](
        x, q, absmax, midpoint_table, n, BITS=bits, INDICES_PER_BYTE=fmt.indices_per_byte, QBLOCK=fmt.blocksize,
        ROWS=rows,
    )  # fmt: skip
    assert torch.equal(q, expected_q)
    torch.testing.assert_close(absmax, expected_absmax, rtol=0, atol=0, equal_nan=True)
