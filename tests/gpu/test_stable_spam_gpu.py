"""StableSPAM on a CUDA device equals the CPU result (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from hf_gns_spam import StableSPAM
from tests.support.marks import GPU_ONLY
from tests.support.optimizer_runs import initial_params, make_gradient_stream, max_relative_error, run_reference

pytestmark = GPU_ONLY


@pytest.mark.parametrize("mode", ["clean", "faithful"])
@pytest.mark.parametrize("state_bits", [32, 16])
def test_cuda_step_matches_the_float64_reference(mode, state_bits):
    stream = make_gradient_stream(60)
    init = initial_params()
    expected = run_reference(init, stream, lr=1e-2, mode=mode, reset_interval=20)
    params = [p.float().cuda().requires_grad_() for p in init]
    opt = StableSPAM(params, lr=1e-2, mode=mode, reset_interval=20, state_bits=state_bits)
    for grads in stream:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.float().cuda()
        opt.step()
    tolerance = 2e-5 if state_bits == 32 else 1e-3
    assert max_relative_error([p.cpu() for p in params], expected) < tolerance


# Shapes for the fused step on hardware: empty-ish and tiny tensors, a partial last block, and a 4M-element matrix
# that fills every program (1024) with two unmasked 16-byte-vector blocks each.
GPU_SHAPES = [(), (7,), (33, 65), (3, 4, 129), (4096, 1024), (4097,)]
GPU_STEPS = 12


def run_on_cuda(use_triton: bool, param_dtype: torch.dtype, monkeypatch, **kwargs) -> list[dict[str, torch.Tensor]]:
    """StableSPAM on CUDA with the fused Triton step on or off (the torch path on the same device); the parameters
    and states after the last step, on the CPU."""
    import hf_gns_spam.optim.stable_spam as stable_spam_module

    monkeypatch.setattr(stable_spam_module, "_use_triton", lambda param: use_triton and param.is_cuda)
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).to("cuda", param_dtype).requires_grad_() for s in GPU_SHAPES]
    optimizer = StableSPAM(params, lr=1e-2, reset_interval=5, weight_decay=0.1, total_steps=GPU_STEPS, **kwargs)
    for step in range(GPU_STEPS):
        for index, p in enumerate(params):
            grad = torch.randn(p.shape, generator=generator) * (1 + step % 3)
            if step == 3:
                grad.zero_()
            if step == 7 and grad.numel():
                grad.view(-1)[index] *= 100.0
            if step == 9 and index in (2, 5):  # a NaN, then an inf: counted, and treated as 0 by both paths
                grad.view(-1)[3] = float("nan") if index == 2 else float("inf")
            p.grad = grad.to("cuda", param_dtype)
        optimizer.step()
    return [
        {"param": p.detach().cpu(), **{k: v.cpu() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}}
        for p in params
    ]


FORMATS = [(torch.float32, 32), (torch.bfloat16, 32), (torch.bfloat16, 16), (torch.bfloat16, 8), (torch.bfloat16, 4),
           (torch.float16, 32)]  # fmt: skip


@pytest.mark.parametrize(("param_dtype", "state_bits"), FORMATS, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_fused_step_matches_the_torch_path_on_cuda(mode, state_bits, param_dtype, monkeypatch):
    """The Triton step (multi-tensor launches) against the torch path on the same GPU, 12 steps with resets, a zero
    gradient, a spike and non-finite entries: the tolerances of the interpreter tests (rounding-level float32
    differences; a half-precision parameter or a bfloat16/quantized moment can round the other way after one)."""
    from tests.support.optimizer_runs import assert_close_scaled

    actual = run_on_cuda(True, param_dtype, monkeypatch, mode=mode, state_bits=state_bits)
    expected = run_on_cuda(False, param_dtype, monkeypatch, mode=mode, state_bits=state_bits)
    exact = param_dtype == torch.float32 and state_bits == 32
    for index, (tri, ref) in enumerate(zip(actual, expected, strict=True)):
        assert tri.keys() == ref.keys()
        for key in tri:
            if key == "nonfinite_grad_steps":
                assert torch.equal(tri[key], ref[key]) and tri[key].item() == (index in (2, 5)), index
                continue
            if key.endswith("_q"):
                continue  # indices: compared through the dequantized moments' effect on the parameter
            if key in ("clip_max_ema", "norm_ema", "norm_sq_ema"):
                rtol = 1e-6 if param_dtype == torch.float32 else 1e-3
            elif key == "param":
                rtol = 1e-6 if exact else 1e-2
            else:
                rtol = 1e-6 if exact else 5e-2
            assert_close_scaled(tri[key], ref[key], rtol, f"tensor {index} {GPU_SHAPES[index]}, {key}")


@pytest.mark.parametrize("state_bits", [32, 8])
def test_many_tensors_in_one_launch_equal_one_at_a_time_on_cuda(state_bits):
    """triton_update_tensors over tensors of many sizes, one misaligned (no vector loads for its launch), equals
    triton_update_tensor on each alone, bitwise, on hardware too."""
    from hf_gns_spam.kernels.stable_spam_step import triton_update_tensor, triton_update_tensors
    from hf_gns_spam.kernels.step_contract import StepHyperparameters

    generator = torch.Generator().manual_seed(1)
    storage = torch.randn(3 << 20, generator=generator).to("cuda", torch.bfloat16)
    params = [torch.randn(s, generator=generator).to("cuda", torch.bfloat16) for s in [(1,), (2049,), (1024, 1024)]]
    params.append(storage[3 : 3 + (2 << 20)])  # 6 bytes into its storage
    grads = [torch.randn(p.shape, generator=generator).to("cuda", torch.bfloat16) for p in params]
    hp = StepHyperparameters(1e-3, 0.1, 0.9, 0.999, 0.7, 0.9, 0.999, 1e-8, False, False)

    def fresh_states():
        optimizer = StableSPAM([torch.empty(0)], state_bits=state_bits)
        return [optimizer._init_state(p, optimizer.param_groups[0]) for p in params]

    alone = [p.clone() for p in params]
    alone_states = fresh_states()
    for param, state, grad in zip(alone, alone_states, grads, strict=True):
        triton_update_tensor(param, state, hp, 1, 1, grad=grad)
    states = fresh_states()
    triton_update_tensors(params, states, hp, 1, 1, grads=grads)
    for param, expected, state, expected_state in zip(params, alone, states, alone_states, strict=True):
        assert torch.equal(param, expected)
        for key, value in expected_state.items():
            if torch.is_tensor(value):
                assert torch.equal(state[key], value), key


def test_fused_step_does_not_synchronise_with_the_host():
    """A step of the Triton path on CUDA (table copy included) raises under torch's sync debug mode "error" if it
    waits for the GPU anywhere."""
    params = [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in [(64, 64), (64,)]]
    optimizer = StableSPAM(params, lr=1e-3, state_bits=8)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # state initialisation (allocations) outside the checked step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
