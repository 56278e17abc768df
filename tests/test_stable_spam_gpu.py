"""StableSPAM on a CUDA device equals the CPU result (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from hf_gns_spam import StableSPAM
from tests.test_stable_spam import initial_params, make_gradient_stream, max_relative_error, run_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


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
